//! Running one accepted request from pin to its report: fetch and pin the
//! flake, resolve the hosts, evaluate them ahead (see [`super::eval`]) and
//! build them one after the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::time::Instant;
use tracing::Instrument;

use super::cancel::{Cancellation, StopReason};
use super::eval::{EvalSettings, Evaluated, Evaluations};
use super::journal::{Journaling, Record};
use super::monitor::Monitor;
use super::request::{HostFailure, Job, Report, millis};
use super::roots::{GcRoots, Lineage, RequestRoots};
use super::watch::HostWatch;
use crate::changes::host_changes;
use crate::config::{Config, RepoConfig};
use crate::nix::NixCli;
use crate::nix::argv::{Invocation, Locked, evaluation_url, flake_fetch_urls};
use crate::nix::json::{FlakeMetadata, host_names, out_path_from_build_json};
use crate::nix::log::{ErrorTail, LogParser};
use crate::nix::process::{self, Outcome};
use crate::protocol::{
    Against, BuildStatus, Changes, ErrorBody, ErrorCode, Event, HostStatus, HostSummary,
    SkippedHost, Target, is_valid_name,
};
use crate::sync::lock;

/// What the builder needs to run any job, and what it remembers between
/// jobs.
pub(crate) struct Runner {
    nix: NixCli,
    config: Arc<Config>,
    monitor: Arc<Monitor>,
    roots: Option<GcRoots>,
    memo: Mutex<Memo>,
    /// Where each request's progress is recorded for a restart.
    journal: Journaling,
}

/// Evaluation results by the fetched source's `narHash` (and the repo's
/// URL). The hash covers every file, `flake.lock` included, so the same key
/// always evaluates to the same derivations: an unchanged flake is not
/// evaluated twice. A source without a `narHash` is never remembered.
#[derive(Default)]
struct Memo {
    hosts: HashMap<String, Vec<String>>,
    evaluated: HashMap<(String, String), Evaluated>,
}

impl Memo {
    /// Enough for hundreds of revisions of a homelab; then start over.
    const MAX_ENTRIES: usize = 20_000;

    fn make_room(&mut self) {
        if self.evaluated.len() + self.hosts.len() >= Self::MAX_ENTRIES {
            self.hosts.clear();
            self.evaluated.clear();
        }
    }
}

/// A flake fetched and pinned to one commit.
struct Pinned {
    /// The locked flake URL every host of the request is evaluated from.
    locked_url: String,
    rev: Option<String>,
    /// What evaluations of this source are remembered by, if anything.
    memo_key: Option<String>,
}

/// A host that built (or was found built).
struct Built {
    out_path: String,
    cached: bool,
    /// The host's result on the default ref before this build (its
    /// current GC-root generation), to compare with; `None` for a first
    /// build or without `gc_roots_dir`.
    against: Option<String>,
}

/// A host's `host_finished`, sent once its closure comparison is done.
type PendingChanges = tokio::task::JoinHandle<(String, Option<Changes>)>;

