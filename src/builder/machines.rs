//! Checking the remote builders of the builder's Nix: which machines its
//! `builders` setting names, and whether each answers `nix store ping`,
//! at most once a minute, one machine after the other, each bounded.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::monitor::Monitor;
use super::step::{self, StepFailure};
use crate::nix::NixCli;
use crate::nix::machines::{Machine, builders_setting, machine_uris, read_machines_file};
use crate::nix::process::Limits;
use crate::redact::redact;

/// How often the machines are checked (`machine_up`, `build.status`).
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(60);
/// How long one check may take before the machine counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// Checks the machines every [`CHECK_EVERY`] until `stop` fires.
pub(crate) async fn check_machines(nix: NixCli, monitor: Arc<Monitor>, stop: CancellationToken) {
    loop {
        let machines = configured(&nix, &stop).await;
        let names: Vec<String> = machines
            .iter()
            .map(|m| redact(&m.uri).into_owned())
            .collect();
        monitor.machines_configured(&names);
        for (machine, name) in machines.iter().zip(&names) {
            if stop.is_cancelled() {
                return;
            }
            let error = ping(&nix, &machine.check_uri, &stop).await;
            if let Some(reason) = &error {
                tracing::warn!(machine = %name, error = %reason, "remote builder unreachable");
            }
            monitor.machine_checked(name, error);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// The machines Nix would build on now.
async fn configured(nix: &NixCli, stop: &CancellationToken) -> Vec<Machine> {
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let shown = step::run_quiet(&nix.show_config(), Limits::deadline(deadline), stop).await;
    let builders = shown.ok().and_then(|stdout| builders_setting(&stdout));
    let Some(builders) = builders else {
        tracing::warn!("cannot read Nix's `builders` setting; remote builders are not checked");
        return Vec::new();
    };
    let builders = builders.clone();
    tokio::task::spawn_blocking(move || machine_uris(&builders, read_machines_file))
        .await
        .unwrap_or_default()
}

/// `None` when the machine answered, else why not.
async fn ping(nix: &NixCli, uri: &str, stop: &CancellationToken) -> Option<String> {
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let pinged = step::run_quiet(&nix.ping_store(uri), Limits::deadline(deadline), stop).await;
    match pinged.err()? {
        StepFailure::Exited { status, error } if error.is_empty() => {
            Some(format!("nix store ping exited with {status}"))
        }
        StepFailure::Exited { error, .. } => Some(redact(&error).into_owned()),
        StepFailure::TimedOut { .. } | StepFailure::Silent { .. } => Some(format!(
            "no answer within {}",
            humantime::format_duration(CHECK_TIMEOUT)
        )),
        StepFailure::Cancelled => Some("check cancelled".to_owned()),
        StepFailure::Spawn(why) => Some(why),
    }
}
