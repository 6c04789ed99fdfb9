//! systemd integration: readiness, stopping and watchdog notifications
//! (`Type=notify`, `WatchdogSec=`). Without `NOTIFY_SOCKET` these do nothing.

use std::time::Duration;

use sd_notify::NotifyState;

fn notify(state: NotifyState<'_>) {
    if let Err(err) = sd_notify::notify(&[state]) {
        tracing::warn!(%err, "cannot notify systemd");
    }
}

/// The service is up: serving, and subscribed unless NATS is unreachable
/// (the status says which).
pub fn ready() {
    notify(NotifyState::Ready);
}

/// The service is shutting down.
pub fn stopping() {
    notify(NotifyState::Stopping);
}

/// The service is alive (send at [`watchdog_interval`]).
pub fn watchdog() {
    notify(NotifyState::Watchdog);
}

/// How often to ping the watchdog: half its timeout, if it is enabled.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// A one-line status that `systemctl status` shows.
pub fn status(text: &str) {
    notify(NotifyState::Status(text));
}
