//! Waiting with a deadline: polling that awaits between checks, so the
//! runtime keeps running what the test waits for.

use std::time::Duration;

use tokio::time::Instant;

/// Longest any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `condition` until it holds or `timeout` passes; panics with `what`.
pub async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `probe` until what it returns is `done`, for at most [`WAIT`];
/// returns that value, or panics with `what` and the last value seen.
pub async fn poll<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = probe().await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
