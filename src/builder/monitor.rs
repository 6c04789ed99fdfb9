//! What operators see: the running build, the queue, every host's last
//! result (for `build.status`), the metrics, and health. Optionally kept in
//! a state file so "last successful build" survives a restart; the file is
//! written by a thread of its own, atomically (write, fsync, rename), so a
//! slow disk never holds up the async runtime and a crash never leaves half
//! a file.
//!
//! Results of the repo's default ref are kept per host for good and feed
//! the per-host metrics; results of other refs and of explicit revs are
//! kept per ref as well, go with their roots (`side_roots_ttl`, or evicted
//! past `side_roots_max`) and never become metric series, so no requester
//! can grow either without bound.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::cancel::{Cancellation, StopReason};
use super::journal::Journaling;
use super::memory::{self, MemoryBudget};
use super::queue::Queue;
use super::request::Job;
use super::roots::Lineage;
use crate::atomic_file;
use crate::config::Config;
use crate::metrics::{Exporter, Health, Metrics};
use crate::nats::ConnectionState;
use crate::nix::log::LOCALHOST;
use crate::protocol::{
    BuildStatus, BuilderStatus, ErrorCode, HostStatus, LastResult, MachineStatus, QueuedBuild,
    RepoInfo, RunningBuild, RunningHost, rfc3339,
};

/// The hub the intake, the worker and the jobs report to.
pub(crate) struct Monitor {
    metrics: Metrics,
    repos: Vec<RepoInfo>,
    /// The status page's address, told in `build.status`.
    web_url: Option<String>,
    /// The builder's name, told in `build.status`.
    name: Option<String>,
    queue: Arc<Queue<Job>>,
    state: Mutex<State>,
    state_file: Option<PathBuf>,
    writer: Option<StateWriter>,
    nats: watch::Receiver<ConnectionState>,
    worker_alive: AtomicBool,
    journal: Journaling,
    /// The evaluators' shared memory budget.
    memory: Arc<MemoryBudget>,
    /// What an evaluation never measured in its repo is expected to need.
    eval_estimate: u64,
}

/// Remote machines given metric series at most: more than a homelab
/// configures.
const MAX_MACHINE_SERIES: usize = 64;

/// Side results kept at most, whatever their age: the oldest go first.
const MAX_SIDE_RECORDS: usize = 4096;

#[derive(Default)]
struct State {
    running: Option<Running>,
    /// By repo, host and lineage key (empty for the default ref).
    hosts: BTreeMap<(String, String, String), HostRecord>,
    /// Remote machines with a metric series.
    machine_series: BTreeSet<String>,
    /// The configured remote builders and their last check.
    machines: Vec<MachineStatus>,
    /// The learned peak of each host's evaluation, by repo and host.
    eval_peaks: BTreeMap<(String, String), u64>,
}

struct Running {
    status: RunningBuild,
    since: Instant,
    cancel: Cancellation,
    /// Every host is done: a cancel now is too late.
    settled: bool,
}

/// One host's result, as the monitor keeps it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostResult<'a> {
    pub(crate) repo: &'a str,
    pub(crate) host: &'a str,
    /// The ref the request built (kept for side results only).
    pub(crate) git_ref: Option<&'a str>,
    /// Whether the request named an exact rev.
    pub(crate) pinned: bool,
    /// Which roots the result joins: the default ref's or a side lineage.
    pub(crate) lineage: &'a Lineage,
    pub(crate) status: HostStatus,
    pub(crate) duration: Duration,
    /// The commit the request was pinned at.
    pub(crate) rev: Option<&'a str>,
    pub(crate) out_path: Option<&'a str>,
}

/// What a `build.cancel` for the running build did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunningCancel {
    /// It was stopped.
    Cancelled,
    /// Every host was done already; it ends with its own result.
    TooLate,
    /// The signer may not cancel it (see `request::may_cancel`).
    Refused,
    /// No running build has that id.
    NotRunning,
}

/// What is remembered of one host (and, with `state_file`, persisted).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostRecord {
    last: LastResult,
    /// Unix time of the last success, which may be older than `last`.
    last_success: Option<f64>,
    /// The lineage key of a side ref's result (`ref-…`, `rev-…`); absent
    /// for the default ref.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    side: Option<String>,
    /// Unix time of `last`.
    #[serde(default)]
    finished: f64,
}

