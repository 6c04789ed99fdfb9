//! Running one accepted request from pin to its report: fetch and pin the
//! flake, resolve the hosts, evaluate them ahead (see [`super::eval`]) and
//! build them one after the other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tracing::Instrument;

use super::cancel::Cancellation;
use super::eval::{EvalSettings, Evaluated, Evaluations};
use super::monitor::Monitor;
use super::request::{HostFailure, Job, Report, millis};
use super::roots::GcRoots;
use super::watch::HostWatch;
use crate::config::{Config, RepoConfig};
use crate::nix::NixCli;
use crate::nix::argv::{Invocation, flake_url_with_ref};
use crate::nix::json::{FlakeMetadata, host_names, out_path_from_build_json};
use crate::nix::log::{ErrorTail, LogParser};
use crate::nix::process::{self, Outcome};
use crate::protocol::{
    BuildStatus, ErrorBody, ErrorCode, Event, HostStatus, HostSummary, Target, is_valid_name,
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
}

/// Evaluation results by locked flake URL. A locked URL pins every input,
/// so the same URL always evaluates to the same derivations: an unchanged
/// flake is not evaluated twice.
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
    /// The locked flake URL every host of the request is built from.
    locked_url: String,
    rev: Option<String>,
}

/// A host that built (or was found built).
struct Built {
    out_path: String,
    cached: bool,
}

/// One request on its way through [`Runner::run`]: the job, its
/// cancellation, and the pinned flake once known.
struct Run<'a> {
    job: &'a Job,
    cancel: &'a Cancellation,
}