/// Longest a closure comparison may take before `host_finished` goes out
/// without it.
const CHANGES_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

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

    async fn execute(&self, run: &Run<'_>) -> Report {
        let Run { job, cancel, .. } = *run;
        let started = Instant::now();
        let report = |status, rev, hosts, error| Report {
            status,
            rev,
            hosts,
            error,
            duration: started.elapsed(),
            skipped: Vec::new(),
        };
        let early = |failure: HostFailure, rev| {
            report(failure.build_status(), rev, Vec::new(), Some(failure.error))
        };
        let Some(repo) = self.config.repos.get(&job.repo) else {
            // Validated on receipt; a config reload cannot happen mid-run.
            let error = ErrorBody::new(ErrorCode::UnknownRepo, "repo vanished from the config");
            return report(BuildStatus::Failed, None, Vec::new(), Some(error));
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
        // Hosts that finished before a restart keep their results.
        let done_before = |host: &str| {
            resumed.and_then(|resume| resume.done.iter().find(|done| done.host == host))
        };
        let total = hosts.len();
        let todo: Vec<String> = hosts
            .iter()
            .filter(|host| done_before(host).is_none())
            .cloned()
            .collect();

        let known: Vec<Option<Evaluated>> = {
            let memo = lock(&self.memo);
            todo.iter()
                .map(|host| {
                    let key = pinned.memo_key.clone()?;
                    memo.evaluated
                        .get(&(key, host.clone()))
                        .filter(|e| std::path::Path::new(&e.drv_path).exists())
                        .cloned()
                })
                .collect()
        };
        let settings = EvalSettings {
            workers: self.config.builder.eval_workers,
            max_memory: self.config.builder.eval_max_memory.0,
            host_timeout: self.config.builder.host_timeout,
        };
        let evaluations = Evaluations::start(
            &self.nix,
            &pinned.locked_url,
            &todo,
            known,
            &settings,
            run.roots.clone(),
            cancel,
        );

        // Up to `parallel_hosts` hosts build at once, started in the hosts'
        // order; a host that finishes early makes room at once (unordered),
        // and the summaries are put back in order. Each built host takes the
        // next evaluation.
        let evaluations = tokio::sync::Mutex::new(evaluations);
        let mut evaluation = 0;
        let builds = hosts.iter().enumerate().map(|(i, host)| {
            let done = done_before(host).cloned();
            let this_evaluation = evaluation;
            if done.is_none() {
                evaluation += 1;
            }
            let evaluations = &evaluations;
            let pinned = &pinned;
            async move {
                if let Some(done) = done {
                    return (i, done, None);
                }
                if cancel.is_cancelled() {
                    let cancelled = HostSummary {
                        host: host.clone(),
                        status: HostStatus::Cancelled,
                        duration_ms: 0,
                        out_path: None,
                        cached: false,
                        changed_packages: None,
                        size_delta: None,
                    };
                    return (i, cancelled, None);
                }
                let (summary, changes) = self
                    .build_host(
                        run,
                        pinned,
                        host,
                        (i, total),
                        (evaluations, this_evaluation),
                    )
                    .await;
                (i, summary, changes)
            }
        });
        // Collected first: with a lazy map in the stream the compiler cannot
        // prove the request's future `Send`.
        let builds: Vec<_> = builds.collect();
        let mut built: Vec<(usize, HostSummary, Option<PendingChanges>)> =
            futures_util::stream::iter(builds)
                .buffer_unordered(self.config.builder.parallel_hosts)
                .collect()
                .await;
        built.sort_by_key(|(i, _, _)| *i);
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
        let cancelled = self.monitor.settle(&job.build_id, cancel);
        let status = if cancelled || summaries.iter().any(|h| h.status == HostStatus::Cancelled) {
            BuildStatus::Cancelled
        } else if summaries.iter().all(|h| h.status == HostStatus::Success) && skipped.is_empty() {
            BuildStatus::Success
        } else {
            BuildStatus::Failed
        };
        let error = match status {
            BuildStatus::Cancelled => Some(ErrorBody::new(
                ErrorCode::Cancelled,
                cancel.reason().message(),
            )),
            _ if !skipped.is_empty() => Some(skipped_error(&skipped)),
            _ => None,
        };
        let mut report = report(status, pinned.rev, summaries, error);
        report.skipped = skipped;
        report
    }

    /// Fetches the flake (bypassing Nix's fetch cache) and pins its commit,
    /// within `fetch_timeout`. A git ref that is not a branch is tried as a
    /// tag.
    async fn pin(&self, repo: &RepoConfig, run: &Run<'_>) -> Result<Pinned, HostFailure> {
        let job = run.job;
        let deadline = Instant::now() + self.config.builder.fetch_timeout;
        let mut first_failure = None;
        let mut stdout = None;
        // A request resumed after a restart builds the commit it was pinned at.
        let rev = job
            .resume
            .as_ref()
            .and_then(|resume| resume.rev.as_deref())
            .or(job.rev.as_deref());
        for url in flake_fetch_urls(&repo.url, job.git_ref.as_deref(), rev) {
            let invocation = self.nix.flake_metadata(&url);
            match self
                .run_quiet(&invocation, deadline, run.cancel, ErrorCode::FetchFailed)
                .await
            {
                Ok(out) => {
                    stdout = Some(out);
                    break;
                }
                Err(failure) if failure.error.code != ErrorCode::FetchFailed => {
                    return Err(failure);
                }
                Err(failure) => {
                    first_failure.get_or_insert(failure);
                }
            }
        }
        let Some(stdout) = stdout else {
            return Err(first_failure.unwrap_or_else(|| {
                HostFailure::failed(ErrorCode::FetchFailed, "no URL to fetch the flake from")
            }));
        };
        let metadata = FlakeMetadata::parse(&stdout).map_err(|err| {
            HostFailure::failed(
                ErrorCode::FetchFailed,
                format!("cannot read `nix flake metadata` output: {err}"),
            )
        })?;
        if let (Some(roots), Some(path)) = (&run.roots, &metadata.path) {
            let rooted = roots
                .root_source(&self.nix, path, deadline, run.cancel)
                .await;
            if let Err(err) = rooted {
                if err.status == HostStatus::Cancelled {
                    return Err(err);
                }
                tracing::warn!(error = %err.error.message, "cannot root the flake's source");
            }
        }
        let locked_url = evaluation_url(&Locked {
            url: &metadata.url,
            rev: metadata.rev(),
            nar_hash: metadata.nar_hash(),
            path: metadata.path.as_deref(),
            dir: metadata.dir(),
            submodules: metadata.submodules(),
        });
        Ok(Pinned {
            rev: metadata.rev().map(str::to_owned),
            memo_key: metadata
                .nar_hash()
                .map(|hash| format!("{} {hash}", repo.url)),
            locked_url,
        })
    }

    /// The hosts to build, in order: the named one, or for `all` every
    /// `nixosConfigurations` attribute, sorted, minus the repo's `exclude`;
    /// and the hosts of `all` that cannot be built, with why.
    async fn resolve_hosts(
        &self,
        repo: &RepoConfig,
        run: &Run<'_>,
        pinned: &Pinned,
        deadline: Instant,
    ) -> Result<(Vec<String>, Vec<SkippedHost>), HostFailure> {
        let job = run.job;
        let remembered = pinned
            .memo_key
            .as_ref()
            .and_then(|key| lock(&self.memo).hosts.get(key).cloned());
        let names = match remembered {
            Some(names) => names,
            None => {
                let invocation = self.nix.list_hosts(&pinned.locked_url);
                let stdout = self
                    .run_quiet(&invocation, deadline, run.cancel, ErrorCode::EvalFailed)
                    .await?;
                let names = host_names(&stdout).map_err(|err| {
                    HostFailure::failed(
                        ErrorCode::EvalFailed,
                        format!("nixosConfigurations is not an attribute set: {err}"),
                    )
                })?;
                if let Some(key) = &pinned.memo_key {
                    let mut memo = lock(&self.memo);
                    memo.make_room();
                    memo.hosts.insert(key.clone(), names.clone());
                }
                names
            }
        };
        match &job.target {
            Target::Host(host) => {
                if names.contains(host) {
                    Ok((vec![host.clone()], Vec::new()))
                } else {
                    // Attribute names are the flake author's text: quoted,
                    // so no control character reaches a message raw.
                    let known: Vec<String> = names
                        .iter()
                        .map(|name| crate::protocol::quote_for_error(name))
                        .collect();
                    Err(HostFailure::failed(
                        ErrorCode::UnknownHost,
                        format!(
                            "host {host:?} is not in nixosConfigurations of {}; known hosts: {}",
                            job.repo,
                            known.join(", ")
                        ),
                    ))
                }
            }
            Target::All => {
                let mut hosts = Vec::new();
                let mut skipped = Vec::new();
                for name in names {
                    if repo.exclude.contains(&name) {
                        continue;
                    }
                    // Names outside the subject charset cannot be requested
                    // by name, nor safely handed to Nix: such a host is not
                    // built, and the request says so and fails.
                    if is_valid_name(&name) {
                        hosts.push(name);
                    } else {
                        tracing::warn!(host = ?name, "skipping host whose name is not [A-Za-z0-9_-]+");
                        skipped.push(SkippedHost {
                            reason: format!(
                                "its name is not [A-Za-z0-9_-]+ (at most {} bytes, not starting with '-'); rename the attribute, or list it in the repo's exclude",
                                crate::protocol::MAX_NAME_BYTES
                            ),
                            host: crate::protocol::quote_for_error(&name)
                                .trim_matches('"')
                                .to_owned(),
                        });
                    }
                }
                if hosts.is_empty() && skipped.is_empty() {
                    return Err(HostFailure::failed(
                        ErrorCode::NoHosts,
                        format!(
                            "nixosConfigurations of {} has no host to build{}",
                            job.repo,
                            if repo.exclude.is_empty() {
                                String::new()
                            } else {
                                format!(" (exclude: {})", repo.exclude.join(", "))
                            }
                        ),
                    ));
                }
                Ok((hosts, skipped))
            }
        }
    }

    /// Waits for one host's evaluation and builds it, sending `host_started`,
    /// `progress`, `log` and `host_finished`.
    async fn build_host(
        &self,
        run: &Run<'_>,
        pinned: &Pinned,
        host: &str,
        (index, total): (usize, usize),
        (evaluations, evaluation): (&tokio::sync::Mutex<Evaluations>, usize),
    ) -> (HostSummary, Option<PendingChanges>) {
        let Run { job, cancel, .. } = *run;
        let started = Instant::now();
        // Status first: whoever hears `host_started` and asks for the status
        // then sees this host.
        self.monitor.host_started(host, index + 1, total);
        job.replies.send(
            &job.build_id,
            Event::HostStarted {
                host: host.to_owned(),
                index: index + 1,
                total,
            },
        );
        tracing::info!(%host, index = index + 1, total, "host started");

        let watch = HostWatch::new(job, host, self.config.builder.progress_interval);
        let result = watch
            .drive(async {
                let evaluated = evaluations.lock().await.get(evaluation, cancel).await?;
                if let Some(key) = &pinned.memo_key {
                    let mut memo = lock(&self.memo);
                    memo.make_room();
                    memo.evaluated
                        .insert((key.clone(), host.to_owned()), evaluated.clone());
                }
                self.build_evaluated(run, host, &evaluated, &watch).await
            })
            .await;

        let duration = started.elapsed();
        let duration_ms = millis(duration);
        let machines = watch.machines();
        self.monitor.derivations_built(&machines);
        let (status, out_path, cached, error, against) = match result {
            Ok(built) => (
                HostStatus::Success,
                Some(built.out_path),
                built.cached,
                None,
                built.against,
            ),
            Err(failure) => (failure.status, None, false, Some(failure.error), None),
        };
        // Read before this result replaces it in the monitor.
        let against = against.map(|against| Against {
            rev: self.monitor.default_rev(&job.repo, host, &against),
            out_path: against,
        });
        let summary = HostSummary {
            host: host.to_owned(),
            status,
            duration_ms,
            out_path: out_path.clone(),
            cached,
            changed_packages: None,
            size_delta: None,
        };
        if status == HostStatus::Cancelled && cancel.pauses() {
            // Paused: the host builds again after the restart, so it gets
            // no result now (nor in the journal).
            tracing::info!(%host, "host interrupted");
            return (summary, None);
        }
        if status != HostStatus::Cancelled {
            self.journal.note(Record::Host {
                build_id: job.build_id.clone(),
                summary: summary.clone(),
            });
        }
        self.monitor.host_finished(
            &job.repo,
            host,
            (job.git_ref.as_deref(), job.rev.is_some(), &run.lineage),
            status,
            duration,
            pinned.rev.as_deref(),
            out_path.as_deref(),
        );
        match &error {
            None => tracing::info!(
                %host,
                duration_ms,
                cached,
                out_path = out_path.as_deref().unwrap_or("-"),
                "host built"
            ),
            Some(err) => {
                tracing::warn!(%host, duration_ms, %status, code = %err.code, "host failed")
            }
        }
        let finished = Event::HostFinished {
            host: host.to_owned(),
            status,
            duration_ms,
            out_path: out_path.clone(),
            cached,
            error,
            changes: None,
            machines,
        };
        let (Some(out_path), Some(against)) = (out_path, against) else {
            job.replies.send(&job.build_id, finished);
            return (summary, None);
        };
        // What the build changes is worked out beside the next host's
        // build; `host_finished` goes out with it.
        let default_ref = run.lineage == Lineage::Default;
        let task = tokio::spawn({
            let nix = self.nix.clone();
            let monitor = Arc::clone(&self.monitor);
            let replies = job.replies.clone();
            let (build_id, repo, host) = (job.build_id.clone(), job.repo.clone(), host.to_owned());
            let cancel = cancel.token().clone();
            async move {
                let deadline = Instant::now() + CHANGES_TIME_LIMIT;
                let changes = match host_changes(&nix, &out_path, against, deadline, &cancel).await
                {
                    Ok(changes) => Some(changes),
                    Err(err) => {
                        tracing::warn!(%host, %err, "cannot tell what the build changes");
                        None
                    }
                };
                if let (Some(changes), true) = (&changes, default_ref) {
                    monitor.closure_size(&repo, &host, changes.closure_size);
                }
                let mut finished = finished;
                if let Event::HostFinished { changes: slot, .. } = &mut finished {
                    slot.clone_from(&changes);
                }
                replies.send(&build_id, finished);
                (host, changes)
            }
            .instrument(tracing::Span::current())
        });
        (summary, Some(task))
    }

    /// Builds an evaluated host from its derivation (no second evaluation),
    /// or finds its output already in the store.
    async fn build_evaluated(
        &self,
        run: &Run<'_>,
        host: &str,
        evaluated: &Evaluated,
        watch: &HostWatch<'_>,
    ) -> Result<Built, HostFailure> {
        let deadline = Instant::now() + self.config.builder.host_timeout;
        let out_link = run.roots.as_ref().map(|roots| roots.out_link(host));
        let mut built = self
            .build_or_find(evaluated, out_link.as_deref(), watch, deadline, run.cancel)
            .await?;
        built.against = self
            .roots
            .as_ref()
            .and_then(|roots| roots.default_result(&run.job.repo, host));
        if let Some(roots) = &self.roots {
            let evicted = roots
                .record(
                    &self.nix,
                    (&run.job.repo, &run.lineage),
                    host,
                    &built.out_path,
                    deadline,
                    run.cancel,
                )
                .await?;
            self.monitor.forget_side_results(&run.job.repo, &evicted);
        }
        Ok(built)
    }

    /// Builds the host's derivation into `out_link` (rooted from the moment
    /// the output exists). An output already in the store is reported as
    /// cached; it is still "built" (nothing to do but link it), so it is
    /// rooted before anything could collect it.
    async fn build_or_find(
        &self,
        evaluated: &Evaluated,
        out_link: Option<&str>,
        watch: &HostWatch<'_>,
        deadline: Instant,
        cancel: &Cancellation,
    ) -> Result<Built, HostFailure> {
        let cached = self.is_valid(&evaluated.out_path, deadline, cancel).await;
        if cached && out_link.is_none() {
            return Ok(Built {
                out_path: evaluated.out_path.clone(),
                cached: true,
                against: None,
            });
        }

        let build = self.nix.build_drv(&evaluated.drv_path, out_link);
        let mut parser = LogParser::new();
        let mut tail = ErrorTail::default();
        let limits = process::Limits {
            max_silence: self.config.builder.max_silent_time,
            ..process::Limits::deadline(deadline)
        };
        let outcome = process::run_limited(&build, limits, cancel.token(), &mut |line: &str| {
            let event = parser.parse(line);
            watch.observe(&event, &parser);
            tail.observe(&event);
        })
        .await;
        let stdout = self.interpret(outcome, tail, ErrorCode::BuildFailed, cancel)?;
        let out_path = out_path_from_build_json(&stdout).ok_or_else(|| {
            HostFailure::failed(
                ErrorCode::BuildFailed,
                format!(
                    "nix build reported no output path for {}: {}",
                    evaluated.drv_path,
                    String::from_utf8_lossy(&stdout).trim()
                ),
            )
        })?;
        Ok(Built {
            out_path,
            cached,
            against: None,
        })
    }

    /// Whether `path` is already valid in the store.
    async fn is_valid(&self, path: &str, deadline: Instant, cancel: &Cancellation) -> bool {
        let invocation = self.nix.check_validity(&[path]);
        let outcome = process::run(&invocation, deadline, cancel.token(), &mut |_: &str| {}).await;
        match outcome {
            Ok(Outcome::Exited { status, stdout }) => {
                status.success() && String::from_utf8_lossy(&stdout).trim().is_empty()
            }
            _ => false,
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
        let mut parser = LogParser::new();
        let mut tail = ErrorTail::default();
        let outcome = process::run(invocation, deadline, cancel.token(), &mut |line: &str| {
            tail.observe(&parser.parse(line));
        })
        .await;
        self.interpret(outcome, tail, failure_code, cancel)
    }

    /// Turns a finished Nix command into its stdout or the failure to report.
    fn interpret(
        &self,
        outcome: Result<Outcome, process::SpawnError>,
        tail: ErrorTail,
        failure_code: ErrorCode,
        cancel: &Cancellation,
    ) -> Result<Vec<u8>, HostFailure> {
        match outcome {
            Err(err) => Err(HostFailure::failed(ErrorCode::Internal, err.to_string())),
            Ok(Outcome::Exited { status, stdout }) if status.success() => Ok(stdout),
            Ok(Outcome::Exited { status, .. }) => {
                let mut message = tail.summary();
                if message.is_empty() {
                    message = format!("nix exited with {status} and printed no error");
                }
                if message.contains(NO_MACHINE_FOR_BUILD) {
                    message.push_str(NO_MACHINE_HINT);
                }
                Err(HostFailure::failed(failure_code, message))
            }
            Ok(outcome @ (Outcome::TimedOut | Outcome::Silent)) => {
                let mut message = match outcome {
                    Outcome::Silent => {
                        "killed after printing nothing for max_silent_time".to_owned()
                    }
                    _ if failure_code == ErrorCode::FetchFailed => format!(
                        "fetching the flake was killed after exceeding fetch_timeout ({})",
                        humantime::format_duration(self.config.builder.fetch_timeout)
                    ),
                    _ => format!(
                        "killed after exceeding host_timeout ({})",
                        humantime::format_duration(self.config.builder.host_timeout)
                    ),
                };
                if !tail.is_empty() {
                    message.push('\n');
                    message.push_str(&tail.summary());
                }
                Err(HostFailure::timeout(message))
            }
            Ok(Outcome::Cancelled) => Err(HostFailure::cancelled(cancel.reason())),
        }
    }
}

/// What Nix says when neither the local machine nor any remote builder
/// may take a derivation; its "cannot build on '<machine>'" messages before
/// it name the machines tried.
const NO_MACHINE_FOR_BUILD: &str = "unable to start any build";
const NO_MACHINE_HINT: &str = "\nno machine could take the build: local builds are disabled \
(max-jobs = 0) and every remote builder in Nix's `builders` was unreachable or lacks the \
system or features; see the machines in `homelab-deploy status`";

/// The request-level error of an `all` build that left hosts out.
fn skipped_error(skipped: &[SkippedHost]) -> ErrorBody {
    let list: Vec<String> = skipped
        .iter()
        .map(|s| format!("{:?}: {}", s.host, s.reason))
        .collect();
    ErrorBody::new(
        ErrorCode::HostsSkipped,
        format!(
            "{} host(s) of nixosConfigurations not built: {}",
            skipped.len(),
            list.join("; ")
        ),
    )
}