impl HostRecord {
    fn key(&self) -> (String, String, String) {
        (
            self.last.repo.clone(),
            self.last.host.clone(),
            self.side.clone().unwrap_or_default(),
        )
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    hosts: Vec<HostRecord>,
    /// The learned peak of each host's evaluation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    eval_peaks: Vec<EvalPeak>,
}

/// How much memory a host's evaluation took, at its peak, last time.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EvalPeak {
    repo: String,
    host: String,
    bytes: u64,
}

impl Monitor {
    /// A monitor for `config`'s repos and the connection whose state is
    /// `nats`, restoring `state_file` if there is one.
    pub(crate) fn new(
        config: &Config,
        queue: Arc<Queue<Job>>,
        nats: watch::Receiver<ConnectionState>,
        journal: Journaling,
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
            web_url: None,
            name: Some(config.builder.display_name()),
            queue,
            state: Mutex::new(State::default()),
            writer: config.builder.state_file.clone().map(StateWriter::start),
            state_file: config.builder.state_file.clone(),
            nats,
            worker_alive: AtomicBool::new(false),
            journal,
            memory: MemoryBudget::new(memory::budget_bytes(config.builder.eval_memory_budget)),
            eval_estimate: config.builder.eval_memory_estimate.0,
        };
        monitor
            .metrics
            .eval_memory_budget
            .set(i64::try_from(monitor.memory.total()).unwrap_or(i64::MAX));
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

    /// An event was not recorded in the history.
    pub(crate) fn history_write_failed(&self) {
        self.metrics.history_write_failures.inc();
    }

    /// A request starts running; `cancel` stops it.
    pub(crate) fn build_started(&self, job: &Job, cancel: Cancellation) {
        self.lock().running = Some(Running {
            status: RunningBuild {
                rev: None,
                build_id: job.build_id.clone(),
                repo: job.repo.clone(),
                target: job.target.to_string(),
                git_ref: job.git_ref.clone(),
                owner: job.owner.clone(),
                resumed: job.resume.is_some(),
                hosts: Vec::new(),
                finished: 0,
                waiting_for_memory: Vec::new(),
                total: None,
                started_at: rfc3339(SystemTime::now()),
            },
            since: Instant::now(),
            cancel,
            settled: false,
        });
    }

    /// Cancels the running request if it is `build_id`, `allow` lets its
    /// owner's build go, and it still has hosts to finish.
    pub(crate) fn cancel_running(
        &self,
        build_id: &str,
        allow: impl FnOnce(Option<&str>) -> bool,
    ) -> RunningCancel {
        match &self.lock().running {
            Some(running) if running.status.build_id == build_id => {
                if !allow(running.status.owner.as_deref()) {
                    RunningCancel::Refused
                } else if running.settled {
                    RunningCancel::TooLate
                } else {
                    running.cancel.cancel(StopReason::ByRequest);
                    RunningCancel::Cancelled
                }
            }
            _ => RunningCancel::NotRunning,
        }
    }

    /// The running request `build_id` has finished its last host: from now
    /// on a cancel is answered as too late. Returns whether `cancel` fired
    /// before (then the request ends cancelled, as its canceller was told).
    pub(crate) fn settle(&self, build_id: &str, cancel: &Cancellation) -> bool {
        let mut state = self.lock();
        if let Some(running) = state
            .running
            .as_mut()
            .filter(|r| r.status.build_id == build_id)
        {
            running.settled = true;
        }
        cancel.is_cancelled()
    }

    /// The running request started `host`, its `index`-th (from 1) of
    /// `total`; it stays among the hosts building until it finishes.
    pub(crate) fn host_started(&self, host: &str, index: usize, total: usize) {
        if let Some(running) = self.lock().running.as_mut() {
            let hosts = &mut running.status.hosts;
            hosts.retain(|h| h.host != host);
            let at = hosts.partition_point(|h| h.index < index);
            hosts.insert(
                at,
                RunningHost {
                    host: host.to_owned(),
                    index,
                    done: 0,
                    expected: 0,
                },
            );
            running.status.total = Some(total);
        }
    }

    /// The running request `build_id` builds `rev` (its flake is pinned).
    pub(crate) fn build_pinned(&self, build_id: &str, rev: Option<&str>) {
        if let Some(running) = self.lock().running.as_mut() {
            if running.status.build_id == build_id {
                running.status.rev = rev.map(str::to_owned);
            }
        }
    }

    /// `host` of the running request waits for room in the evaluators'
    /// memory budget (`waiting`), or no longer.
    pub(crate) fn waiting_for_memory(&self, host: &str, waiting: bool) {
        if let Some(running) = self.lock().running.as_mut() {
            let hosts = &mut running.status.waiting_for_memory;
            hosts.retain(|h| h != host);
            if waiting {
                hosts.push(host.to_owned());
            }
        }
    }

