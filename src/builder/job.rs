//! One accepted request from pin to `finished`: fetch and pin the flake,
//! resolve the hosts, then evaluate and build them one after the other.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::replies::Replies;
use crate::config::{Config, RepoConfig};
use crate::nix::NixCli;
use crate::nix::argv::{Invocation, flake_url_with_ref, is_drv_path};
use crate::nix::log::{ErrorTail, LogEvent, LogParser};
use crate::nix::process::{self, Outcome};
use crate::protocol::{
    BuildStatus, ErrorBody, ErrorCode, Event, HostStatus, HostSummary, Target, is_valid_name,
};

/// A request that passed validation and waits for its turn.
#[derive(Debug)]
pub struct Job {
    pub build_id: String,
    pub repo: String,
    pub target: Target,
    /// The ref to fetch: the request's, else the repo's default.
    pub git_ref: Option<String>,
    pub rev: Option<String>,
    pub replies: Replies,
}

/// What the builder needs to run any job.
pub struct Runner {
    pub nix: NixCli,
    pub config: Arc<Config>,
}

/// A flake fetched and pinned to one commit.
struct Pinned {
    /// The locked flake URL every host of the request is built from.
    locked_url: String,
    rev: Option<String>,
}

/// Result of the whole request, as reported in `finished`.
#[derive(Debug, Clone)]
pub struct JobReport {
    pub status: BuildStatus,
    pub rev: Option<String>,
    pub hosts: Vec<HostSummary>,
    pub error: Option<ErrorBody>,
    pub duration: Duration,
}

/// Why one host did not build.
struct HostFailure {
    status: HostStatus,
    error: ErrorBody,
}

/// What `nix flake metadata --json` prints that the builder uses.
#[derive(Deserialize)]
struct FlakeMetadata {
    url: String,
    revision: Option<String>,
    #[serde(default)]
    locked: LockedAttrs,
}

#[derive(Deserialize, Default)]
struct LockedAttrs {
    rev: Option<String>,
}

/// One entry of `nix build --json`.
#[derive(Deserialize)]
struct BuildResult {
    #[serde(default)]
    outputs: std::collections::BTreeMap<String, String>,
}

impl Runner {
    /// Runs `job` to its end and sends every event including `finished`.
    pub async fn run(&self, job: &Job, cancel: &CancellationToken) -> JobReport {
        let span = tracing::info_span!(
            "build",
            build_id = %job.build_id,
            repo = %job.repo,
            target = %job.target
        );
        async {
            let report = self.execute(job, cancel).await;
            tracing::info!(
                status = %report.status,
                duration_ms = report.duration.as_millis() as u64,
                "build finished"
            );
            report
        }
        .instrument(span)
        .await
    }

    async fn execute(&self, job: &Job, cancel: &CancellationToken) -> JobReport {
        let started = Instant::now();
        let report = |status, rev, hosts, error| JobReport {
            status,
            rev,
            hosts,
            error,
            duration: started.elapsed(),
        };
        let Some(repo) = self.config.repos.get(&job.repo) else {
            // Validated on receipt; a config reload cannot happen mid-run.
            let error = ErrorBody::new(ErrorCode::UnknownRepo, "repo vanished from the config");
            return report(BuildStatus::Failed, None, Vec::new(), Some(error));
        };
        let deadline = started + self.config.builder.host_timeout;

        let pinned = match self.pin(repo, job, deadline, cancel).await {
            Ok(pinned) => pinned,
            Err(failure) => {
                return report(
                    failure.build_status(),
                    None,
                    Vec::new(),
                    Some(failure.error),
                );
            }
        };
        tracing::info!(rev = pinned.rev.as_deref().unwrap_or("-"), "flake pinned");

        let hosts = match self
            .resolve_hosts(repo, job, &pinned, deadline, cancel)
            .await
        {
            Ok(hosts) => hosts,
            Err(failure) => {
                return report(
                    failure.build_status(),
                    pinned.rev,
                    Vec::new(),
                    Some(failure.error),
                );
            }
        };

        job.replies
            .send(
                &job.build_id,
                Event::Started {
                    repo: job.repo.clone(),
                    target: job.target.to_string(),
                    rev: pinned.rev.clone(),
                    hosts: hosts.clone(),
                },
            )
            .await;

        let total = hosts.len();
        let mut summaries = Vec::with_capacity(total);
        for (i, host) in hosts.iter().enumerate() {
            if cancel.is_cancelled() {
                summaries.push(HostSummary {
                    host: host.clone(),
                    status: HostStatus::Cancelled,
                    duration_ms: 0,
                    out_path: None,
                });
                continue;
            }
            summaries.push(
                self.build_host(job, &pinned, host, i + 1, total, cancel)
                    .await,
            );
        }

        let status = if cancel.is_cancelled() {
            BuildStatus::Cancelled
        } else if summaries.iter().all(|h| h.status == HostStatus::Success) {
            BuildStatus::Success
        } else {
            BuildStatus::Failed
        };
        let error = (status == BuildStatus::Cancelled)
            .then(|| ErrorBody::new(ErrorCode::Cancelled, "the builder is shutting down"));
        report(status, pinned.rev, summaries, error)
    }

