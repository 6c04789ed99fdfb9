//! Replies: the build id, `seq` and every event of a build
//! (docs/protocol.md, "Replies").

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Changes, ErrorBody, SHORTENED_SLACK, is_zero};
use crate::text::keep_tail;

/// Largest `lines` payload of one `log` event.
pub const MAX_LOG_EVENT_BYTES: usize = 16 * 1024;
/// Most requesters one build's events go to (coalesced requests included).
pub const MAX_REQUESTERS_PER_BUILD: usize = 64;

/// What is kept of a `finished` error message that must be shortened.
const SHORTENED_ERROR_BYTES: usize = 512;

impl Reply {
    /// This reply as JSON, at most `max` bytes where that is possible: a
    /// `finished` event too large for the server's `max_payload` gives up
    /// host lines from the end (counted in `omitted_hosts`) and most of its
    /// error message rather than being dropped. Other events are left as
    /// they are (they are small, or expendable).
    pub fn to_json_within(&self, max: usize) -> serde_json::Result<Vec<u8>> {
        let whole = serde_json::to_vec(self)?;
        let Event::Finished {
            hosts,
            error,
            omitted_hosts,
            ..
        } = &self.event
        else {
            return Ok(whole);
        };
        if whole.len() <= max {
            return Ok(whole);
        }
        let shortened = |kept: Vec<HostSummary>| {
            let mut short = self.clone();
            if let Event::Finished {
                hosts: short_hosts,
                error: short_error,
                omitted_hosts: omitted,
                ..
            } = &mut short.event
            {
                *short_error = error.as_ref().map(|error| {
                    ErrorBody::new(
                        error.code,
                        keep_tail(
                            crate::redact::redact_owned(error.message.clone()),
                            SHORTENED_ERROR_BYTES,
                        ),
                    )
                });
                *omitted = omitted_hosts + hosts.len() - kept.len();
                *short_hosts = kept;
            }
            short
        };
        let mut size = serde_json::to_vec(&shortened(Vec::new()))?.len() + SHORTENED_SLACK;
        let mut kept = Vec::new();
        for host in hosts {
            size += serde_json::to_vec(host)?.len() + 1;
            if size > max {
                break;
            }
            kept.push(host.clone());
        }
        serde_json::to_vec(&shortened(kept))
    }
}

/// Outcome of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    Success,
    Failed,
    Timeout,
    Cancelled,
}

impl HostStatus {
    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome of a whole request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Every host succeeded.
    Success,
    /// At least one host, or the request itself, failed.
    Failed,
    /// The request was cancelled.
    Cancelled,
}

impl BuildStatus {
    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One host's line in the `finished` summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSummary {
    pub host: String,
    pub status: HostStatus,
    pub duration_ms: u64,
    pub out_path: Option<String>,
    /// The output was already in the store; nothing was built.
    #[serde(default)]
    pub cached: bool,
    /// How many packages changed against the default ref's result
    /// (`packages` plus `more` of the host's [`Changes`]); absent when there
    /// was nothing to compare with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_packages: Option<usize>,
    /// The closure's size change in bytes against the same result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_delta: Option<i64>,
}

/// A host of `all` that was not built, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedHost {
    /// The attribute name as the flake has it.
    pub host: String,
    pub reason: String,
}

/// Every reply: a build id plus one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Assigned by the builder to every request, rejected ones too.
    pub build_id: String,
    /// The event's place among its build's events: rising by one with each
    /// event the builder sends for the build (to any of its requesters),
    /// from `accepted` on; a resumed build continues above every number
    /// sent before the restart. A requester takes an event only if its
    /// `seq` is above the last one it took, so a replayed event is never
    /// taken twice. Absent from builders that do not number events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(flatten)]
    pub event: Event,
}

impl Reply {
    /// A reply without a sequence number.
    pub fn new(build_id: impl Into<String>, event: Event) -> Self {
        Self {
            build_id: build_id.into(),
            seq: None,
            event,
        }
    }

