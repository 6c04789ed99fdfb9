//! Evaluating a request's hosts ahead of their builds.
//!
//! Builds start in the hosts' order, `parallel_hosts` at a time (one by
//! default: hosts share most of their closure), and evaluation need not
//! wait for them: `eval_workers` lanes each run one Nix evaluator
//! process over a share of the hosts, so the evaluation of what hosts share
//! (nixpkgs, common modules) happens once per process instead of once per
//! host. Each host's result is streamed back as soon as it is known, so host
//! k builds while later hosts still evaluate.
//!
//! Failures stay per host: an evaluation error kills the evaluator process,
//! the host it was on fails with that error, and a fresh process carries on
//! with the lane's remaining hosts. A process whose memory passes
//! `eval_max_memory` is likewise replaced after its current host.
//!
//! All processes together stay within `eval_memory_budget` (see
//! [`super::memory`]): each reserves what its hosts took last time before
//! it starts, its resident memory is sampled while it runs, and one that
//! outgrows what is free is killed at once and its host tried again with
//! more room; a host fails with `eval_out_of_memory` only when it alone
//! passes the whole budget.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cancel::Cancellation;
use super::memory::Reservation;
use super::monitor::Monitor;
use super::request::HostFailure;
use super::roots::RequestRoots;
use super::step::{self, StepFailure};
use crate::nix::NixCli;
use crate::nix::argv::{EVAL_MARKER, is_drv_path};
use crate::nix::log::{ErrorTail, LogEvent, LogParser};
use crate::nix::process::{self, Observer};
use crate::protocol::ErrorCode;
use crate::sync::lock;

/// A host evaluated to its derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Evaluated {
    pub(crate) drv_path: String,
    pub(crate) out_path: String,
}

/// What the evaluator lanes need to know.
#[derive(Clone)]
pub(crate) struct EvalSettings {
    pub(crate) workers: usize,
    pub(crate) max_memory: u64,
    pub(crate) host_timeout: Duration,
    /// The repo the hosts belong to: their learned peaks are kept by it.
    pub(crate) repo: String,
    /// Holds the memory budget and the learned peaks, and counts restarts.
    pub(crate) monitor: Arc<Monitor>,
}

/// How often each evaluator's resident memory is sampled: often enough to
/// stop one before it passes what it reserved by much, and five times as
/// often once it holds three quarters of its reservation (an evaluator can
/// allocate hundreds of megabytes a second).
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_millis(100);
const MEMORY_SAMPLE_CLOSE: Duration = Duration::from_millis(20);
/// What an evaluator reserves beyond its resident memory when it grows
/// past its reservation: one eighth more, so it does not ask at every
/// sample.
const GROWTH_HEADROOM_DIVISOR: u64 = 8;
/// Evaluator processes stopped for the budget while on one host before
/// that host is evaluated alone (holding the whole budget): each retry
/// first reserves what the last one reached.
const ATTEMPTS_BEFORE_ALONE: u32 = 2;
/// Evaluator processes killed by the kernel while on one host before that
/// host fails: it cannot be evaluated on this machine.
const KERNEL_KILLS: u32 = 3;

type EvalResult = Result<Evaluated, HostFailure>;

/// The evaluations of one request's hosts, consumed in host order.
pub(crate) struct Evaluations {
    results: Vec<Option<EvalResult>>,
    incoming: mpsc::Receiver<(usize, EvalResult)>,
    lanes: JoinSet<()>,
    stop: CancellationToken,
}