    /// Whether `host` of the running request waits for memory.
    pub(crate) fn is_waiting_for_memory(&self, host: &str) -> bool {
        self.lock()
            .running
            .as_ref()
            .is_some_and(|r| r.status.waiting_for_memory.iter().any(|h| h == host))
    }

    /// A building host's progress, as its last `progress` event said.
    pub(crate) fn host_progress(&self, host: &str, done: u64, expected: u64) {
        if let Some(running) = self.lock().running.as_mut() {
            if let Some(building) = running.status.hosts.iter_mut().find(|h| h.host == host) {
                building.done = done;
                building.expected = expected;
            }
        }
    }

    /// `host` of the running request is no longer building.
    fn host_done(&self, host: &str) {
        if let Some(running) = self.lock().running.as_mut() {
            let before = running.status.hosts.len();
            running.status.hosts.retain(|h| h.host != host);
            running.status.finished += before - running.status.hosts.len();
        }
    }

    /// Counts derivations Nix built on remote machines. The names come
    /// from Nix's log, so from the machines configured for it; at most
    /// [`MAX_MACHINE_SERIES`] series are made all the same.
    pub(crate) fn derivations_built(&self, machines: &BTreeMap<String, u64>) {
        let counter = &self.metrics.remote_builds;
        for (machine, count) in machines {
            if machine == LOCALHOST {
                continue;
            }
            let mut state = self.lock();
            if !state.machine_series.contains(machine) {
                if state.machine_series.len() >= MAX_MACHINE_SERIES {
                    continue;
                }
                state.machine_series.insert(machine.clone());
            }
            counter
                .with_label_values(&[machine.as_str()])
                .inc_by(*count);
        }
    }