    /// Whether this is the last event a requester will get for the request.
    pub fn is_terminal(&self) -> bool {
        self.event.is_terminal()
    }
}

/// The events of a build, in the order they are sent (see docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Sent at once on receipt.
    Accepted {
        /// Which request this answers: [`request_digest`](super::request_digest) of the request
        /// as the builder received it. A requester compares it with the
        /// digest of what it sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_digest: Option<String>,
        repo: String,
        target: String,
        /// The ref that will be fetched: the request's, else the repo's
        /// default; `null` means the remote's default branch.
        #[serde(rename = "ref")]
        git_ref: Option<String>,
        /// How many requests are ahead of this one (0: it starts now).
        queue_position: usize,
        /// The name of the builder that took it (`[builder] name`); absent
        /// from builders that do not say.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        builder: Option<String>,
        /// The builder sends some event at least this often (milliseconds)
        /// until the terminal one: a client that hears nothing for much
        /// longer may take the builder for dead. 0 from builders that do
        /// not say.
        #[serde(default)]
        heartbeat_ms: u64,
    },
    /// A sign of life while nothing else is sent (waiting in the queue,
    /// fetching, evaluating).
    Heartbeat,
    /// The flake is fetched and pinned; the hosts are resolved.
    Started {
        repo: String,
        target: String,
        /// The commit every host of this request is built from (`null` only
        /// for flake types without one).
        rev: Option<String>,
        hosts: Vec<String>,
        /// Hosts of `all` that will not be built, and why; any makes the
        /// request `failed`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipped: Vec<SkippedHost>,
    },
    /// A host begins (evaluation, then build).
    HostStarted {
        host: String,
        /// Position of the host, counting from 1.
        index: usize,
        total: usize,
    },
    /// A sign of life while a host builds, with Nix's derivation counts.
    Progress {
        host: String,
        /// Derivations built so far for this host.
        done: u64,
        /// Derivations Nix expects to build for this host (0 until known).
        expected: u64,
        /// Name of the derivation building now, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        building: Option<String>,
        /// Where that derivation builds: a remote builder's URI
        /// (credentials masked) or `localhost`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        machine: Option<String>,
        /// The host's evaluation waits for room in the evaluators' memory
        /// budget.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        waiting_for_memory: bool,
    },
    /// Lines of build output, for requests that asked for `logs`.
    Log { host: String, lines: Vec<String> },
    /// A host is done.
    HostFinished {
        host: String,
        status: HostStatus,
        duration_ms: u64,
        /// The built store path, on success.
        out_path: Option<String>,
        /// The output was already in the store; nothing was built.
        #[serde(default)]
        cached: bool,
        /// Why, when not successful.
        error: Option<ErrorBody>,
        /// On success, what changed against the host's current result on
        /// the repo's default ref; `null` when there is nothing to compare
        /// with (or the builder does not compare).
        #[serde(default)]
        changes: Option<Changes>,
        /// Derivations built for this host on each machine: a remote
        /// builder's URI (credentials masked) or `localhost`; empty when
        /// nothing was built.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        machines: BTreeMap<String, u64>,
        /// On success, the closure's size in bytes (the sum of its paths'
        /// NAR sizes), when the builder measured it: with `changes`, and
        /// for a host's first result on the default ref (with
        /// `gc_roots_dir`). Absent otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        closure_size: Option<u64>,
    },
    /// Terminal: the request is done.
    Finished {
        repo: String,
        target: String,
        rev: Option<String>,
        status: BuildStatus,
        duration_ms: u64,
        succeeded: usize,
        failed: usize,
        hosts: Vec<HostSummary>,
        /// Hosts of `all` that were not built, and why (as in `started`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipped: Vec<SkippedHost>,
        /// Why the request failed before any host built, why hosts were
        /// skipped, or why it was cancelled.
        error: Option<ErrorBody>,
        /// Hosts left out of `hosts` so the event fits the server's
        /// `max_payload` (they still count in `succeeded`/`failed`).
        #[serde(default, skip_serializing_if = "is_zero")]
        omitted_hosts: usize,
    },
    /// Terminal: the request was refused on receipt.
    Rejected {
        /// As in `accepted`: which request this answers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_digest: Option<String>,
        error: ErrorBody,
    },
    /// The builder is stopping (a restart, a deploy of its own host). With
    /// `resume: true` it has the request on disk and picks it up again when
    /// it is back, sending `resumed`; nothing ends here.
    Interrupted { resume: bool },
    /// The builder is back and goes on with the request: the same build id,
    /// the same pinned rev; hosts in `done` finished before and are not
    /// built again.
    Resumed {
        /// Hosts already finished, with their results in `finished`.
        done: Vec<String>,
        /// As in `accepted`: the builder's heartbeat from now on.
        #[serde(default)]
        heartbeat_ms: u64,
    },
    /// An event type from a newer builder; clients skip it.
    #[serde(other)]
    Unknown,
}

