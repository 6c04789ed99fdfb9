//! One host of a request: wait for its evaluation, build it (or find it
//! built), root it, and report it with what it changed.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::Instrument;

use super::pin::Pinned;
use super::{Run, Runner};
use crate::builder::eval::{Evaluated, Evaluations};
use crate::builder::journal::Record;
use crate::builder::monitor::HostResult;
use crate::builder::request::{HostFailure, millis};
use crate::builder::roots::Lineage;
use crate::builder::step;
use crate::builder::watch::HostWatch;
use crate::changes::changes_known;
use crate::nix::json::out_path_from_build_json;
use crate::nix::process::Limits;
use crate::protocol::{Against, Changes, ErrorCode, Event, HostStatus, HostSummary};

/// A host that built (or was found built).
struct Built {
    out_path: String,
    cached: bool,
    /// The host's result on the default ref before this build (its
    /// current GC-root generation), to compare with; `None` for a first
    /// build or without `gc_roots_dir`.
    against: Option<String>,
}

/// A host's closure work beside the next host's build: its `host_finished`,
/// sent once its closure comparison is done, or its first result's closure
/// size.
pub(super) type PendingChanges = tokio::task::JoinHandle<(String, Option<Changes>)>;

/// Longest a closure comparison may take before `host_finished` goes out
/// without it.
const CHANGES_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Where a host stands in its request.
pub(super) struct HostSlot<'a> {
    pub(super) host: &'a str,
    /// Its position among the request's hosts, from 0, and their number.
    pub(super) index: usize,
    pub(super) total: usize,
    /// Its place among the evaluations (see `outcome::evaluation_order`).
    pub(super) evaluation: usize,
}

