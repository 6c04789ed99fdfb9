//! What was built, when, and what changed: every accepted request, kept
//! in SQLite once it has an outcome (`[builder] history_db`), for the web
//! pages and the JSON API (docs/web.md).
//!
//! The records are made of the events the requesters received, so the
//! API says what the CLI said. Writing never holds up a build: events go
//! to one writer thread through a bounded queue, and what cannot be
//! written is logged and counted ([`Recorder`]).

mod recorder;
mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use recorder::{EventTap, LIVE_EVENTS_BUFFER, MAX_WRITES_QUEUED, Recorder};
pub use store::{BuildMeta, BuildQuery, DEFAULT_LIST, HistoryError, Keep, MAX_LIST, Store};

use crate::protocol::{Changes, ErrorBody, HostStatus, SkippedHost};

/// Where a recorded build stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    /// Accepted, not finished yet (queued or building).
    Running,
    /// Every host succeeded.
    Success,
    /// A host, or the request itself, failed.
    Failed,
    /// Cancelled, or the builder stopped without finishing it.
    Cancelled,
}

impl RecordStatus {
    /// The status as the API and the database spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The status spelled `text`, if any.
    pub fn parse(text: &str) -> Option<Self> {
        [Self::Running, Self::Success, Self::Failed, Self::Cancelled]
            .into_iter()
            .find(|status| status.as_str() == text)
    }
}

impl From<crate::protocol::BuildStatus> for RecordStatus {
    fn from(status: crate::protocol::BuildStatus) -> Self {
        use crate::protocol::BuildStatus;
        match status {
            BuildStatus::Success => Self::Success,
            BuildStatus::Failed => Self::Failed,
            BuildStatus::Cancelled => Self::Cancelled,
        }
    }
}

/// A build as `GET /api/v1/builds/<build_id>` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub build_id: String,
    pub repo: String,
    pub target: String,
    /// The ref asked for, else the repo's default; `null`: the remote's
    /// default branch.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The commit built (`null` until pinned).
    pub rev: Option<String>,
    /// The NKey public key that signed the request (`null`: unsigned).
    pub owner: Option<String>,
    pub status: RecordStatus,
    /// Why the request failed or was cancelled, as `finished` said.
    pub error: Option<ErrorBody>,
    /// RFC 3339 times.
    pub accepted_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// From `accepted` to `finished`, as `finished` said.
    pub duration_ms: Option<u64>,
    /// Every host finished so far, in the order they finished.
    pub hosts: Vec<HostRecord>,
    /// Hosts of `all` that were not built, and why.
    pub skipped: Vec<SkippedHost>,
}

/// One host of a recorded build: its `host_finished`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host: String,
    pub status: HostStatus,
    pub duration_ms: u64,
    pub out_path: Option<String>,
    /// The output was already in the store; nothing was built.
    pub cached: bool,
    /// Derivations built on each machine (credentials masked).
    pub machines: BTreeMap<String, u64>,
    /// The closure's size in bytes, when the builder measured it.
    pub closure_size: Option<u64>,
    /// Its change against the result compared with.
    pub closure_size_delta: Option<i64>,
    /// What changed against the host's result on the default ref.
    pub changes: Option<Changes>,
    /// Why it failed; the message is the end of what Nix said.
    pub error: Option<ErrorBody>,
    /// RFC 3339.
    pub finished_at: String,
}

/// A build in `GET /api/v1/builds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildSummary {
    pub build_id: String,
    pub repo: String,
    pub target: String,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub rev: Option<String>,
    pub status: RecordStatus,
    pub accepted_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub hosts: Vec<HostState>,
}

/// A host's name and outcome within a [`BuildSummary`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    pub host: String,
    pub status: HostStatus,
}

/// One build of a host in `GET /api/v1/hosts/<repo>/<host>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostHistoryEntry {
    pub build_id: String,
    pub rev: Option<String>,
    pub status: HostStatus,
    /// RFC 3339: when the host finished.
    pub finished_at: String,
    pub duration_ms: u64,
    pub out_path: Option<String>,
    pub closure_size: Option<u64>,
    pub changes: Option<Changes>,
    pub error: Option<ErrorBody>,
}

/// A host's latest result, as the index page lists it per repo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestHost {
    pub repo: String,
    pub host: String,
    pub status: HostStatus,
    /// RFC 3339: when the host finished.
    pub finished_at: String,
    pub rev: Option<String>,
    /// The build it came from, when history has it.
    pub build_id: Option<String>,
    pub closure_size: Option<u64>,
    /// Packages whose versions changed against the result compared with.
    pub changed_packages: Option<usize>,
}
