//! Running one accepted request from pin to its report: fetch and pin the
//! flake and resolve its hosts ([`pin`]), evaluate them ahead (see
//! [`super::eval`]), build up to `parallel_hosts` of them at once
//! ([`host`]), and close the request ([`outcome`]). What the runner
//! remembers between requests is in [`memo`].

mod host;
mod memo;
mod outcome;
mod pin;

use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::Instrument;

use super::cancel::{Cancellation, StopReason};
use super::eval::{EvalSettings, Evaluations};
use super::journal::{Journaling, Record};
use super::monitor::Monitor;
use super::request::{HostFailure, Job, Report, millis};
use super::roots::{GcRoots, Lineage, RequestRoots};
use super::step::{self, StepFailure};
use crate::changes::ClosureSizes;
use crate::config::Config;
use crate::nix::NixCli;
use crate::nix::argv::Invocation;
use crate::nix::process::Limits;
use crate::protocol::{ErrorCode, Event, HostStatus, HostSummary};
use crate::sync::lock;
use host::{HostSlot, PendingChanges};
use memo::Memo;
use outcome::{evaluation_order, request_outcome};

/// What the builder needs to run any job, and what it remembers between
/// jobs.
pub(crate) struct Runner {
    nix: NixCli,
    config: Arc<Config>,
    monitor: Arc<Monitor>,
    roots: Option<GcRoots>,
    memo: Mutex<Memo>,
    /// Closure sizes of results, for `changes` without Nix.
    closure_sizes: Arc<ClosureSizes>,
    /// Where each request's progress is recorded for a restart.
    journal: Journaling,
}

/// One request on its way through [`Runner::run`]: the job, its
/// cancellation, which roots its results join and its temporary roots.
struct Run<'a> {
    job: &'a Job,
    cancel: &'a Cancellation,
    lineage: Lineage,
    roots: Option<RequestRoots>,
}

impl Runner {
    /// A runner for `nix` as detected, with an empty memory.
    pub(crate) fn new(
        nix: NixCli,
        config: Arc<Config>,
        monitor: Arc<Monitor>,
        journal: Journaling,
    ) -> Self {
        let roots = config.builder.gc_roots_dir.clone().map(|dir| GcRoots {
            dir,
            keep: config.builder.keep_roots,
            side_ttl: config.builder.side_roots_ttl,
            side_max: config.builder.side_roots_max,
        });
        Self {
            nix,
            config,
            monitor,
            roots,
            journal,
            memo: Mutex::new(Memo::default()),
            closure_sizes: Arc::default(),
        }
    }

    /// Cleans up after a previous run of the builder: removes the
    /// temporary roots of requests a crash left behind and expired side
    /// roots (with their results), and moves roots of an earlier layout.
    pub(crate) async fn start_up(&self) {
        if let Some(roots) = self.roots.clone() {
            let _ = tokio::task::spawn_blocking(move || roots.sweep_requests()).await;
        }
        if let Some(roots) = &self.roots {
            // Each move is one short Nix call; nothing can cancel it yet,
            // as no request runs before start-up ends.
            let cancel = Cancellation::root(Default::default(), StopReason::Shutdown);
            let deadline = Instant::now() + std::time::Duration::from_secs(600);
            roots.migrate(&self.nix, deadline, &cancel).await;
        }
        self.expire_side_roots().await;
    }

    /// Removes side roots and side results past `side_roots_ttl`.
    async fn expire_side_roots(&self) {
        if let Some(roots) = self.roots.clone() {
            let _ = tokio::task::spawn_blocking(move || roots.expire_side_roots()).await;
        }
        self.monitor
            .expire_side_results(self.config.builder.side_roots_ttl);
    }

    /// Runs `job` to its end, sending every event but `finished`, which the
    /// caller sends from the returned report. A cancelled request reports
    /// the reason its `cancel` carries.
    pub(crate) async fn run(&self, job: &Job, cancel: &Cancellation) -> Report {
        let span = tracing::info_span!(
            "build",
            build_id = %job.build_id,
            repo = %job.repo,
            target = %job.target
        );
        async {
            let default_ref = self
                .config
                .repos
                .get(&job.repo)
                .and_then(|repo| repo.git_ref.as_deref());
            let lineage = Lineage::of(job.git_ref.as_deref(), job.rev.as_deref(), default_ref);
            let roots = match self
                .roots
                .as_ref()
                .map(|r| r.request(&job.build_id))
                .transpose()
            {
                Ok(roots) => roots,
                Err(failure) => {
                    return Report::ended_early(failure.build_status(), failure.error);
                }
            };
            let run = Run {
                job,
                cancel,
                lineage,
                roots,
            };
            let report = self.execute(&run).await;
            if let Some(roots) = run.roots {
                let _ = tokio::task::spawn_blocking(move || roots.remove()).await;
            }
            self.expire_side_roots().await;
            tracing::info!(
                status = %report.status,
                duration_ms = millis(report.duration),
                "build finished"
            );
            report
        }
        .instrument(span)
        .await
    }

