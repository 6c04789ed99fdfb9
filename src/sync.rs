//! Locking shared state the same way everywhere.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, taking the data even if a panic poisoned it: every
/// critical section in this crate leaves its data whole (single pushes,
/// pops and field writes), so a poisoned lock holds nothing half updated.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