impl Evaluations {
    /// Starts evaluating `hosts` (indexes into the request's host list) of
    /// the flake at `locked_url`; `known` are results available already.
    /// With `roots`, each derivation is rooted there as soon as it is known,
    /// before its host can see it.
    pub(crate) fn start(
        nix: &NixCli,
        locked_url: &str,
        hosts: &[String],
        known: Vec<Option<Evaluated>>,
        settings: &EvalSettings,
        roots: Option<RequestRoots>,
        cancel: &Cancellation,
    ) -> Self {
        let stop = cancel.token().child_token();
        let pending: Vec<(usize, String)> = hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| known.get(*i).is_none_or(Option::is_none))
            .map(|(i, host)| (i, host.clone()))
            .collect();
        let (sender, evaluated) = mpsc::channel(hosts.len().max(1));
        let (rooted, incoming) = mpsc::channel(hosts.len().max(1));
        for (index, known) in known.into_iter().enumerate().take(hosts.len()) {
            if let Some(known) = known {
                // One slot per host: never full.
                let _ = sender.try_send((index, Ok(known)));
            }
        }
        let mut lanes = JoinSet::new();
        lanes.spawn(
            root_each(
                nix.clone(),
                hosts.to_vec(),
                roots,
                settings.host_timeout,
                cancel.clone(),
                evaluated,
                rooted,
            )
            .instrument(tracing::Span::current()),
        );
        // Round-robin in host order, so the first hosts (built first) are
        // the first evaluated in every lane.
        let workers = settings.workers.max(1).min(pending.len().max(1));
        for lane in 0..workers {
            let share: VecDeque<(usize, String)> = pending
                .iter()
                .skip(lane)
                .step_by(workers)
                .cloned()
                .collect();
            if share.is_empty() {
                continue;
            }
            // Lanes log inside the request's span, so their lines carry its build id.
            lanes.spawn(
                run_lane(
                    nix.clone(),
                    locked_url.to_owned(),
                    share,
                    settings.clone(),
                    stop.clone(),
                    sender.clone(),
                )
                .instrument(tracing::Span::current()),
            );
        }
        let results = std::iter::repeat_with(|| None).take(hosts.len()).collect();
        Self {
            results,
            incoming,
            lanes,
            stop,
        }
    }

    /// Waits for host `index`'s evaluation.
    pub(crate) async fn get(&mut self, index: usize, cancel: &Cancellation) -> EvalResult {
        loop {
            if let Some(result) = self.results.get_mut(index).and_then(Option::take) {
                return result;
            }
            tokio::select! {
                received = self.incoming.recv() => match received {
                    Some((i, result)) => {
                        if let Some(slot) = self.results.get_mut(i) {
                            *slot = Some(result);
                        }
                    }
                    None => {
                        return Err(if cancel.is_cancelled() {
                            HostFailure::cancelled(cancel.reason())
                        } else {
                            HostFailure::failed(
                                ErrorCode::Internal,
                                "the evaluator stopped without a result for this host",
                            )
                        });
                    }
                },
                () = cancel.cancelled() => return Err(HostFailure::cancelled(cancel.reason())),
            }
        }
    }

    /// Stops every evaluator still running and waits for them.
    pub(crate) async fn shutdown(mut self) {
        self.stop.cancel();
        while self.lanes.join_next().await.is_some() {}
    }
}

/// Passes each evaluation on once its derivation is rooted (when there are
/// roots), so no host ever holds a derivation the collector may take. A
/// derivation that cannot be rooted is still built, with a warning.
async fn root_each(
    nix: NixCli,
    hosts: Vec<String>,
    roots: Option<RequestRoots>,
    timeout: Duration,
    cancel: Cancellation,
    mut evaluated: mpsc::Receiver<(usize, EvalResult)>,
    rooted: mpsc::Sender<(usize, EvalResult)>,
) {
    while let Some((index, result)) = evaluated.recv().await {
        if let (Some(roots), Ok(done), Some(host)) = (&roots, &result, hosts.get(index)) {
            let deadline = Instant::now() + timeout;
            if let Err(err) = roots
                .root_drv(&nix, host, &done.drv_path, deadline, &cancel)
                .await
            {
                tracing::warn!(%host, error = %err.error.message, "cannot root the derivation");
            }
        }
        // One slot per host: never full; closed once the request is over.
        let _ = rooted.try_send((index, result));
    }
}

/// The two trace lines the evaluation expression prints per host.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
enum Marker {
    Done {
        done: String,
        drv: String,
        out: String,
    },
    Start {
        start: String,
    },
}

impl Marker {
    fn find(text: &str) -> Option<Self> {
        let (_, json) = text.split_once(EVAL_MARKER)?;
        serde_json::from_str(json.trim()).ok()
    }
}

/// What one evaluator process has reported so far.
struct ProcessState {
    pid: Option<u32>,
    /// The host being evaluated.
    current: Option<String>,
    /// The process's highest resident memory sampled while on `current`.
    host_peak: u64,
    /// When the process, or its current host, started: the watchdog's base.
    since: Instant,
    /// Messages since `current` started: its error, if it fails.
    tail: ErrorTail,
    /// Hosts whose result was sent.
    finished: Vec<String>,
    /// Set when the process grew past the memory bound.
    over_memory: bool,
}