    fn memo(&self) -> MutexGuard<'_, Memo> {
        lock(&self.memo)
    }

    /// The request's sequence: pin, resolve (or take the hosts it had
    /// before a restart), evaluate ahead, build, then its outcome.
    async fn execute(&self, run: &Run<'_>) -> Report {
        let Run { job, cancel, .. } = *run;
        let started = Instant::now();
        let early = |failure: HostFailure, rev| Report {
            duration: started.elapsed(),
            rev,
            ..Report::ended_early(failure.build_status(), failure.error)
        };
        let Some(repo) = self.config.repos.get(&job.repo) else {
            // Validated on receipt; a config reload cannot happen mid-run.
            let failure =
                HostFailure::failed(ErrorCode::UnknownRepo, "repo vanished from the config");
            return early(failure, None);
        };
        let pinned = match self.pin(repo, run).await {
            Ok(pinned) => pinned,
            Err(failure) => return early(failure, None),
        };
        tracing::info!(rev = pinned.rev.as_deref().unwrap_or("-"), "flake pinned");

        let resumed = job.resume.as_ref();
        let (hosts, skipped) = match resumed.and_then(|resume| resume.started.clone()) {
            // Started before a restart: the same hosts, and no second `started`.
            Some(started) => started,
            None => {
                let deadline = Instant::now() + self.config.builder.host_timeout;
                let (hosts, skipped) = match self.resolve_hosts(repo, run, &pinned, deadline).await
                {
                    Ok(resolved) => resolved,
                    Err(failure) => return early(failure, pinned.rev),
                };
                self.journal.note(Record::Started {
                    build_id: job.build_id.clone(),
                    rev: pinned.rev.clone(),
                    hosts: hosts.clone(),
                    skipped: skipped.clone(),
                });
                job.replies.send(
                    &job.build_id,
                    Event::Started {
                        repo: job.repo.clone(),
                        target: job.target.to_string(),
                        rev: pinned.rev.clone(),
                        hosts: hosts.clone(),
                        skipped: skipped.clone(),
                    },
                );
                (hosts, skipped)
            }
        };
        self.monitor
            .build_pinned(&job.build_id, pinned.rev.as_deref());
        // Hosts that finished before a restart keep their results.
        let done_before = |host: &str| {
            resumed.and_then(|resume| resume.done.iter().find(|done| done.host == host))
        };
        let order = evaluation_order(&hosts, |host| done_before(host).is_some());
        let todo: Vec<String> = hosts
            .iter()
            .zip(&order)
            .filter(|(_, evaluation)| evaluation.is_some())
            .map(|(host, _)| host.clone())
            .collect();
        let known: Vec<_> = {
            let memo = self.memo();
            todo.iter()
                .map(|host| {
                    let key = pinned.memo_key.as_deref()?;
                    memo.evaluated(key, host)
                })
                .collect()
        };
        let settings = EvalSettings {
            workers: self.config.builder.eval_workers,
            max_memory: self.config.builder.eval_max_memory.0,
            host_timeout: self.config.builder.host_timeout,
            repo: job.repo.clone(),
            monitor: Arc::clone(&self.monitor),
        };
        let eval_roots = match (&self.roots, &run.roots) {
            (Some(roots), Some(request)) => Some(request.leaving_out_unchanged(
                roots,
                (&job.repo, &run.lineage),
                (&todo, &known),
            )),
            _ => None,
        };
        let evaluations = tokio::sync::Mutex::new(Evaluations::start(
            &self.nix,
            &pinned.locked_url,
            &todo,
            known,
            &settings,
            eval_roots,
            cancel,
        ));

        // Up to `parallel_hosts` hosts build at once, started in the hosts'
        // order; a host that finishes early makes room at once (unordered),
        // and the summaries are put back in order.
        let total = hosts.len();
        let builds: Vec<_> = hosts
            .iter()
            .zip(order)
            .enumerate()
            .map(|(index, (host, evaluation))| {
                let done = done_before(host).cloned();
                let (evaluations, pinned) = (&evaluations, &pinned);
                async move {
                    if let Some(done) = done {
                        return (index, done, None);
                    }
                    // Every host not done has an evaluation (see
                    // `evaluation_order`).
                    let (Some(evaluation), false) = (evaluation, cancel.is_cancelled()) else {
                        return (index, cancelled_summary(host), None);
                    };
                    let slot = HostSlot {
                        host,
                        index,
                        total,
                        evaluation,
                    };
                    let (summary, changes) = self.build_host(run, pinned, slot, evaluations).await;
                    (index, summary, changes)
                }
            })
            .collect();
        let mut built: Vec<(usize, HostSummary, Option<PendingChanges>)> =
            futures_util::stream::iter(builds)
                .buffer_unordered(self.config.builder.parallel_hosts)
                .collect()
                .await;
        built.sort_by_key(|(index, _, _)| *index);
        let mut summaries = Vec::with_capacity(total);
        let mut pending: Vec<PendingChanges> = Vec::new();
        for (_, summary, changes) in built {
            summaries.push(summary);
            pending.extend(changes);
        }
        evaluations.into_inner().shutdown().await;
        // Every `host_finished` is out before `finished`, which counts the
        // changes per host.
        for task in pending {
            if let Ok((host, Some(changes))) = task.await {
                if let Some(summary) = summaries.iter_mut().find(|s| s.host == host) {
                    summary.changed_packages = Some(changes.changed_packages());
                    summary.size_delta = Some(changes.closure_size_delta);
                }
            }
        }

        // From here a `build.cancel` is answered as too late and changes
        // nothing; one that came before is honoured, even if every host
        // finished meanwhile: its requester was told it was cancelled.
        let stopped = self
            .monitor
            .settle(&job.build_id, cancel)
            .then(|| cancel.reason());
        let (status, error) = request_outcome(stopped, &summaries, &skipped);
        Report {
            status,
            rev: pinned.rev,
            hosts: summaries,
            error,
            duration: started.elapsed(),
            skipped,
        }
    }

    /// Runs a request-level Nix command (no host, no progress events).
    /// Past `deadline` it is a timeout: of fetching for `fetch_failed`, else
    /// of `host_timeout`.
    async fn run_quiet(
        &self,
        invocation: &Invocation,
        deadline: Instant,
        cancel: &Cancellation,
        failure_code: ErrorCode,
    ) -> Result<Vec<u8>, HostFailure> {
        step::run_quiet(invocation, Limits::deadline(deadline), cancel.token())
            .await
            .map_err(|failure| self.explain(failure, failure_code, cancel))
    }

    /// What a failed Nix step of a request tells its requester: Nix's own
    /// error with `failure_code`, or which limit stopped it.
    fn explain(
        &self,
        failure: StepFailure,
        failure_code: ErrorCode,
        cancel: &Cancellation,
    ) -> HostFailure {
        let (limit, error) = match failure {
            StepFailure::Spawn(why) => return HostFailure::failed(ErrorCode::Internal, why),
            StepFailure::Cancelled => return HostFailure::cancelled(cancel.reason()),
            StepFailure::Exited { status, error } => {
                let mut message = StepFailure::exit_message(status, &error, "");
                if message.contains(NO_MACHINE_FOR_BUILD) {
                    message.push_str(NO_MACHINE_HINT);
                }
                return HostFailure::failed(failure_code, message);
            }
            StepFailure::Silent { error } => (
                "killed after printing nothing for max_silent_time".to_owned(),
                error,
            ),
            StepFailure::TimedOut { error } if failure_code == ErrorCode::FetchFailed => (
                format!(
                    "fetching the flake was killed after exceeding fetch_timeout ({})",
                    humantime::format_duration(self.config.builder.fetch_timeout)
                ),
                error,
            ),
            StepFailure::TimedOut { error } => (
                format!(
                    "killed after exceeding host_timeout ({})",
                    humantime::format_duration(self.config.builder.host_timeout)
                ),
                error,
            ),
        };
        let message = if error.is_empty() {
            limit
        } else {
            format!("{limit}\n{error}")
        };
        HostFailure::timeout(message)
    }
}

/// The summary of a host that never started: the request was cancelled
/// before its turn.
fn cancelled_summary(host: &str) -> HostSummary {
    HostSummary {
        host: host.to_owned(),
        status: HostStatus::Cancelled,
        duration_ms: 0,
        out_path: None,
        cached: false,
        changed_packages: None,
        size_delta: None,
    }
}

/// What Nix says when neither the local machine nor any remote builder
/// may take a derivation; its "cannot build on '<machine>'" messages before
/// it name the machines tried.
const NO_MACHINE_FOR_BUILD: &str = "unable to start any build";
const NO_MACHINE_HINT: &str = "\nno machine could take the build: local builds are disabled \
(max-jobs = 0) and every remote builder in Nix's `builders` was unreachable or lacks the \
system or features; see the machines in `homelab-deploy status`";
