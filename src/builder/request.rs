//! An accepted request and what it ends with: the [`Job`] that waits in the
//! queue and runs, the [`Report`] of its run, and the `finished` event made
//! from it. Every other part of the builder speaks of requests in these
//! terms.

use std::time::{Duration, SystemTime};

use super::cancel::StopReason;
use super::replies::Replies;
use crate::protocol::{
    BuildStatus, ErrorBody, ErrorCode, Event, HostStatus, HostSummary, SkippedHost, Target,
};

/// A request that passed validation and waits for its turn.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) build_id: String,
    pub(crate) repo: String,
    pub(crate) target: Target,
    /// The ref to fetch: the request's, else the repo's default.
    pub(crate) git_ref: Option<String>,
    pub(crate) rev: Option<String>,
    /// Stream build output as `log` events.
    pub(crate) logs: bool,
    /// The NKey public key that signed the request, if it was signed.
    pub(crate) owner: Option<String>,
    pub(crate) replies: Replies,
    /// When the request arrived.
    pub(crate) received_at: SystemTime,
    /// What it had done before the builder restarted (`None`: a new one).
    pub(crate) resume: Option<Resume>,
}

/// What a request picked up again after a restart had done before.
#[derive(Debug, Clone, Default)]
pub(crate) struct Resume {
    /// The commit it was pinned at, once it had started.
    pub(crate) rev: Option<String>,
    /// Its resolved hosts (and skipped ones), once it had started.
    pub(crate) started: Option<(Vec<String>, Vec<SkippedHost>)>,
    /// Hosts that had finished, with their results.
    pub(crate) done: Vec<HostSummary>,
}

impl Job {
    /// Sends `finished` for `report` to every requester.
    pub(crate) fn finish(&self, report: Report, on_sent: super::replies::OnSent) {
        self.replies
            .send_then(&self.build_id, self.finished_event(report), on_sent);
    }

    fn finished_event(&self, report: Report) -> Event {
        let succeeded = report
            .hosts
            .iter()
            .filter(|h| h.status == HostStatus::Success)
            .count();
        Event::Finished {
            repo: self.repo.clone(),
            target: self.target.to_string(),
            rev: report.rev,
            status: report.status,
            duration_ms: millis(report.duration),
            succeeded,
            // Skipped hosts did not succeed either.
            failed: report.hosts.len() - succeeded + report.skipped.len(),
            hosts: report.hosts,
            skipped: report.skipped,
            error: report.error,
            omitted_hosts: 0,
        }
    }
}

/// Whether a cancel signed by `signer` (`None`: unsigned) may stop a build
/// signed by `owner`: its owner may, and so may the configured admins;
/// unsigned builds only the admins, unsigned cancels never.
pub(crate) fn may_cancel(owner: Option<&str>, signer: Option<&str>, admins: &[String]) -> bool {
    signer.is_some_and(|signer| owner == Some(signer) || admins.iter().any(|a| a == signer))
}

/// The result of a whole request, as reported in `finished`.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) status: BuildStatus,
    pub(crate) rev: Option<String>,
    pub(crate) hosts: Vec<HostSummary>,
    pub(crate) error: Option<ErrorBody>,
    pub(crate) duration: Duration,
    /// Hosts of `all` that were not built.
    pub(crate) skipped: Vec<SkippedHost>,
}

impl Report {
    /// A request that ended before any host: no rev, no hosts.
    pub(crate) fn ended_early(status: BuildStatus, error: ErrorBody) -> Self {
        Self {
            status,
            rev: None,
            hosts: Vec::new(),
            error: Some(error),
            duration: Duration::ZERO,
            skipped: Vec::new(),
        }
    }
}

/// Why one host (or the request, before any host) did not succeed.
#[derive(Debug, Clone)]
pub(crate) struct HostFailure {
    pub(crate) status: HostStatus,
    pub(crate) error: ErrorBody,
}

impl HostFailure {
    /// A plain failure with `code`.
    pub(crate) fn failed(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: HostStatus::Failed,
            error: ErrorBody::new(code, message),
        }
    }

    /// The host ran past `host_timeout`.
    pub(crate) fn timeout(message: impl Into<String>) -> Self {
        Self {
            status: HostStatus::Timeout,
            error: ErrorBody::new(ErrorCode::Timeout, message),
        }
    }

    /// The build was cancelled, for `reason`.
    pub(crate) fn cancelled(reason: StopReason) -> Self {
        Self {
            status: HostStatus::Cancelled,
            error: ErrorBody::new(ErrorCode::Cancelled, reason.message()),
        }
    }

    /// How a failure before any host built ends the whole request.
    pub(crate) fn build_status(&self) -> BuildStatus {
        match self.status {
            HostStatus::Cancelled => BuildStatus::Cancelled,
            HostStatus::Success | HostStatus::Failed | HostStatus::Timeout => BuildStatus::Failed,
        }
    }
}

/// Whole milliseconds of `duration`, saturating (a `u64` of milliseconds
/// outlasts any build).
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_are_cancelled_by_their_owner_or_an_admin_only() {
        let admins = ["UADMIN".to_owned()];
        assert!(may_cancel(Some("UOWNER"), Some("UOWNER"), &admins));
        assert!(may_cancel(Some("UOWNER"), Some("UADMIN"), &admins));
        assert!(may_cancel(None, Some("UADMIN"), &admins));
        assert!(!may_cancel(Some("UOWNER"), Some("USTRANGER"), &admins));
        assert!(!may_cancel(None, Some("USTRANGER"), &admins));
        assert!(!may_cancel(Some("UOWNER"), None, &admins));
        assert!(!may_cancel(None, None, &admins));
    }
}