    /// A host finished. Only the default ref's results become metric
    /// series.
    pub(crate) fn host_finished(&self, result: &HostResult<'_>) {
        let HostResult {
            repo,
            host,
            git_ref,
            pinned,
            lineage,
            status,
            duration,
            rev,
            out_path,
        } = *result;
        self.host_done(host);
        let now = SystemTime::now();
        let unix = unix_time(now);
        let side = match lineage {
            Lineage::Default => {
                self.metrics
                    .host_finished(repo, host, status, duration.as_secs_f64(), unix);
                None
            }
            Lineage::Side(key) => Some(key.clone()),
        };
        let snapshot = {
            let mut state = self.lock();
            let key = (
                repo.to_owned(),
                host.to_owned(),
                side.clone().unwrap_or_default(),
            );
            let last_success = match status {
                HostStatus::Success => Some(unix),
                _ => state.hosts.get(&key).and_then(|r| r.last_success),
            };
            let is_side = side.is_some();
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
                        git_ref: if is_side {
                            git_ref.map(str::to_owned)
                        } else {
                            None
                        },
                        pinned: is_side && pinned,
                    },
                    last_success,
                    side,
                    finished: unix,
                },
            );
            if is_side {
                bound_side_records(&mut state.hosts);
            }
            state.hosts.values().cloned().collect::<Vec<_>>()
        };
        self.save(snapshot);
    }

    /// Forgets side results older than `ttl` (their roots go with them).
    pub(crate) fn expire_side_results(&self, ttl: Duration) {
        let horizon = unix_time(SystemTime::now()) - ttl.as_secs_f64();
        let snapshot = {
            let mut state = self.lock();
            let before = state.hosts.len();
            state
                .hosts
                .retain(|_, record| record.side.is_none() || record.finished > horizon);
            if state.hosts.len() == before {
                return;
            }
            state.hosts.values().cloned().collect::<Vec<_>>()
        };
        self.save(snapshot);
    }

    /// Forgets the side results of `repo`'s lineages `keys`, whose roots
    /// were evicted to keep `side_roots_max`.
    pub(crate) fn forget_side_results(&self, repo: &str, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        let snapshot = {
            let mut state = self.lock();
            let before = state.hosts.len();
            state
                .hosts
                .retain(|(r, _, side), _| r != repo || !keys.contains(side));
            if state.hosts.len() == before {
                return;
            }
            state.hosts.values().cloned().collect::<Vec<_>>()
        };
        self.save(snapshot);
    }

    /// Waits until the state file holds everything saved so far.
    pub(crate) fn flush_state(&self) {
        if let Some(writer) = &self.writer {
            writer.flush();
        }
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
        self.not_running(build_id);
    }

    /// The running request stopped to resume at the next start: not a
    /// finished build.
    pub(crate) fn build_interrupted(&self, build_id: &str) {
        self.not_running(build_id);
    }

    fn not_running(&self, build_id: &str) {
        let mut state = self.lock();
        if state
            .running
            .as_ref()
            .is_some_and(|r| r.status.build_id == build_id)
        {
            state.running = None;
        }
    }

    /// The rev of `repo`/`host`'s default-ref result, if that result is
    /// `out_path`.
    pub(crate) fn default_rev(&self, repo: &str, host: &str, out_path: &str) -> Option<String> {
        let state = self.lock();
        let record = state
            .hosts
            .get(&(repo.to_owned(), host.to_owned(), String::new()))?;
        (record.last.out_path.as_deref() == Some(out_path))
            .then(|| record.last.rev.clone())
            .flatten()
    }

    /// The closure size of `repo`/`host`'s new default-ref result.
    pub(crate) fn closure_size(&self, repo: &str, host: &str, bytes: u64) {
        self.metrics.set_host_closure_size(repo, host, bytes);
    }

    /// A request from the journal was queued again.
    pub(crate) fn resumed(&self) {
        self.metrics.resumed_requests.inc();
    }

    /// The same monitor, telling `url` as the status page's address.
    pub(crate) fn with_web_url(mut self, url: Option<String>) -> Self {
        self.web_url = url;
        self
    }

    /// The `build.status` report.
    pub(crate) fn status(&self) -> BuilderStatus {
        let queue = self.queue.snapshot(|job| QueuedBuild {
            build_id: job.build_id.clone(),
            repo: job.repo.clone(),
            target: job.target.to_string(),
            git_ref: job.git_ref.clone(),
            owner: job.owner.clone(),
            resumed: job.resume.is_some(),
            queued_at: rfc3339(job.received_at),
        });
        let state = self.lock();
        BuilderStatus {
            builder: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            repos: self.repos.clone(),
            running: state.running.as_ref().map(|r| r.status.clone()),
            queue,
            last_results: state.hosts.values().map(|r| r.last.clone()).collect(),
            machines: state.machines.clone(),
            omitted_results: 0,
            web_url: self.web_url.clone(),
        }
    }

    /// The remote builders configured now; those no longer configured are
    /// forgotten (their `machine_up` series too).
    pub(crate) fn machines_configured(&self, machines: &[String]) {
        let mut state = self.lock();
        state.machines.retain(|m| {
            let keep = machines.contains(&m.machine);
            if !keep {
                let _ = self.metrics.machine_up.remove_label_values(&[&m.machine]);
            }
            keep
        });
        for machine in machines {
            if !state.machines.iter().any(|m| &m.machine == machine) {
                state.machines.push(MachineStatus {
                    machine: machine.clone(),
                    up: None,
                    checked_at: None,
                    error: None,
                });
            }
        }
    }

    /// A remote builder was checked: `error` is why it could not be reached.
    pub(crate) fn machine_checked(&self, machine: &str, error: Option<String>) {
        let up = error.is_none();
        self.metrics
            .machine_up
            .with_label_values(&[machine])
            .set(i64::from(up));
        let mut state = self.lock();
        if let Some(status) = state.machines.iter_mut().find(|m| m.machine == machine) {
            status.up = Some(up);
            status.checked_at = Some(rfc3339(SystemTime::now()));
            status.error = error;
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
            if let (Some(unix), None) = (record.last_success, &record.side) {
                self.metrics
                    .host_last_success
                    .with_label_values(&[&record.last.repo, &record.last.host])
                    .set(unix);
            }
            state.hosts.insert(record.key(), record);
        }
        bound_side_records(&mut state.hosts);
        for peak in stored.eval_peaks {
            if !config.repos.contains_key(&peak.repo) {
                continue;
            }
            self.metrics
                .eval_host_peak
                .with_label_values(&[&peak.repo, &peak.host])
                .set(i64::try_from(peak.bytes).unwrap_or(i64::MAX));
            state.eval_peaks.insert((peak.repo, peak.host), peak.bytes);
        }
        tracing::info!(hosts = state.hosts.len(), path = %path.display(), "restored host results");
    }

    fn save(&self, hosts: Vec<HostRecord>) {
        if let Some(writer) = &self.writer {
            let eval_peaks = self
                .lock()
                .eval_peaks
                .iter()
                .map(|((repo, host), bytes)| EvalPeak {
                    repo: repo.clone(),
                    host: host.clone(),
                    bytes: *bytes,
                })
                .collect();
            writer.save(StateFile {
                version: 1,
                hosts,
                eval_peaks,
            });
        }
    }

    /// The evaluators' shared memory budget.
    pub(crate) fn memory_budget(&self) -> Arc<MemoryBudget> {
        Arc::clone(&self.memory)
    }

    /// What evaluating `repo`'s `host` is expected to need: its learned
    /// peak, else the largest learned in its repo, else the configured
    /// estimate.
    pub(crate) fn expected_eval_peak(&self, repo: &str, host: &str) -> u64 {
        let state = self.lock();
        let key = (repo.to_owned(), host.to_owned());
        state.eval_peaks.get(&key).copied().unwrap_or_else(|| {
            state
                .eval_peaks
                .iter()
                .filter(|((r, _), _)| r == repo)
                .map(|(_, bytes)| *bytes)
                .max()
                .unwrap_or(self.eval_estimate)
        })
    }

    /// Learns the peak of an evaluation of `repo`'s `host` (kept in the
    /// state file).
    pub(crate) fn learn_eval_peak(&self, repo: &str, host: &str, bytes: u64) {
        self.metrics
            .eval_host_peak
            .with_label_values(&[repo, host])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let snapshot = {
            let mut state = self.lock();
            state
                .eval_peaks
                .insert((repo.to_owned(), host.to_owned()), bytes);
            state.hosts.values().cloned().collect::<Vec<_>>()
        };
        self.save(snapshot);
    }

    /// An evaluator process was stopped before its hosts were done, for
    /// `reason` (one of [`crate::metrics::EVAL_RESTART_REASONS`]).
    pub(crate) fn eval_restarted(&self, reason: &str) {
        self.metrics
            .eval_restarts
            .with_label_values(&[reason])
            .inc();
    }
}

