//! Status badges (`/badge/<repo>/<host>.svg`, `/badge/<repo>.svg`).

use crate::protocol::HostStatus;

/// A badge reading `label | status`; `None`: no result yet.
pub fn badge(_label: &str, _status: Option<HostStatus>) -> String {
    String::new()
}
