//! The builder's state as `build.status` answers it
//! (docs/protocol.md, "Status: `build.status`").

use serde::{Deserialize, Serialize};

use super::{HostStatus, SHORTENED_SLACK, is_zero};

/// The reply to a `build.status` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StatusEvent {
    /// What the builder is doing and how every host last went.
    Status(BuilderStatus),
}

/// The builder's state, as `build.status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuilderStatus {
    /// The builder's name (`[builder] name`, by default its host name).
    /// Names are not unique by force: tell builders apart by the key that
    /// signed their answers. Absent from builders that do not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder: Option<String>,
    /// The builder's version.
    pub version: String,
    /// The configured repos (names and default refs; never URLs, which may
    /// carry credentials).
    pub repos: Vec<RepoInfo>,
    /// The build running now.
    pub running: Option<RunningBuild>,
    /// Requests waiting, in the order they will run.
    pub queue: Vec<QueuedBuild>,
    /// The last result of every host built since the builder's state began.
    pub last_results: Vec<LastResult>,
    /// The remote builders of the builder's Nix (its `builders` setting)
    /// and their last check; empty without any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<MachineStatus>,
    /// Entries left out of `last_results` (the oldest) so the answer fits
    /// the server's `max_payload`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted_results: usize,
    /// The address of the builder's status page, when it serves one
    /// (`[web] enabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
}

impl StatusEvent {
    /// This answer as JSON, at most `max` bytes where that is possible:
    /// when the whole status is too large for the server's `max_payload`,
    /// the oldest `last_results` are left out (counted in
    /// `omitted_results`) rather than nobody getting a status at all.
    pub fn to_json_within(&self, max: usize) -> serde_json::Result<Vec<u8>> {
        let whole = serde_json::to_vec(self)?;
        let Self::Status(status) = self;
        if whole.len() <= max {
            return Ok(whole);
        }
        let mut without = status.clone();
        without.last_results.clear();
        without.omitted_results = status.omitted_results + status.last_results.len();
        let mut size = serde_json::to_vec(&Self::Status(without))?.len() + SHORTENED_SLACK;
        // The newest first, as long as they fit; then back in their order.
        let mut newest: Vec<usize> = (0..status.last_results.len()).collect();
        newest.sort_by(|&a, &b| {
            status.last_results[b]
                .finished_at
                .cmp(&status.last_results[a].finished_at)
        });
        let mut kept = Vec::new();
        for index in newest {
            size += serde_json::to_vec(&status.last_results[index])?.len() + 1;
            if size > max {
                break;
            }
            kept.push(index);
        }
        kept.sort_unstable();
        let mut short = status.clone();
        short.last_results = kept
            .iter()
            .map(|&index| status.last_results[index].clone())
            .collect();
        short.omitted_results = status.omitted_results + status.last_results.len() - kept.len();
        serde_json::to_vec(&Self::Status(short))
    }
}

/// A remote builder and how its last check went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// Its store URI, credentials masked.
    pub machine: String,
    /// Whether the last check reached it; `null` before the first check.
    pub up: Option<bool>,
    /// When it was last checked (RFC 3339).
    pub checked_at: Option<String>,
    /// Why the last check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A configured repo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoInfo {
    pub name: String,
    /// The default ref; `null` means the remote's default branch.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
}

/// The build running now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningBuild {
    pub build_id: String,
    pub repo: String,
    pub target: String,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The commit it builds, once the flake is pinned (absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// The NKey public key that signed the request (`null`: unsigned).
    #[serde(default)]
    pub owner: Option<String>,
    /// Picked up again from the journal after the builder restarted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
    /// Every host building now (up to the builder's `parallel_hosts`), in
    /// the request's order, each with its progress; empty while the flake
    /// is fetched and between hosts.
    #[serde(default)]
    pub hosts: Vec<RunningHost>,
    /// Hosts of the request finished so far.
    #[serde(default)]
    pub finished: usize,
    /// Hosts whose evaluation waits for room in the evaluators' memory
    /// budget (`eval_memory_budget`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for_memory: Vec<String>,
    /// The number of hosts the request builds (`null` until they are
    /// resolved).
    pub total: Option<usize>,
    /// When the build started (RFC 3339, UTC).
    pub started_at: String,
}

/// A host of the running build that is building now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningHost {
    pub host: String,
    /// Its position among the request's hosts, counting from 1.
    pub index: usize,
    /// Derivations built so far, and expected (0 until known), as in its
    /// last `progress` event.
    #[serde(default)]
    pub done: u64,
    #[serde(default)]
    pub expected: u64,
}

/// A request waiting for its turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedBuild {
    pub build_id: String,
    pub repo: String,
    pub target: String,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The NKey public key that signed the request (`null`: unsigned).
    #[serde(default)]
    pub owner: Option<String>,
    /// Picked up again from the journal after the builder restarted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
    /// When the request arrived (RFC 3339, UTC).
    pub queued_at: String,
}

/// How a host's last build went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    pub repo: String,
    pub host: String,
    pub status: HostStatus,
    pub rev: Option<String>,
    pub out_path: Option<String>,
    /// When the host finished (RFC 3339, UTC).
    pub finished_at: String,
    /// The ref it was built from, for a build of a ref other than the
    /// repo's default (absent for the default ref's results).
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Built from a `rev` the request named (absent when not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

/// Formats a time as RFC 3339 in UTC, to the second.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_replies_are_tagged_status() {
        let status = StatusEvent::Status(BuilderStatus {
            builder: None,
            version: "1.0.0".into(),
            repos: vec![RepoInfo {
                name: "nixos".into(),
                git_ref: None,
            }],
            running: None,
            queue: vec![],
            last_results: vec![],
            machines: vec![],
            omitted_results: 0,
            web_url: None,
        });
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["event"], "status");
        assert_eq!(json["repos"][0]["ref"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<StatusEvent>(json).unwrap(), status);
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn a_status_too_large_for_nats_keeps_its_newest_results() {
        let result = |i: usize| LastResult {
            repo: "nixos-servers".into(),
            host: format!("host-{i:04}"),
            status: HostStatus::Success,
            rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
            out_path: Some(format!("/nix/store/{i:032}-nixos-system-host-{i:04}")),
            finished_at: format!("2026-12-07T02:{:02}:{:02}Z", i / 60, i % 60),
            git_ref: None,
            pinned: false,
        };
        let status = StatusEvent::Status(BuilderStatus {
            builder: None,
            version: "1.0.0".into(),
            repos: vec![],
            running: None,
            queue: vec![],
            last_results: (0..2000).map(result).collect(),
            machines: vec![],
            omitted_results: 0,
            web_url: None,
        });
        let max = 64 * 1024;
        assert!(serde_json::to_vec(&status).unwrap().len() > max);
        let short = status.to_json_within(max).unwrap();
        assert!(short.len() <= max, "{}", short.len());
        let StatusEvent::Status(back) = serde_json::from_slice(&short).unwrap();
        assert!(!back.last_results.is_empty());
        assert_eq!(back.last_results.len() + back.omitted_results, 2000);
        // The newest are kept, in their order.
        assert_eq!(back.last_results.last().unwrap().host, "host-1999");
        assert!(back.last_results.windows(2).all(|w| w[0].host < w[1].host));
        // One that fits is left whole.
        let small = StatusEvent::Status(BuilderStatus {
            last_results: (0..3).map(result).collect(),
            ..back
        });
        let whole = serde_json::to_vec(&small).unwrap();
        assert_eq!(small.to_json_within(max).unwrap(), whole);
    }
}
