//! What operators see: the running build, the queue, every host's last
//! result (for `build.status`), the metrics, and health. Optionally kept in
//! a state file so "last successful build" survives a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::cancel::{self, Cancellation};
use super::queue::{Queue, Take};
use super::request::Job;
use crate::config::Config;
use crate::metrics::{Exporter, Health, Metrics};
use crate::nats::ConnectionState;
use crate::protocol::{
    BuildStatus, BuilderStatus, ErrorCode, HostStatus, LastResult, QueuedBuild, RepoInfo,
    RunningBuild, rfc3339,
};

/// The hub the intake, the worker and the jobs report to.
pub(crate) struct Monitor {
    metrics: Metrics,
    repos: Vec<RepoInfo>,
    queue: Arc<Queue<Job>>,
    state: Mutex<State>,
    state_file: Option<PathBuf>,
    nats: watch::Receiver<ConnectionState>,
    worker_alive: AtomicBool,
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    hosts: BTreeMap<(String, String), HostRecord>,
}

struct Running {
    status: RunningBuild,
    since: Instant,
    cancel: Cancellation,
}

/// What is remembered of one host (and, with `state_file`, persisted).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostRecord {
    last: LastResult,
    /// Unix time of the last success, which may be older than `last`.
    last_success: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    hosts: Vec<HostRecord>,
}

impl Monitor {
    /// A monitor for `config`'s repos and the connection whose state is
    /// `nats`, restoring `state_file` if there is one.
    pub(crate) fn new(
        config: &Config,
        queue: Arc<Queue<Job>>,
        nats: watch::Receiver<ConnectionState>,
    ) -> Result<Self, crate::metrics::MetricsError> {
        let metrics = Metrics::new(config.repos.keys().map(String::as_str))?;
        let monitor = Self {
            metrics,
            repos: config
                .repos
                .iter()
                .map(|(name, repo)| RepoInfo {
                    name: name.clone(),
                    git_ref: repo.git_ref.clone(),
                })
                .collect(),
            queue,
            state: Mutex::new(State::default()),
            state_file: config.builder.state_file.clone(),
            nats,
            worker_alive: AtomicBool::new(false),
        };
        monitor.restore(config);
        Ok(monitor)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    fn nats_connected(&self) -> bool {
        self.nats.borrow().connected
    }

    /// The worker started or stopped.
    pub(crate) fn worker_running(&self, alive: bool) {
        self.worker_alive.store(alive, Ordering::Relaxed);
    }

    /// A request was refused with `code`.
    pub(crate) fn rejected(&self, code: ErrorCode) {
        self.metrics
            .rejected
            .with_label_values(&[code.as_str()])
            .inc();
    }

    /// A request was given no answer, for `reason` (one of
    /// [`crate::metrics::IGNORE_REASONS`]).
    pub(crate) fn ignored(&self, reason: &str) {
        self.metrics.ignored.with_label_values(&[reason]).inc();
    }

    /// A request starts running; `cancel` stops it.
    pub(crate) fn build_started(&self, job: &Job, cancel: Cancellation) {
        self.lock().running = Some(Running {
            status: RunningBuild {
                build_id: job.build_id.clone(),
                repo: job.repo.clone(),
                target: job.target.to_string(),
                git_ref: job.git_ref.clone(),
                owner: job.owner.clone(),
                host: None,
                index: None,
                total: None,
                started_at: rfc3339(SystemTime::now()),
            },
            since: Instant::now(),
            cancel,
        });
    }

    /// Cancels the running request if it is `build_id` and `allow` lets
    /// its owner's build go.
    pub(crate) fn cancel_running(
        &self,
        build_id: &str,
        allow: impl FnOnce(Option<&str>) -> bool,
    ) -> Take<()> {
        match &self.lock().running {
            Some(running) if running.status.build_id == build_id => {
                if !allow(running.status.owner.as_deref()) {
                    return Take::Refused;
                }
                running.cancel.cancel(cancel::BY_REQUEST);
                Take::Taken(())
            }
            _ => Take::Missing,
        }
    }

    /// The running request moved on to `host`.
    pub(crate) fn host_started(&self, host: &str, index: usize, total: usize) {
        if let Some(running) = self.lock().running.as_mut() {
            running.status.host = Some(host.to_owned());
            running.status.index = Some(index);
            running.status.total = Some(total);
        }
    }

    /// A host finished.
    pub(crate) fn host_finished(
        &self,
        repo: &str,
        host: &str,
        status: HostStatus,
        duration: Duration,
        rev: Option<&str>,
        out_path: Option<&str>,
    ) {
        let now = SystemTime::now();
        let unix = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.metrics
            .host_finished(repo, host, status, duration.as_secs_f64(), unix);
        let snapshot = {
            let mut state = self.lock();
            let key = (repo.to_owned(), host.to_owned());
            let last_success = match status {
                HostStatus::Success => Some(unix),
                _ => state.hosts.get(&key).and_then(|r| r.last_success),
            };
            state.hosts.insert(
                key,
                HostRecord {
                    last: LastResult {
                        repo: repo.to_owned(),
                        host: host.to_owned(),
                        status,
                        rev: rev.map(str::to_owned),
                        out_path: out_path.map(str::to_owned),
                        finished_at: rfc3339(now),
                    },
                    last_success,
                },
            );
            state.hosts.values().cloned().collect::<Vec<_>>()
        };
        self.save(snapshot);
    }

    /// A request finished (ran, or was cancelled while it waited).
    pub(crate) fn build_finished(
        &self,
        build_id: &str,
        repo: &str,
        status: BuildStatus,
        duration: Duration,
    ) {
        self.metrics
            .build_finished(repo, status, duration.as_secs_f64());
        let mut state = self.lock();
        if state
            .running
            .as_ref()
            .is_some_and(|r| r.status.build_id == build_id)
        {
            state.running = None;
        }
    }

    /// The `build.status` report.
    pub(crate) fn status(&self) -> BuilderStatus {
        let queue = self.queue.snapshot(|job| QueuedBuild {
            build_id: job.build_id.clone(),
            repo: job.repo.clone(),
            target: job.target.to_string(),
            git_ref: job.git_ref.clone(),
            owner: job.owner.clone(),
            queued_at: rfc3339(job.received_at),
        });
        let state = self.lock();
        BuilderStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            repos: self.repos.clone(),
            running: state.running.as_ref().map(|r| r.status.clone()),
            queue,
            last_results: state.hosts.values().map(|r| r.last.clone()).collect(),
        }
    }