fn unix_time(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Drops the oldest side results beyond [`MAX_SIDE_RECORDS`].
fn bound_side_records(hosts: &mut BTreeMap<(String, String, String), HostRecord>) {
    let mut sides: Vec<(f64, (String, String, String))> = hosts
        .iter()
        .filter(|(_, record)| record.side.is_some())
        .map(|(key, record)| (record.finished, key.clone()))
        .collect();
    if sides.len() <= MAX_SIDE_RECORDS {
        return;
    }
    sides.sort_by(|a, b| a.0.total_cmp(&b.0));
    let excess = sides.len() - MAX_SIDE_RECORDS;
    for (_, key) in sides.into_iter().take(excess) {
        hosts.remove(&key);
    }
}

/// What the state file's thread is asked to do.
enum WriterMessage {
    Save(StateFile),
    /// Answer once everything before is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The thread that writes the state file: only the newest snapshot waiting
/// is written, so a burst of results costs one write.
struct StateWriter {
    sender: Mutex<std::sync::mpsc::Sender<WriterMessage>>,
}

impl StateWriter {
    fn start(path: PathBuf) -> Self {
        let (sender, receiver) = std::sync::mpsc::channel::<WriterMessage>();
        let spawned = std::thread::Builder::new()
            .name("state-file".to_owned())
            .spawn(move || {
                while let Ok(message) = receiver.recv() {
                    let mut newest = None;
                    let mut waiting = Vec::new();
                    for message in std::iter::once(message).chain(receiver.try_iter()) {
                        match message {
                            WriterMessage::Save(state) => newest = Some(state),
                            WriterMessage::Flush(done) => waiting.push(done),
                        }
                    }
                    if let Some(state) = newest {
                        if let Err(err) = write_atomically(&path, &state) {
                            tracing::warn!(path = %path.display(), %err, "cannot write the state file");
                        }
                    }
                    for done in waiting {
                        let _ = done.send(());
                    }
                }
            });
        if let Err(err) = &spawned {
            tracing::warn!(%err, "cannot start the state file's writer; results are not kept");
        }
        Self {
            sender: Mutex::new(sender),
        }
    }

    fn save(&self, state: StateFile) {
        let _ = crate::sync::lock(&self.sender).send(WriterMessage::Save(state));
    }

    fn flush(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        if crate::sync::lock(&self.sender)
            .send(WriterMessage::Flush(done))
            .is_ok()
        {
            let _ = wait.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// Writes `state` over `path` whole (see [`atomic_file::replace`]): after
/// a crash the file is the old one or the new one, never a mix.
fn write_atomically(path: &Path, state: &StateFile) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    atomic_file::replace(path, &bytes)
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
        metrics
            .journal_bytes
            .set(i64::try_from(self.journal.bytes()).unwrap_or(i64::MAX));
        metrics.nats_connected.set(i64::from(nats.connected));
        let bytes = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        metrics
            .eval_memory_reserved
            .set(bytes(self.memory.reserved()));
        metrics.eval_resident.set(bytes(self.memory.resident()));
        metrics
            .eval_waiting_for_memory
            .set(bytes(self.memory.waiting() as u64));
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
                    git_ref: None,
                    pinned: false,
                },
                last_success: Some(unix),
                side: None,
                finished: unix,
            };
            let bytes = serde_json::to_vec(&StateFile { version: 1, hosts: vec![record], eval_peaks: Vec::new() }).unwrap();
            let restored: StateFile = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(restored.hosts[0].last_success, Some(unix));
        }
    }

    #[test]
    fn learned_evaluation_peaks_estimate_new_hosts_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[repos.homelab]\nurl = \"git+file:///srv/h\"\n\
             [builder]\neval_memory_estimate = \"1GiB\"\nstate_file = \"{}\"\n",
            dir.path().join("state.json").display()
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        let monitor = |config: &Config| {
            let queue = Arc::new(Queue::shared(4, 4, |job: &Job| job.owner.clone()));
            let (_, nats) = watch::channel(ConnectionState {
                connected: true,
                connects: 1,
                since: Instant::now(),
            });
            Monitor::new(config, queue, nats, Journaling::default()).unwrap()
        };
        let first = monitor(&config);
        assert_eq!(first.expected_eval_peak("homelab", "ns1"), 1 << 30);
        first.learn_eval_peak("homelab", "ns1", 300 << 20);
        first.learn_eval_peak("homelab", "ns2", 500 << 20);
        assert_eq!(first.expected_eval_peak("homelab", "ns1"), 300 << 20);
        // A host never measured is expected to need the most of its repo.
        assert_eq!(first.expected_eval_peak("homelab", "ns9"), 500 << 20);
        assert_eq!(first.expected_eval_peak("other", "ns1"), 1 << 30);
        first.flush_state();

        let restarted = monitor(&config);
        assert_eq!(restarted.expected_eval_peak("homelab", "ns2"), 500 << 20);
        assert!(
            restarted
                .metrics()
                .contains("homelab_deploy_builder_eval_host_peak_bytes{host=\"ns2\",repo=\"homelab\"} 524288000"),
            "{}",
            restarted.metrics()
        );
    }

    fn side_record(host: &str, finished: f64) -> HostRecord {
        HostRecord {
            last: LastResult {
                repo: "homelab".to_owned(),
                host: host.to_owned(),
                status: HostStatus::Success,
                rev: None,
                out_path: None,
                finished_at: "2026-11-28T00:00:00Z".to_owned(),
                git_ref: Some("flake-update/x".to_owned()),
                pinned: false,
            },
            last_success: Some(finished),
            side: Some("ref-flake-update%2Fx".to_owned()),
            finished,
        }
    }

    #[test]
    fn side_results_are_bounded_oldest_first() {
        let mut hosts = BTreeMap::new();
        for i in 0..MAX_SIDE_RECORDS + 10 {
            let record = side_record(&format!("h{i}"), i as f64);
            hosts.insert(record.key(), record);
        }
        bound_side_records(&mut hosts);
        assert_eq!(hosts.len(), MAX_SIDE_RECORDS);
        assert!(hosts.values().all(|r| r.finished >= 10.0));
    }

    #[test]
    fn state_files_are_replaced_whole_and_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let writer = StateWriter::start(path.clone());
        for i in 0..50 {
            writer.save(StateFile {
                version: 1,
                hosts: vec![side_record("ns1", f64::from(i))],
                eval_peaks: Vec::new(),
            });
        }
        writer.flush();
        let stored: StateFile = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(stored.hosts[0].finished, 49.0);
        assert!(!atomic_file::temporary_path(&path).exists());
        // An old state file (no side, no finished) still reads.
        let old = br#"{"version":1,"hosts":[{"last":{"repo":"r","host":"h","status":"success","rev":null,"out_path":null,"finished_at":"2026-11-28T00:00:00Z"},"last_success":1.0}]}"#;
        let stored: StateFile = serde_json::from_slice(old).unwrap();
        assert!(stored.hosts[0].side.is_none());
    }
}