    /// Fetches the flake (bypassing Nix's fetch cache) and pins its commit.
    async fn pin(
        &self,
        repo: &RepoConfig,
        job: &Job,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Pinned, HostFailure> {
        let url = flake_url_with_ref(&repo.url, job.git_ref.as_deref(), job.rev.as_deref());
        let invocation = self.nix.flake_metadata(&url);
        let stdout = self
            .run_quiet(&invocation, deadline, cancel, ErrorCode::FetchFailed)
            .await?;
        let metadata: FlakeMetadata = serde_json::from_slice(&stdout).map_err(|err| {
            HostFailure::failed(
                ErrorCode::FetchFailed,
                format!("cannot read `nix flake metadata` output: {err}"),
            )
        })?;
        let rev = metadata.revision.or(metadata.locked.rev);
        Ok(Pinned {
            locked_url: metadata.url,
            rev,
        })
    }

    /// The hosts to build, in order: the named one, or for `all` every
    /// `nixosConfigurations` attribute, sorted, minus the repo's `exclude`.
    async fn resolve_hosts(
        &self,
        repo: &RepoConfig,
        job: &Job,
        pinned: &Pinned,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, HostFailure> {
        let invocation = self.nix.list_hosts(&pinned.locked_url);
        let stdout = self
            .run_quiet(&invocation, deadline, cancel, ErrorCode::EvalFailed)
            .await?;
        let mut names: Vec<String> = serde_json::from_slice(&stdout).map_err(|err| {
            HostFailure::failed(
                ErrorCode::EvalFailed,
                format!("nixosConfigurations is not an attribute set: {err}"),
            )
        })?;
        names.sort();
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

    /// Evaluates and builds one host, sending `host_started`, `progress` and
    /// `host_finished`.
    async fn build_host(
        &self,
        job: &Job,
        pinned: &Pinned,
        host: &str,
        index: usize,
        total: usize,
        cancel: &CancellationToken,
    ) -> HostSummary {
        let started = Instant::now();
        let deadline = started + self.config.builder.host_timeout;
        job.replies
            .send(
                &job.build_id,
                Event::HostStarted {
                    host: host.to_owned(),
                    index,
                    total,
                },
            )
            .await;
        tracing::info!(%host, index, total, "host started");

        let result = self
            .eval_and_build(job, pinned, host, deadline, cancel)
            .await;
        let duration_ms = started.elapsed().as_millis() as u64;
        let (status, out_path, error) = match result {
            Ok(out_path) => (HostStatus::Success, Some(out_path), None),
            Err(failure) => (failure.status, None, Some(failure.error)),
        };
        match &error {
            None => {
                tracing::info!(%host, duration_ms, out_path = out_path.as_deref().unwrap_or("-"), "host built")
            }
            Some(err) => {
                tracing::warn!(%host, duration_ms, %status, code = %err.code, "host failed")
            }
        }
        job.replies
            .send(
                &job.build_id,
                Event::HostFinished {
                    host: host.to_owned(),
                    status,
                    duration_ms,
                    out_path: out_path.clone(),
                    error,
                },
            )
            .await;
        HostSummary {
            host: host.to_owned(),
            status,
            duration_ms,
            out_path,
        }
    }

    async fn eval_and_build(
        &self,
        job: &Job,
        pinned: &Pinned,
        host: &str,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<String, HostFailure> {
        let builder = &self.config.builder;
        let reporter =
            ProgressReporter::new(job, host, builder.progress_interval, builder.host_timeout);

        let eval = self.nix.eval_drv_path(&pinned.locked_url, host);
        let stdout = reporter
            .run(&eval, deadline, cancel, ErrorCode::EvalFailed)
            .await?;
        let drv_path = String::from_utf8_lossy(&stdout).trim().to_owned();
        if !is_drv_path(&drv_path) {
            return Err(HostFailure::failed(
                ErrorCode::EvalFailed,
                format!("{host}: evaluation did not produce a derivation path (got {drv_path:?})"),
            ));
        }

        let out_link = self.gc_root(&job.repo, host)?;
        let build = self
            .nix
            .build_drv(&drv_path, out_link.as_deref().and_then(|p| p.to_str()));
        let stdout = reporter
            .run(&build, deadline, cancel, ErrorCode::BuildFailed)
            .await?;
        out_path_from_build_json(&stdout).ok_or_else(|| {
            HostFailure::failed(
                ErrorCode::BuildFailed,
                format!(
                    "nix build reported no output path for {drv_path}: {}",
                    String::from_utf8_lossy(&stdout).trim()
                ),
            )
        })
    }

    /// `<gc_roots_dir>/<repo>/<host>`, its parent created, when GC roots are on.
    fn gc_root(&self, repo: &str, host: &str) -> Result<Option<PathBuf>, HostFailure> {
        let Some(dir) = &self.config.builder.gc_roots_dir else {
            return Ok(None);
        };
        let repo_dir = dir.join(repo);
        std::fs::create_dir_all(&repo_dir).map_err(|err| {
            HostFailure::failed(
                ErrorCode::Internal,
                format!(
                    "cannot create GC root directory {}: {err}",
                    repo_dir.display()
                ),
            )
        })?;
        Ok(Some(repo_dir.join(host)))
    }

    /// Runs a request-level Nix command (no host, no progress events).
    async fn run_quiet(
        &self,
        invocation: &Invocation,
        deadline: Instant,
        cancel: &CancellationToken,
        failure_code: ErrorCode,
    ) -> Result<Vec<u8>, HostFailure> {
        let mut parser = LogParser::new();
        let mut tail = ErrorTail::default();
        let outcome = process::run(invocation, deadline, cancel, |line| {
            tail.observe(&parser.parse(line));
        })
        .await;
        interpret(
            outcome,
            tail,
            failure_code,
            self.config.builder.host_timeout,
        )
    }
}

/// Runs a host's Nix commands while sending `progress` events: when Nix's
/// counts change (at most once a second) and at least every
/// `progress_interval` so a requester can tell slow from dead.
struct ProgressReporter<'a> {
    job: &'a Job,
    host: &'a str,
    interval: Duration,
    time_limit: Duration,
    last: Mutex<(u64, u64)>,
}

impl<'a> ProgressReporter<'a> {
    fn new(job: &'a Job, host: &'a str, interval: Duration, time_limit: Duration) -> Self {
        Self {
            job,
            host,
            interval,
            time_limit,
            last: Mutex::new((0, 0)),
        }
    }

    async fn run(
        &self,
        invocation: &Invocation,
        deadline: Instant,
        cancel: &CancellationToken,
        failure_code: ErrorCode,
    ) -> Result<Vec<u8>, HostFailure> {
        let counts = Mutex::new(*lock(&self.last));
        let mut parser = LogParser::new();
        let mut tail = ErrorTail::default();
        let outcome = {
            let run = process::run(invocation, deadline, cancel, |line| {
                let event = parser.parse(line);
                if let LogEvent::Progress { done, expected, .. } = event {
                    *lock(&counts) = (done, expected);
                }
                tail.observe(&event);
            });
            tokio::pin!(run);
            let mut ticker = tokio::time::interval(Duration::from_secs(1));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_sent = Instant::now();
            loop {
                tokio::select! {
                    outcome = &mut run => break outcome,
                    _ = ticker.tick() => {
                        let current = *lock(&counts);
                        let changed = current != *lock(&self.last);
                        if changed || last_sent.elapsed() >= self.interval {
                            *lock(&self.last) = current;
                            last_sent = Instant::now();
                            self.send(current).await;
                        }
                    }
                }
            }
        };
        interpret(outcome, tail, failure_code, self.time_limit)
    }

    async fn send(&self, (done, expected): (u64, u64)) {
        self.job
            .replies
            .send(
                &self.job.build_id,
                Event::Progress {
                    host: self.host.to_owned(),
                    done,
                    expected,
                },
            )
            .await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Turns a finished Nix command into its stdout or the failure to report.
fn interpret(
    outcome: Result<Outcome, process::SpawnError>,
    tail: ErrorTail,
    failure_code: ErrorCode,
    time_limit: Duration,
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
        Ok(Outcome::TimedOut) => Err(HostFailure {
            status: HostStatus::Timeout,
            error: ErrorBody::new(
                ErrorCode::Timeout,
                with_tail(
                    &format!(
                        "killed after exceeding host_timeout ({})",
                        humantime::format_duration(time_limit)
                    ),
                    &tail,
                ),
            ),
        }),
        Ok(Outcome::Cancelled) => Err(HostFailure {
            status: HostStatus::Cancelled,
            error: ErrorBody::new(ErrorCode::Cancelled, "cancelled"),
        }),
    }
}

fn with_tail(message: &str, tail: &ErrorTail) -> String {
    if tail.is_empty() {
        message.to_owned()
    } else {
        format!("{message}\n{}", tail.summary())
    }
}

impl HostFailure {
    fn failed(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: HostStatus::Failed,
            error: ErrorBody::new(code, message),
        }
    }

    /// How a failure before any host built ends the whole request.
    fn build_status(&self) -> BuildStatus {
        match self.status {
            HostStatus::Cancelled => BuildStatus::Cancelled,
            HostStatus::Success | HostStatus::Failed | HostStatus::Timeout => BuildStatus::Failed,
        }
    }
}

/// The `out` path (or the only output) from `nix build --json`. `None` when
/// Nix built no outputs, which is what a bare `.drv` installable does on Nix
/// 2.15+: it must fail loudly, not pass as success.
pub fn out_path_from_build_json(stdout: &[u8]) -> Option<String> {
    let results: Vec<BuildResult> = serde_json::from_slice(stdout).ok()?;
    let first = results.into_iter().next()?;
    let mut outputs = first.outputs;
    outputs
        .remove("out")
        .or_else(|| outputs.into_values().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_path_is_taken_from_the_out_output() {
        let json = br#"[{"drvPath":"/nix/store/a.drv","outputs":{"dev":"/nix/store/d","out":"/nix/store/o"}}]"#;
        assert_eq!(
            out_path_from_build_json(json).as_deref(),
            Some("/nix/store/o")
        );
        let json = br#"[{"drvPath":"/nix/store/a.drv","outputs":{"bin":"/nix/store/b"}}]"#;
        assert_eq!(
            out_path_from_build_json(json).as_deref(),
            Some("/nix/store/b")
        );
    }

    #[test]
    fn building_the_drv_file_itself_is_not_success() {
        // What `nix build --json /nix/store/x.drv` prints on Nix 2.15+.
        let json = br#"[{"path":"/nix/store/a.drv"}]"#;
        assert_eq!(out_path_from_build_json(json), None);
        assert_eq!(out_path_from_build_json(b"[]"), None);
        assert_eq!(out_path_from_build_json(b"garbage"), None);
    }

    #[test]
    fn flake_metadata_of_each_era_is_understood() {
        // Nix 2.8
        let old: FlakeMetadata = serde_json::from_str(r#"{"lastModified":1795826300,"locked":{"lastModified":1795826300,"narHash":"sha256-x","ref":"master","rev":"609da7ab2bec60c568928f7e8d760a36e14805b0","revCount":1,"type":"git","url":"file:///tmp/fl"},"locks":{"nodes":{"root":{}},"root":"root","version":7},"original":{"type":"git","url":"file:///tmp/fl"},"originalUrl":"git+file:///tmp/fl","path":"/nix/store/x-source","resolved":{"type":"git","url":"file:///tmp/fl"},"resolvedUrl":"git+file:///tmp/fl","revCount":1,"revision":"609da7ab2bec60c568928f7e8d760a36e14805b0","url":"git+file:///tmp/fl?ref=master&rev=609da7ab2bec60c568928f7e8d760a36e14805b0"}"#).unwrap();
        assert_eq!(
            old.revision.as_deref(),
            Some("609da7ab2bec60c568928f7e8d760a36e14805b0")
        );
        assert!(old.url.contains("rev=609da7ab"));
        // Nix 2.24 adds fingerprint and puts more attributes in the URL.
        let new: FlakeMetadata = serde_json::from_str(r#"{"fingerprint":"abc","lastModified":1795826300,"locked":{"lastModified":1795826300,"narHash":"sha256-x","ref":"master","rev":"609da7ab2bec60c568928f7e8d760a36e14805b0","revCount":1,"type":"git","url":"file:///tmp/fl"},"locks":{},"original":{},"originalUrl":"git+file:///tmp/fl","path":"/nix/store/x-source","resolved":{},"resolvedUrl":"git+file:///tmp/fl","revCount":1,"revision":"609da7ab2bec60c568928f7e8d760a36e14805b0","url":"git+file:///tmp/fl?lastModified=1795826300&narHash=sha256-x&ref=master&rev=609da7ab2bec60c568928f7e8d760a36e14805b0&revCount=1"}"#).unwrap();
        assert_eq!(
            new.revision.as_deref(),
            Some("609da7ab2bec60c568928f7e8d760a36e14805b0")
        );
    }
}