struct ProcessObserver<'a> {
    state: &'a Mutex<ProcessState>,
    parser: LogParser,
    settings: &'a EvalSettings,
    stop: &'a CancellationToken,
    /// The lane's remaining hosts, with their index in the request.
    hosts: &'a VecDeque<(usize, String)>,
    results: &'a mpsc::Sender<(usize, EvalResult)>,
}

impl Observer for ProcessObserver<'_> {
    fn started(&mut self, pid: u32) {
        process::prefer_for_oom_kill(pid);
        let mut state = lock(self.state);
        state.pid = Some(pid);
        state.since = Instant::now();
    }

    fn line(&mut self, line: &str) {
        let event = self.parser.parse(line);
        let text = match &event {
            LogEvent::Message { text, .. } | LogEvent::Plain(text) => text.as_str(),
            _ => "",
        };
        let mut state = lock(self.state);
        match Marker::find(text) {
            Some(Marker::Start { start }) => {
                state.host_peak = state.pid.and_then(process::resident_bytes).unwrap_or(0);
                state.current = Some(start);
                state.since = Instant::now();
                state.tail = ErrorTail::default();
            }
            Some(Marker::Done { done, drv, out }) => {
                let resident = state.pid.and_then(process::resident_bytes).unwrap_or(0);
                let peak = state.host_peak.max(resident);
                self.settings
                    .monitor
                    .learn_eval_peak(&self.settings.repo, &done, peak);
                state.current = None;
                state.since = Instant::now();
                // Sent at once: this host can build while the rest evaluate.
                if let Some((index, _)) = self.hosts.iter().find(|(_, h)| *h == done) {
                    let result = if is_drv_path(&drv) && out.starts_with('/') {
                        Ok(Evaluated {
                            drv_path: drv,
                            out_path: out,
                        })
                    } else {
                        Err(HostFailure::failed(
                            ErrorCode::EvalFailed,
                            format!(
                                "{done}: evaluation did not produce a derivation ({drv:?}, {out:?})"
                            ),
                        ))
                    };
                    // One slot per host: never full; closed once the
                    // request is over, when results no longer matter.
                    let _ = self.results.try_send((*index, result));
                    state.finished.push(done);
                }
                if resident > self.settings.max_memory {
                    state.over_memory = true;
                    self.stop.cancel();
                }
            }
            None => state.tail.observe(&event),
        }
    }
}

/// Why an evaluator process stopped for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MemoryStop {
    /// It grew past its reservation and the budget had no more room.
    OverBudget,
    /// It holds the whole budget and grew past even that.
    PastWholeBudget,
}