impl Runner {
    /// A runner for `nix` as detected, with an empty memory.
    pub(crate) fn new(nix: NixCli, config: Arc<Config>, monitor: Arc<Monitor>) -> Self {
        let roots = config.builder.gc_roots_dir.clone().map(|dir| GcRoots {
            dir,
            keep: config.builder.keep_roots,
        });
        Self {
            nix,
            config,
            monitor,
            roots,
            memo: Mutex::new(Memo::default()),
        }
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
            let report = self.execute(&Run { job, cancel }).await;
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
        let Run { job, cancel } = *run;
        let started = Instant::now();
        let report = |status, rev, hosts, error| Report {
            status,
            rev,
            hosts,
            error,
            duration: started.elapsed(),
        };
        let early = |failure: HostFailure, rev| {
            report(failure.build_status(), rev, Vec::new(), Some(failure.error))
        };
        let Some(repo) = self.config.repos.get(&job.repo) else {
            // Validated on receipt; a config reload cannot happen mid-run.
            let error = ErrorBody::new(ErrorCode::UnknownRepo, "repo vanished from the config");
            return report(BuildStatus::Failed, None, Vec::new(), Some(error));
        };
        let deadline = started + self.config.builder.host_timeout;

        let pinned = match self.pin(repo, run, deadline).await {
            Ok(pinned) => pinned,
            Err(failure) => return early(failure, None),
        };
        tracing::info!(rev = pinned.rev.as_deref().unwrap_or("-"), "flake pinned");

        let hosts = match self.resolve_hosts(repo, run, &pinned, deadline).await {
            Ok(hosts) => hosts,
            Err(failure) => return early(failure, pinned.rev),
        };

        job.replies.send(
            &job.build_id,
            Event::Started {
                repo: job.repo.clone(),
                target: job.target.to_string(),
                rev: pinned.rev.clone(),
                hosts: hosts.clone(),
            },
        );

        let known: Vec<Option<Evaluated>> = {
            let memo = lock(&self.memo);
            hosts
                .iter()
                .map(|host| {
                    memo.evaluated
                        .get(&(pinned.locked_url.clone(), host.clone()))
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
        let mut evaluations = Evaluations::start(
            &self.nix,
            &pinned.locked_url,
            &hosts,
            known,
            &settings,
            cancel,
        );

        let total = hosts.len();
        let mut summaries = Vec::with_capacity(total);
        for (i, host) in hosts.iter().enumerate() {
            if cancel.is_cancelled() {
                summaries.push(HostSummary {
                    host: host.clone(),
                    status: HostStatus::Cancelled,
                    duration_ms: 0,
                    out_path: None,
                    cached: false,
                    changed_packages: None,
                    size_delta: None,
                });
                continue;
            }
            let summary = self
                .build_host(run, &pinned, host, (i, total), &mut evaluations)
                .await;
            summaries.push(summary);
        }
        evaluations.shutdown().await;

        // A cancel that came after the last host finished changes nothing.
        let status = if summaries.iter().any(|h| h.status == HostStatus::Cancelled) {
            BuildStatus::Cancelled
        } else if summaries.iter().all(|h| h.status == HostStatus::Success) {
            BuildStatus::Success
        } else {
            BuildStatus::Failed
        };
        let error = (status == BuildStatus::Cancelled)
            .then(|| ErrorBody::new(ErrorCode::Cancelled, cancel.reason()));
        report(status, pinned.rev, summaries, error)
    }

    /// Fetches the flake (bypassing Nix's fetch cache) and pins its commit.
    async fn pin(
        &self,
        repo: &RepoConfig,
        run: &Run<'_>,
        deadline: Instant,
    ) -> Result<Pinned, HostFailure> {
        let job = run.job;
        let url = flake_url_with_ref(&repo.url, job.git_ref.as_deref(), job.rev.as_deref());
        let invocation = self.nix.flake_metadata(&url);
        let stdout = self
            .run_quiet(&invocation, deadline, run.cancel, ErrorCode::FetchFailed)
            .await?;
        let metadata = FlakeMetadata::parse(&stdout).map_err(|err| {
            HostFailure::failed(
                ErrorCode::FetchFailed,
                format!("cannot read `nix flake metadata` output: {err}"),
            )
        })?;
        Ok(Pinned {
            rev: metadata.rev().map(str::to_owned),
            locked_url: metadata.url,
        })
    }

    /// The hosts to build, in order: the named one, or for `all` every
    /// `nixosConfigurations` attribute, sorted, minus the repo's `exclude`.
    async fn resolve_hosts(
        &self,
        repo: &RepoConfig,
        run: &Run<'_>,
        pinned: &Pinned,
        deadline: Instant,
    ) -> Result<Vec<String>, HostFailure> {
        let job = run.job;
        let remembered = lock(&self.memo).hosts.get(&pinned.locked_url).cloned();
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
                let mut memo = lock(&self.memo);
                memo.make_room();
                memo.hosts.insert(pinned.locked_url.clone(), names.clone());
                names
            }
        };
        match &job.target {
            Target::Host(host) => {
                if names.contains(host) {
                    Ok(vec![host.clone()])
                } else {
                    Err(HostFailure::failed(
                        ErrorCode::UnknownHost,
                        format!(
                            "host {host:?} is not in nixosConfigurations of {}; known hosts: {}",
                            job.repo,
                            names.join(", ")
                        ),
                    ))
                }
            }
            Target::All => Ok(names
                .into_iter()
                .filter(|name| {
                    // Names outside the subject charset cannot be requested
                    // by name either; they are left out of `all` as well.
                    if !is_valid_name(name) {
                        tracing::warn!(host = %name, "skipping host whose name is not [A-Za-z0-9_-]+");
                        return false;
                    }
                    !repo.exclude.contains(name)
                })
                .collect()),
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
        evaluations: &mut Evaluations,
    ) -> HostSummary {
        let Run { job, cancel } = *run;
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
                let evaluated = evaluations.get(index, cancel).await?;
                {
                    let mut memo = lock(&self.memo);
                    memo.make_room();
                    memo.evaluated.insert(
                        (pinned.locked_url.clone(), host.to_owned()),
                        evaluated.clone(),
                    );
                }
                self.build_evaluated(run, host, &evaluated, &watch).await
            })
            .await;

        let duration = started.elapsed();
        let duration_ms = millis(duration);
        let (status, out_path, cached, error) = match result {
            Ok(built) => (
                HostStatus::Success,
                Some(built.out_path),
                built.cached,
                None,
            ),
            Err(failure) => (failure.status, None, false, Some(failure.error)),
        };
        self.monitor.host_finished(
            &job.repo,
            host,
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
        job.replies.send(
            &job.build_id,
            Event::HostFinished {
                host: host.to_owned(),
                status,
                duration_ms,
                out_path: out_path.clone(),
                cached,
                error,
                // Filled by `changes::host_changes` once it is wired in.
                changes: None,
            },
        );
        HostSummary {
            host: host.to_owned(),
            status,
            duration_ms,
            out_path,
            cached,
            changed_packages: None,
            size_delta: None,
        }
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
        let built = self
            .build_or_find(evaluated, watch, deadline, run.cancel)
            .await?;
        if let Some(roots) = &self.roots {
            roots
                .record(
                    &self.nix,
                    &run.job.repo,
                    host,
                    &built.out_path,
                    deadline,
                    run.cancel,
                )
                .await?;
        }
        Ok(built)
    }

    async fn build_or_find(
        &self,
        evaluated: &Evaluated,
        watch: &HostWatch<'_>,
        deadline: Instant,
        cancel: &Cancellation,
    ) -> Result<Built, HostFailure> {
        if self.is_valid(&evaluated.out_path, deadline, cancel).await {
            return Ok(Built {
                out_path: evaluated.out_path.clone(),
                cached: true,
            });
        }

        let build = self.nix.build_drv(&evaluated.drv_path);
        let mut parser = LogParser::new();
        let mut tail = ErrorTail::default();
        let limits = process::Limits {
            max_silence: self.config.builder.max_silent_time,
            ..process::Limits::deadline(deadline)
        };
        let outcome = process::run_limited(&build, limits, cancel.token(), &mut |line: &str| {
            let event = parser.parse(line);
            watch.observe(&event, parser.building());
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
            cached: false,
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
                Err(HostFailure::failed(failure_code, message))
            }
            Ok(outcome @ (Outcome::TimedOut | Outcome::Silent)) => {
                let mut message = match outcome {
                    Outcome::Silent => {
                        "killed after printing nothing for max_silent_time".to_owned()
                    }
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