impl Event {
    /// Whether this event ends the request.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Finished { .. } | Self::Rejected { .. })
    }

    /// The wire name of the event.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::Heartbeat => "heartbeat",
            Self::Started { .. } => "started",
            Self::HostStarted { .. } => "host_started",
            Self::Progress { .. } => "progress",
            Self::Log { .. } => "log",
            Self::HostFinished { .. } => "host_finished",
            Self::Finished { .. } => "finished",
            Self::Rejected { .. } => "rejected",
            Self::Interrupted { .. } => "interrupted",
            Self::Resumed { .. } => "resumed",
            Self::Unknown => "unknown",
        }
    }
}

/// Generates a build id: 16 random lowercase hex digits.
pub fn new_build_id() -> String {
    random_hex::<8>()
}

/// `N` random bytes as lowercase hex.
pub fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    // The OS random source failing is not something to recover from; fall
    // back to the clock so ids stay distinct rather than aborting a request.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let clock = nanos.to_le_bytes();
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = clock[i % clock.len()];
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{CancelOutcome, CancelledState, ErrorCode};

    #[test]
    fn a_finished_too_large_is_shortened_to_fit() {
        let host = |i: usize| HostSummary {
            host: format!("host-{i:03}"),
            status: HostStatus::Failed,
            duration_ms: 1,
            out_path: None,
            cached: false,
            changed_packages: None,
            size_delta: None,
        };
        let reply = Reply {
            build_id: "b".into(),
            seq: None,
            event: Event::Finished {
                repo: "r".into(),
                target: "all".into(),
                rev: None,
                status: BuildStatus::Failed,
                duration_ms: 5,
                succeeded: 0,
                failed: 200,
                hosts: (0..200).map(host).collect(),
                error: Some(ErrorBody::new(ErrorCode::Internal, "x".repeat(4000))),
                skipped: Vec::new(),
                omitted_hosts: 0,
            },
        };
        let whole = reply.to_json_within(usize::MAX).unwrap();
        assert_eq!(whole, serde_json::to_vec(&reply).unwrap());
        let short = reply.to_json_within(2048).unwrap();
        assert!(short.len() <= 2048, "{}", short.len());
        let Event::Finished {
            hosts,
            omitted_hosts,
            error,
            failed,
            ..
        } = serde_json::from_slice::<Reply>(&short).unwrap().event
        else {
            panic!("not finished");
        };
        assert!(!hosts.is_empty());
        assert_eq!(hosts.len() + omitted_hosts, 200);
        assert_eq!(hosts[0].host, "host-000", "the first hosts are kept");
        assert_eq!(failed, 200);
        assert_eq!(error.unwrap().message.len(), 512);
        // Other events are left alone.
        let log = Reply {
            build_id: "b".into(),
            seq: None,
            event: Event::Log {
                host: "h".into(),
                lines: vec!["x".repeat(5000)],
            },
        };
        assert!(log.to_json_within(100).unwrap().len() > 5000);
    }

    #[test]
    fn replies_serialize_flat_with_event_tag() {
        let reply = Reply {
            build_id: "abc".into(),
            seq: None,
            event: Event::Accepted {
                builder: None,
                request_digest: None,
                repo: "r".into(),
                target: "all".into(),
                git_ref: None,
                queue_position: 1,
                heartbeat_ms: 0,
            },
        };
        let json: serde_json::Value = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "build_id": "abc", "event": "accepted", "repo": "r",
                "target": "all", "ref": null, "queue_position": 1, "heartbeat_ms": 0
            })
        );
        let back: Reply = serde_json::from_value(json).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn clients_tolerate_newer_events_fields_and_codes() {
        let reply: Reply =
            serde_json::from_str(r#"{"event":"brand_new","build_id":"x","whatever":[1,2]}"#)
                .unwrap();
        assert_eq!(reply.event, Event::Unknown);
        assert!(!reply.is_terminal());

        let reply: Reply = serde_json::from_str(
            r#"{"event":"rejected","build_id":"x","error":{"code":"new_code","message":"m"}}"#,
        )
        .unwrap();
        assert!(reply.is_terminal());
        let Event::Rejected { error, .. } = reply.event else {
            panic!("not rejected");
        };
        assert_eq!(error.code, ErrorCode::Unknown);

        let reply: Reply = serde_json::from_str(
            r#"{"event":"progress","build_id":"x","host":"h","done":1,"expected":2,"new":true}"#,
        )
        .unwrap();
        assert!(matches!(reply.event, Event::Progress { done: 1, .. }));
    }

    #[test]
    fn machines_are_additive() {
        // An older builder's events have no machines: they read as none.
        let reply: Reply = serde_json::from_str(
            r#"{"event":"host_finished","build_id":"1","host":"a","status":"success","duration_ms":1,"out_path":"/nix/store/x","cached":false,"error":null}"#,
        )
        .unwrap();
        assert!(
            matches!(&reply.event, Event::HostFinished { machines, .. } if machines.is_empty())
        );
        let event = Event::HostFinished {
            host: "a".into(),
            status: HostStatus::Success,
            duration_ms: 1,
            out_path: None,
            cached: true,
            error: None,
            changes: None,
            machines: BTreeMap::new(),
            closure_size: None,
        };
        assert!(!serde_json::to_string(&event).unwrap().contains("machines"));
        let event = Event::Progress {
            host: "a".into(),
            done: 0,
            expected: 1,
            building: Some("x".into()),
            machine: Some("localhost".into()),
            waiting_for_memory: false,
        };
        let json = serde_json::to_string(&event).unwrap();
        assert!(json.contains(r#""machine":"localhost""#), "{json}");
        assert!(!json.contains("waiting_for_memory"), "{json}");
    }

    #[test]
    fn skipped_hosts_and_late_cancels_are_additive() {
        // An older builder's `started` has no `skipped`: it reads as none.
        let reply: Reply = serde_json::from_str(
            r#"{"event":"started","build_id":"1","repo":"r","target":"all","rev":null,"hosts":["a"]}"#,
        )
        .unwrap();
        assert!(matches!(reply.event, Event::Started { ref skipped, .. } if skipped.is_empty()));
        let outcome: CancelOutcome =
            serde_json::from_str(r#"{"build_id":"1","found":false,"state":"finishing"}"#).unwrap();
        assert_eq!(outcome.state, Some(CancelledState::Finishing));
        let outcome: CancelOutcome =
            serde_json::from_str(r#"{"build_id":"1","found":false,"state":"later"}"#).unwrap();
        assert_eq!(outcome.state, Some(CancelledState::Unknown));
    }

    #[test]
    fn build_ids_are_distinct_hex() {
        let a = new_build_id();
        let b = new_build_id();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
