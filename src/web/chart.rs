//! The closure size of a host over time, as inline SVG.

use crate::history::HostHistoryEntry;

/// An SVG line chart of `entries`' closure sizes (newest first, as the
/// host page lists them); `None` when fewer than one has a size.
pub fn closure_size_chart(_entries: &[HostHistoryEntry]) -> Option<String> {
    None
}
