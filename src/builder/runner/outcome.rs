//! The decisions that close a request, as pure functions: which hosts are
//! evaluated in what order, and what the request's status and error are
//! once every host is done.

use crate::builder::cancel::StopReason;
use crate::protocol::{BuildStatus, ErrorBody, ErrorCode, HostStatus, HostSummary, SkippedHost};

/// Each host's place among the evaluations (`None`: done before a
/// restart, so not evaluated again). Evaluations run in the hosts' order,
/// so the n-th host still to do takes the n-th evaluation.
pub(crate) fn evaluation_order(
    hosts: &[String],
    done: impl Fn(&str) -> bool,
) -> Vec<Option<usize>> {
    let mut next = 0;
    hosts
        .iter()
        .map(|host| {
            if done(host) {
                return None;
            }
            next += 1;
            Some(next - 1)
        })
        .collect()
}

/// The request's status and error once every host is done. A request
/// cancelled at any point (`stopped`, even if every host finished
/// meanwhile: its canceller was told so) or with a cancelled host is
/// cancelled; one where every host built and none was skipped succeeded;
/// anything else failed.
pub(crate) fn request_outcome(
    stopped: Option<StopReason>,
    hosts: &[HostSummary],
    skipped: &[SkippedHost],
) -> (BuildStatus, Option<ErrorBody>) {
    let any_cancelled = hosts.iter().any(|h| h.status == HostStatus::Cancelled);
    if stopped.is_some() || any_cancelled {
        let reason = stopped.unwrap_or(StopReason::ByRequest);
        let error = ErrorBody::new(ErrorCode::Cancelled, reason.message());
        return (BuildStatus::Cancelled, Some(error));
    }
    if !skipped.is_empty() {
        return (BuildStatus::Failed, Some(skipped_error(skipped)));
    }
    if hosts.iter().all(|h| h.status == HostStatus::Success) {
        (BuildStatus::Success, None)
    } else {
        (BuildStatus::Failed, None)
    }
}

/// The request-level error of an `all` build that left hosts out.
fn skipped_error(skipped: &[SkippedHost]) -> ErrorBody {
    let list: Vec<String> = skipped
        .iter()
        .map(|s| format!("{:?}: {}", s.host, s.reason))
        .collect();
    ErrorBody::new(
        ErrorCode::HostsSkipped,
        format!(
            "{} host(s) of nixosConfigurations not built: {}",
            skipped.len(),
            list.join("; ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, status: HostStatus) -> HostSummary {
        HostSummary {
            host: name.into(),
            status,
            duration_ms: 1,
            out_path: None,
            cached: false,
            changed_packages: None,
            size_delta: None,
        }
    }

    fn skipped(name: &str) -> SkippedHost {
        SkippedHost {
            host: name.into(),
            reason: "its name is not [A-Za-z0-9_-]+".into(),
        }
    }

    #[test]
    fn hosts_done_before_a_restart_take_no_evaluation() {
        let hosts: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(
            evaluation_order(&hosts, |_| false),
            [Some(0), Some(1), Some(2), Some(3)]
        );
        assert_eq!(
            evaluation_order(&hosts, |h| h == "a" || h == "c"),
            [None, Some(0), None, Some(1)]
        );
        assert_eq!(evaluation_order(&hosts, |_| true), [None; 4]);
    }

    #[test]
    fn every_host_built_and_none_skipped_is_success() {
        let built = [
            host("a", HostStatus::Success),
            host("b", HostStatus::Success),
        ];
        assert_eq!(
            request_outcome(None, &built, &[]),
            (BuildStatus::Success, None)
        );
        assert_eq!(request_outcome(None, &[], &[]).0, BuildStatus::Success);
    }

    #[test]
    fn a_failed_timed_out_or_skipped_host_fails_the_request() {
        for status in [HostStatus::Failed, HostStatus::Timeout] {
            let hosts = [host("a", HostStatus::Success), host("b", status)];
            assert_eq!(
                request_outcome(None, &hosts, &[]),
                (BuildStatus::Failed, None)
            );
        }
        let built = [host("a", HostStatus::Success)];
        let (status, error) = request_outcome(None, &built, &[skipped("bad name")]);
        assert_eq!(status, BuildStatus::Failed);
        let error = error.unwrap();
        assert_eq!(error.code, ErrorCode::HostsSkipped);
        assert!(error.message.starts_with("1 host(s)"), "{}", error.message);
        assert!(error.message.contains("\"bad name\""), "{}", error.message);
    }

    #[test]
    fn a_cancel_wins_over_every_result_and_says_why() {
        let built = [host("a", HostStatus::Success)];
        for reason in [StopReason::ByRequest, StopReason::Shutdown] {
            let (status, error) = request_outcome(Some(reason), &built, &[skipped("x y")]);
            assert_eq!(status, BuildStatus::Cancelled);
            assert_eq!(error.unwrap().message, reason.message());
        }
        let hosts = [
            host("a", HostStatus::Failed),
            host("b", HostStatus::Cancelled),
        ];
        assert_eq!(request_outcome(None, &hosts, &[]).0, BuildStatus::Cancelled);
    }
}