/// Evaluates one lane's hosts, in order, with as many processes as needed.
/// Each process first reserves what its hosts are expected to need of the
/// memory budget (waiting for room), then more as it grows; one that
/// cannot get more is killed at once and its host tried again in a fresh
/// process that reserves what it reached.
async fn run_lane(
    nix: NixCli,
    locked_url: String,
    mut hosts: VecDeque<(usize, String)>,
    settings: EvalSettings,
    cancel: CancellationToken,
    results: mpsc::Sender<(usize, EvalResult)>,
) {
    let send = |index: usize, result: EvalResult| {
        // The channel holds one slot per host, so this never blocks; a
        // closed channel means the request is over.
        let _ = results.try_send((index, result));
    };
    let monitor = &settings.monitor;
    let budget = monitor.memory_budget();
    let mut memory_attempts: HashMap<String, u32> = HashMap::new();
    while !hosts.is_empty() && !cancel.is_cancelled() {
        let Some((_, first)) = hosts.front().cloned() else {
            return;
        };
        // One process evaluates the lane's hosts one after the other and
        // keeps most of what it allocated, so it reserves the most any of
        // them is expected to take (a learned peak is the process's, taken
        // while on that host).
        let expected = if memory_attempts.get(&first).copied().unwrap_or(0) >= ATTEMPTS_BEFORE_ALONE
        {
            budget.total()
        } else {
            hosts
                .iter()
                .map(|(_, host)| monitor.expected_eval_peak(&settings.repo, host))
                .max()
                .unwrap_or(0)
        };
        monitor.waiting_for_memory(&first, true);
        let reserved = tokio::select! {
            reservation = budget.reserve(expected) => Some(reservation),
            () = cancel.cancelled() => None,
        };
        monitor.waiting_for_memory(&first, false);
        let Some(mut reservation) = reserved else {
            return;
        };

        let names: Vec<String> = hosts.iter().map(|(_, h)| h.clone()).collect();
        let invocation = nix.eval_hosts(&locked_url, &names);
        let stop = cancel.child_token();
        let state = Mutex::new(ProcessState {
            pid: None,
            current: None,
            host_peak: 0,
            since: Instant::now(),
            tail: ErrorTail::default(),
            finished: Vec::new(),
            over_memory: false,
        });
        let mut timed_out = false;
        let mut memory_stop = None;
        let outcome = {
            let mut observer = ProcessObserver {
                state: &state,
                parser: LogParser::new(),
                settings: &settings,
                stop: &stop,
                hosts: &hosts,
                results: &results,
            };
            // No overall deadline: each host gets `host_timeout` from its
            // start, enforced by the watchdog below.
            let limits = process::Limits {
                deadline: None,
                max_silence: None,
                kill_grace: process::EVAL_KILL_GRACE,
                max_stdout: process::MAX_STDOUT_BYTES,
            };
            let run = process::run_limited(&invocation, limits, &stop, &mut observer);
            tokio::pin!(run);
            let mut next_sample = Instant::now() + MEMORY_SAMPLE_EVERY;
            loop {
                let since = lock(&state).since;
                tokio::select! {
                    outcome = &mut run => break outcome,
                    () = tokio::time::sleep_until(since + settings.host_timeout), if !timed_out => {
                        if lock(&state).since.elapsed() >= settings.host_timeout {
                            timed_out = true;
                            stop.cancel();
                        }
                    }
                    () = tokio::time::sleep_until(next_sample), if memory_stop.is_none() => {
                        let sampled = keep_within_reservation(&state, &mut reservation);
                        memory_stop = sampled.err();
                        let close = sampled.is_ok_and(|resident| {
                            resident > reservation.held() / 4 * 3
                        });
                        next_sample = Instant::now()
                            + if close { MEMORY_SAMPLE_CLOSE } else { MEMORY_SAMPLE_EVERY };
                    }
                }
            }
        };
        drop(reservation);

        let state = match state.into_inner() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        hosts.retain(|(_, host)| !state.finished.contains(host));
        if hosts.is_empty() {
            return;
        }
        // The host the process was on when it stopped, or (if it never got
        // to one, e.g. the flake itself fails) the next one: either way one
        // host is settled per process, so the lane always makes progress.
        let culprit = state
            .current
            .as_ref()
            .and_then(|host| hosts.iter().position(|(_, h)| h == host))
            .unwrap_or(0);
        let failure = match step::explain(outcome, &state.tail) {
            Err(failure) => failure,
            // Nix exited fine without reporting every host: that host is
            // settled as failed too, so the lane still makes progress.
            Ok(_) => StepFailure::Exited {
                status: std::process::ExitStatus::default(),
                error: state.tail.summary(),
            },
        };
        // SIGKILL that the lane did not send: the kernel's OOM killer.
        let killed_by_kernel = memory_stop.is_none()
            && matches!(
                &failure,
                StepFailure::Exited { status, .. }
                    if std::os::unix::process::ExitStatusExt::signal(status) == Some(9)
            );
        if memory_stop.is_some() || killed_by_kernel {
            // Tried again with what it reached reserved (or, killed by the
            // kernel, half as much again), then alone; it fails only when it
            // alone passed the whole budget, or the kernel kept killing it.
            let Some((index, host)) = hosts.get(culprit).cloned() else {
                return;
            };
            let reached = if killed_by_kernel {
                state.host_peak.saturating_mul(3) / 2
            } else {
                state.host_peak
            };
            let learned = monitor.expected_eval_peak(&settings.repo, &host);
            monitor.learn_eval_peak(&settings.repo, &host, learned.max(reached));
            let tries = memory_attempts.entry(host.clone()).or_default();
            *tries += 1;
            let reason = if killed_by_kernel {
                "oom_killed"
            } else {
                "memory"
            };
            monitor.eval_restarted(reason);
            let alone_too_large = memory_stop == Some(MemoryStop::PastWholeBudget);
            if alone_too_large || (killed_by_kernel && *tries >= KERNEL_KILLS) {
                hosts.remove(culprit);
                tracing::warn!(%host, peak = state.host_peak, budget = budget.total(), "evaluation does not fit the memory budget");
                send(
                    index,
                    Err(out_of_memory(
                        &host,
                        state.host_peak,
                        budget.total(),
                        killed_by_kernel,
                    )),
                );
            } else {
                tracing::info!(%host, peak = state.host_peak, reason, "evaluator stopped for memory; the host is tried again");
            }
            continue;
        }
        match failure {
            StepFailure::Exited { status, error } => {
                monitor.eval_restarted("failed");
                let Some((index, host)) = hosts.remove(culprit) else {
                    return;
                };
                let doing = format!(" while evaluating {host}");
                let message = StepFailure::exit_message(status, &error, &doing);
                tracing::warn!(%host, "evaluation failed");
                send(
                    index,
                    Err(HostFailure::failed(ErrorCode::EvalFailed, message)),
                );
            }
            StepFailure::Cancelled if timed_out => {
                monitor.eval_restarted("timeout");
                let Some((index, host)) = hosts.remove(culprit) else {
                    return;
                };
                tracing::warn!(%host, "evaluation timed out");
                send(
                    index,
                    Err(HostFailure::timeout(format!(
                        "evaluation killed after exceeding host_timeout ({})",
                        humantime::format_duration(settings.host_timeout)
                    ))),
                );
            }
            StepFailure::Cancelled if state.over_memory => {
                monitor.eval_restarted("max_memory");
                tracing::info!(
                    limit = settings.max_memory,
                    remaining = hosts.len(),
                    "evaluator passed eval_max_memory; continuing in a fresh process"
                );
            }
            StepFailure::Cancelled | StepFailure::TimedOut { .. } | StepFailure::Silent { .. } => {
                return;
            }
            StepFailure::Spawn(why) => {
                for (index, _) in hosts.drain(..) {
                    send(
                        index,
                        Err(HostFailure::failed(ErrorCode::Internal, why.clone())),
                    );
                }
                return;
            }
        }
    }
}

