//! Server-rendered pages: `/`, `/builds/<id>`, `/hosts/<repo>/<host>`.

use crate::history::{BuildRecord, BuildSummary, HostHistoryEntry, LatestHost};
use crate::protocol::BuilderStatus;

/// `/`: the build running now, the queue, every host's latest result per
/// repo, and recent builds.
pub fn index(_status: &BuilderStatus, _latest: &[LatestHost], _recent: &[BuildSummary]) -> String {
    String::new()
}

/// `/builds/<build_id>`.
pub fn build(_record: &BuildRecord) -> String {
    String::new()
}

/// `/hosts/<repo>/<host>`: newest first.
pub fn host(_repo: &str, _host: &str, _entries: &[HostHistoryEntry]) -> String {
    String::new()
}

/// A page for a missing build or host.
pub fn not_found(_what: &str) -> String {
    String::new()
}