    fn restore(&self, config: &Config) {
        let Some(path) = &self.state_file else {
            return;
        };
        let stored: StateFile = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(stored) => stored,
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "ignoring an unreadable state file");
                    return;
                }
            },
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cannot read the state file");
                return;
            }
        };
        let mut state = self.lock();
        for record in stored.hosts {
            // Repos that left the config are forgotten, keeping labels bounded.
            if !config.repos.contains_key(&record.last.repo) {
                continue;
            }
            if let Some(unix) = record.last_success {
                self.metrics
                    .host_last_success
                    .with_label_values(&[&record.last.repo, &record.last.host])
                    .set(unix);
            }
            state
                .hosts
                .insert((record.last.repo.clone(), record.last.host.clone()), record);
        }
        tracing::info!(hosts = state.hosts.len(), path = %path.display(), "restored host results");
    }

    fn save(&self, hosts: Vec<HostRecord>) {
        let Some(path) = &self.state_file else {
            return;
        };
        if let Err(err) = write_atomically(path, &StateFile { version: 1, hosts }) {
            tracing::warn!(path = %path.display(), %err, "cannot write the state file");
        }
    }
}

fn write_atomically(path: &Path, state: &StateFile) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

impl Exporter for Monitor {
    fn metrics(&self) -> String {
        let metrics = &self.metrics;
        metrics
            .queue_length
            .set(i64::try_from(self.queue.waiting()).unwrap_or(i64::MAX));
        let age = self.lock().running.as_ref().map(|r| r.since.elapsed());
        metrics.build_in_progress.set(i64::from(age.is_some()));
        metrics
            .oldest_active_age
            .set(age.map_or(0.0, |a| a.as_secs_f64()));
        let nats = *self.nats.borrow();
        metrics.nats_connected.set(i64::from(nats.connected));
        // Every connection after the first is a reconnection.
        let reconnects = nats.connects.saturating_sub(1);
        let counted = metrics.nats_reconnects.get();
        if reconnects > counted {
            metrics.nats_reconnects.inc_by(reconnects - counted);
        }
        metrics.render()
    }

    fn health(&self) -> Health {
        Health {
            nats_connected: self.nats_connected(),
            worker_alive: self.worker_alive.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A restart must restore the very timestamps it saved: the
        /// last-success metric is compared across restarts.
        #[test]
        fn state_file_timestamps_survive_a_round_trip(unix in 1.0e9f64..4.0e9) {
            let record = HostRecord {
                last: LastResult {
                    repo: "homelab".to_owned(),
                    host: "ns1".to_owned(),
                    status: HostStatus::Success,
                    rev: None,
                    out_path: None,
                    finished_at: "2026-11-28T00:00:00Z".to_owned(),
                },
                last_success: Some(unix),
            };
            let bytes = serde_json::to_vec(&StateFile { version: 1, hosts: vec![record] }).unwrap();
            let restored: StateFile = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(restored.hosts[0].last_success, Some(unix));
        }
    }
}