/// Samples the evaluator's resident memory and keeps it within its
/// reservation, growing that while the budget has room; gives the
/// resident memory (0 before the process is known), or kills the process
/// at once when it cannot stay within (see [`MemoryStop`]).
fn keep_within_reservation(
    state: &Mutex<ProcessState>,
    reservation: &mut Reservation,
) -> Result<u64, MemoryStop> {
    let mut state = lock(state);
    let Some(pid) = state.pid else {
        return Ok(0);
    };
    let Some(resident) = process::resident_bytes(pid) else {
        return Ok(0);
    };
    state.host_peak = state.host_peak.max(resident);
    reservation.sampled(resident);
    if resident <= reservation.held() {
        return Ok(resident);
    }
    let wanted = resident + resident / GROWTH_HEADROOM_DIVISOR;
    // Past all it may hold: grow to what it needs if that much is free.
    if reservation.try_grow(wanted) || reservation.try_grow(resident) {
        return Ok(resident);
    }
    process::kill_group_now(pid);
    Err(if reservation.is_whole_budget() {
        MemoryStop::PastWholeBudget
    } else {
        MemoryStop::OverBudget
    })
}

/// The failure of a host whose evaluation does not fit the budget.
fn out_of_memory(host: &str, peak: u64, budget: u64, killed_by_kernel: bool) -> HostFailure {
    let mib = |bytes: u64| bytes >> 20;
    let how = if killed_by_kernel {
        "was killed by the kernel for memory"
    } else {
        "needs more memory than the evaluators' whole budget"
    };
    HostFailure::failed(
        ErrorCode::EvalOutOfMemory,
        format!(
            "evaluating {host} {how}: it reached {} MiB, eval_memory_budget is {} MiB",
            mib(peak),
            mib(budget)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_in_trace_messages_of_each_era() {
        // Nix 2.8 prints `trace: <message>`; newer releases may colour it.
        assert_eq!(
            Marker::find(&format!("trace: {EVAL_MARKER}{{\"start\":\"ns1\"}}")),
            Some(Marker::Start {
                start: "ns1".into()
            })
        );
        let done = format!(
            "trace: {EVAL_MARKER}{{\"done\":\"ns1\",\"drv\":\"/nix/store/a-x.drv\",\"out\":\"/nix/store/b-x\"}}"
        );
        assert_eq!(
            Marker::find(&done),
            Some(Marker::Done {
                done: "ns1".into(),
                drv: "/nix/store/a-x.drv".into(),
                out: "/nix/store/b-x".into()
            })
        );
        assert_eq!(Marker::find("trace: something else"), None);
        assert_eq!(Marker::find(&format!("trace: {EVAL_MARKER}not json")), None);
    }
}
