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

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cancel::Cancellation;
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
#[derive(Debug, Clone)]
pub(crate) struct EvalSettings {
    pub(crate) workers: usize,
    pub(crate) max_memory: u64,
    pub(crate) host_timeout: Duration,
}

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
    max_memory: u64,
    stop: &'a CancellationToken,
    /// The lane's remaining hosts, with their index in the request.
    hosts: &'a VecDeque<(usize, String)>,
    results: &'a mpsc::Sender<(usize, EvalResult)>,
}

impl Observer for ProcessObserver<'_> {
    fn started(&mut self, pid: u32) {
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
                state.current = Some(start);
                state.since = Instant::now();
                state.tail = ErrorTail::default();
            }
            Some(Marker::Done { done, drv, out }) => {
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
                let resident = state.pid.and_then(process::resident_bytes).unwrap_or(0);
                if resident > self.max_memory {
                    state.over_memory = true;
                    self.stop.cancel();
                }
            }
            None => state.tail.observe(&event),
        }
    }
}

/// Evaluates one lane's hosts, in order, with as many processes as needed.
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
    while !hosts.is_empty() && !cancel.is_cancelled() {
        let names: Vec<String> = hosts.iter().map(|(_, h)| h.clone()).collect();
        let invocation = nix.eval_hosts(&locked_url, &names);
        let stop = cancel.child_token();
        let state = Mutex::new(ProcessState {
            pid: None,
            current: None,
            since: Instant::now(),
            tail: ErrorTail::default(),
            finished: Vec::new(),
            over_memory: false,
        });
        let mut timed_out = false;
        let outcome = {
            let mut observer = ProcessObserver {
                state: &state,
                parser: LogParser::new(),
                max_memory: settings.max_memory,
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
                    // Re-arm the watchdog when the next host starts.
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        };

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
        match failure {
            StepFailure::Exited { status, error } => {
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