impl Runner {
    /// Waits for one host's evaluation and builds it, sending `host_started`,
    /// `progress`, `log` and `host_finished`.
    pub(super) async fn build_host(
        &self,
        run: &Run<'_>,
        pinned: &Pinned,
        slot: HostSlot<'_>,
        evaluations: &tokio::sync::Mutex<Evaluations>,
    ) -> (HostSummary, Option<PendingChanges>) {
        let Run { job, cancel, .. } = *run;
        let HostSlot {
            host,
            index,
            total,
            evaluation,
        } = slot;
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

        let watch = HostWatch::new(
            job,
            &self.monitor,
            host,
            self.config.builder.progress_interval,
        );
        let result = watch
            .drive(async {
                let evaluated = evaluations.lock().await.get(evaluation, cancel).await?;
                if let Some(key) = &pinned.memo_key {
                    self.memo().remember_evaluated(key, host, evaluated.clone());
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
        self.monitor.host_finished(&HostResult {
            repo: &job.repo,
            host,
            git_ref: job.git_ref.as_deref(),
            pinned: job.rev.is_some(),
            lineage: &run.lineage,
            status,
            duration,
            rev: pinned.rev.as_deref(),
            out_path: out_path.as_deref(),
        });
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
            closure_size: None,
        };
        let default_ref = run.lineage == Lineage::Default;
        // The host's first result on the default ref: nothing to compare
        // with, but its closure size is the host's gauge, and what a rebuild
        // that changes nothing reports without Nix.
        let first = (self.roots.is_some() && default_ref && against.is_none())
            .then(|| out_path.clone())
            .flatten();
        let (Some(out_path), Some(against)) = (out_path, against) else {
            // A first result's `host_finished` waits for its size.
            let task = match first {
                Some(out_path) => Some(self.read_closure_size(run, host, out_path, finished)),
                None => {
                    job.replies.send(&job.build_id, finished);
                    None
                }
            };
            return (summary, task);
        };
        // What the build changes is worked out beside the next host's
        // build; `host_finished` goes out with it.
        let task = tokio::spawn({
            let nix = self.nix.clone();
            let monitor = Arc::clone(&self.monitor);
            let sizes = Arc::clone(&self.closure_sizes);
            let replies = job.replies.clone();
            let (build_id, repo, host) = (job.build_id.clone(), job.repo.clone(), host.to_owned());
            let cancel = cancel.token().clone();
            async move {
                let deadline = Instant::now() + CHANGES_TIME_LIMIT;
                let changes = match changes_known(
                    &nix, &out_path, against, &sizes, deadline, &cancel,
                )
                .await
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
                if let Event::HostFinished {
                    changes: slot,
                    closure_size,
                    ..
                } = &mut finished
                {
                    *closure_size = changes.as_ref().map(|c| c.closure_size);
                    slot.clone_from(&changes);
                }
                replies.send(&build_id, finished);
                (host, changes)
            }
            .instrument(tracing::Span::current())
        });
        (summary, Some(task))
    }

    /// Reads the closure size of `host`'s new result (rooted as its
    /// generation) beside the next host's build, for its gauge, later
    /// comparisons and its `host_finished`, which it then sends.
    fn read_closure_size(
        &self,
        run: &Run<'_>,
        host: &str,
        out_path: String,
        mut finished: Event,
    ) -> PendingChanges {
        let nix = self.nix.clone();
        let monitor = Arc::clone(&self.monitor);
        let sizes = Arc::clone(&self.closure_sizes);
        let (repo, host) = (run.job.repo.clone(), host.to_owned());
        let cancel = run.cancel.token().clone();
        let (replies, build_id) = (run.job.replies.clone(), run.job.build_id.clone());
        tokio::spawn(
            async move {
                let deadline = Instant::now() + CHANGES_TIME_LIMIT;
                let size = match sizes.read(&nix, &out_path, deadline, &cancel).await {
                    Ok(size) => {
                        monitor.closure_size(&repo, &host, size);
                        Some(size)
                    }
                    Err(err) => {
                        tracing::warn!(%host, %err, "cannot read the closure size");
                        None
                    }
                };
                if let Event::HostFinished { closure_size, .. } = &mut finished {
                    *closure_size = size;
                }
                replies.send(&build_id, finished);
                (host, None)
            }
            .instrument(tracing::Span::current()),
        )
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
        // An unchanged host's output is its lineage's current generation,
        // which roots it for the whole request (see `roots`).
        let unchanged = self.roots.as_ref().is_some_and(|roots| {
            roots
                .current_result(&run.job.repo, &run.lineage, host)
                .as_deref()
                == Some(evaluated.out_path.as_str())
        });
        let mut built = if unchanged && self.is_valid(&evaluated.out_path, deadline, run).await {
            Built {
                out_path: evaluated.out_path.clone(),
                cached: true,
                against: None,
            }
        } else {
            if let (true, Some(roots)) = (unchanged, &run.roots) {
                // Its derivation may have been left unrooted (see `roots`).
                roots
                    .root_drv_to_build(&self.nix, host, &evaluated.drv_path, deadline, run.cancel)
                    .await?;
            }
            self.build_or_find(run, evaluated, out_link.as_deref(), watch, deadline)
                .await?
        };
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
        run: &Run<'_>,
        evaluated: &Evaluated,
        out_link: Option<&str>,
        watch: &HostWatch<'_>,
        deadline: Instant,
    ) -> Result<Built, HostFailure> {
        let cached = self.is_valid(&evaluated.out_path, deadline, run).await;
        if cached && out_link.is_none() {
            return Ok(Built {
                out_path: evaluated.out_path.clone(),
                cached: true,
                against: None,
            });
        }

        let build = self.nix.build_drv(&evaluated.drv_path, out_link);
        let limits = Limits {
            max_silence: self.config.builder.max_silent_time,
            ..Limits::deadline(deadline)
        };
        let stdout = step::run_step(&build, limits, run.cancel.token(), &mut |event, parser| {
            watch.observe(event, parser);
        })
        .await
        .map_err(|failure| self.explain(failure, ErrorCode::BuildFailed, run.cancel))?;
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
    async fn is_valid(&self, path: &str, deadline: Instant, run: &Run<'_>) -> bool {
        let invocation = self.nix.check_validity(&[path]);
        step::run_quiet(&invocation, Limits::deadline(deadline), run.cancel.token())
            .await
            .is_ok_and(|stdout| String::from_utf8_lossy(&stdout).trim().is_empty())
    }
}
