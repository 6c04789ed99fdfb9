//! The build service: take requests from NATS, validate and queue them, and
//! run them one at a time.
//!
//! [`intake`] answers requests at once; a single worker runs the queue
//! ([`queue`]) through [`job`], which evaluates ahead ([`eval`]) and
//! builds; every reply goes out through one non-blocking publisher
//! ([`replies`]); [`monitor`] keeps what operators see.

pub mod eval;
pub mod intake;
pub mod job;
pub mod monitor;
pub mod queue;
pub mod replies;
pub mod roots;
pub mod watch;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{self, Exporter, MetricsError};
use crate::nats::{self, NatsError};
use crate::nix::NixCli;
use crate::nix::version::{NixVersion, VersionError};
use crate::protocol::{
    BuildStatus, CANCEL_SUBJECT, ErrorBody, ErrorCode, Event, HostStatus, REQUEST_SUBSCRIPTION,
    STATUS_SUBJECT,
};
use crate::systemd;
use intake::Intake;
use job::{Job, JobReport, Runner};
use monitor::Monitor;
use queue::Queue;
use replies::Publisher;

/// How long shutdown waits for the last replies to reach the server.
const FINAL_FLUSH: Duration = Duration::from_secs(3);
/// Messages a subscription may hold before NATS drops them (as a slow
/// consumer): a flood of requests cannot grow the builder's memory.
const SUBSCRIPTION_CAPACITY: usize = 16_384;

/// Why the builder could not start or had to stop.
#[derive(Debug, Error)]
pub enum BuilderError {
    #[error(transparent)]
    Nix(#[from] VersionError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot subscribe to {subject}: {reason}")]
    Subscribe { subject: String, reason: String },
}

/// Why one host (or the request, before any host) did not succeed.
#[derive(Debug, Clone)]
pub struct HostFailure {
    pub status: HostStatus,
    pub error: ErrorBody,
}

impl HostFailure {
    /// A plain failure with `code`.
    pub fn failed(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: HostStatus::Failed,
            error: ErrorBody::new(code, message),
        }
    }

    /// The host ran past `host_timeout`.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self {
            status: HostStatus::Timeout,
            error: ErrorBody::new(ErrorCode::Timeout, message),
        }
    }

    /// The build was cancelled.
    pub fn cancelled() -> Self {
        Self {
            status: HostStatus::Cancelled,
            error: ErrorBody::new(ErrorCode::Cancelled, "cancelled"),
        }
    }

    /// How a failure before any host built ends the whole request.
    pub fn build_status(&self) -> BuildStatus {
        match self.status {
            HostStatus::Cancelled => BuildStatus::Cancelled,
            HostStatus::Success | HostStatus::Failed | HostStatus::Timeout => BuildStatus::Failed,
        }
    }
}

/// A job in the queue.
pub struct Queued {
    job: Job,
}

/// Runs the builder until `shutdown` fires and every request has its
/// terminal event.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BuilderError> {
    let config = Arc::new(config);
    let version = NixVersion::detect("nix").await?;
    tracing::info!(nix = %version, "detected Nix");

    let queue = Arc::new(Queue::new(config.builder.queue_limit));
    let monitor = Arc::new(Monitor::new(&config, Arc::clone(&queue))?);

    // Metrics come up first: a taken port fails the start at once, and
    // /healthz answers (503) while NATS is still out of reach.
    let listener = metrics::bind(config.metrics.listen).await?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics listening");
    }
    let background = CancellationToken::new();
    let http = tokio::spawn(metrics::serve(
        listener,
        Arc::clone(&monitor) as Arc<dyn Exporter>,
        background.clone(),
    ));

    let settings = nats::ConnectSettings {
        subscription_capacity: Some(SUBSCRIPTION_CAPACITY),
        ..nats::ConnectSettings::from_config(&config.nats, "homelab-deploy-builder")
    };
    // The publisher needs the connection, the connection's events need the
    // publisher: it is handed over once both exist.
    let publisher_slot = Arc::new(std::sync::OnceLock::<Arc<Publisher>>::new());
    let client = nats::connect(&settings, {
        let monitor = Arc::clone(&monitor);
        let publisher = Arc::clone(&publisher_slot);
        move |event| {
            monitor.nats_event(event);
            if let Some(publisher) = publisher.get() {
                publisher.nats_event(event);
            }
        }
    })
    .await?;
    let publisher = Publisher::new(client.clone());
    let _ = publisher_slot.set(Arc::clone(&publisher));
    monitor.set_nats(client.clone());
    let sender = tokio::spawn(Arc::clone(&publisher).run(background.clone()));

    let subscribe = |subject: &'static str| {
        let client = client.clone();
        async move {
            client
                .subscribe(subject)
                .await
                .map_err(|err| BuilderError::Subscribe {
                    subject: subject.to_owned(),
                    reason: err.to_string(),
                })
        }
    };
    let mut requests = subscribe(REQUEST_SUBSCRIPTION).await?;
    let mut status_requests = subscribe(STATUS_SUBJECT).await?;
    let mut cancel_requests = subscribe(CANCEL_SUBJECT).await?;
    // Until NATS is reachable this waits (retrying); a signal still stops it.
    tokio::select! {
        flushed = client.flush() => flushed.map_err(|err| BuilderError::Subscribe {
            subject: REQUEST_SUBSCRIPTION.to_owned(),
            reason: err.to_string(),
        })?,
        () = shutdown.cancelled() => {
            tracing::info!("stopped before NATS was reachable");
            background.cancel();
            let _ = tokio::join!(http, sender);
            return Ok(());
        }
    }

    let runner = Arc::new(Runner::new(
        NixCli::new("nix", version),
        Arc::clone(&config),
        Arc::clone(&monitor),
    ));
    // Alive from here, not from when the task first runs: ready means
    // `/healthz` says ok.
    monitor.worker_running(true);
    let mut worker = tokio::spawn(work(
        Arc::clone(&queue),
        runner,
        Arc::clone(&monitor),
        shutdown.clone(),
    ));
    tracing::info!(
        subject = REQUEST_SUBSCRIPTION,
        repos = config.repos.len(),
        workers = config.builder.eval_workers,
        max_memory = %config.builder.eval_max_memory,
        "builder ready"
    );
    systemd::ready();
    let intake = Intake {
        config: Arc::clone(&config),
        publisher: Arc::clone(&publisher),
        queue: Arc::clone(&queue),
        monitor: Arc::clone(&monitor),
        rejection_log: intake::RateLimit::new(20),
    };

    let watchdog_every = systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    let mut closing = false;
    loop {
        tokio::select! {
            message = requests.next() => match message {
                Some(message) => intake.build(message),
                None => {
                    tracing::error!("request subscription ended; shutting down");
                    shutdown.cancel();
                    break;
                }
            },
            Some(message) = status_requests.next() => intake.status(message),
            Some(message) = cancel_requests.next() => intake.cancel(message),
            _ = watchdog.tick(), if watchdog_every.is_some() => systemd::watchdog(),
            () = shutdown.cancelled(), if !closing => {
                // New requests are refused (shutting_down) while the running
                // build stops and every waiting one gets its terminal event.
                closing = true;
                systemd::stopping();
                tracing::info!("shutting down: cancelling queued and running builds");
                for queued in queue.close() {
                    cancel_waiting(queued.job, &monitor, SHUTDOWN_MESSAGE);
                }
            }
            _ = &mut worker, if closing => break,
        }
    }
    if !worker.is_finished() {
        for queued in queue.close() {
            cancel_waiting(queued.job, &monitor, SHUTDOWN_MESSAGE);
        }
        let _ = worker.await;
    }
    for subscription in [&mut requests, &mut status_requests, &mut cancel_requests] {
        let _ = subscription.unsubscribe().await;
    }
    let delivered = publisher.drain(FINAL_FLUSH).await
        && tokio::time::timeout(FINAL_FLUSH, client.flush())
            .await
            .is_ok_and(|flushed| flushed.is_ok());
    if !delivered {
        tracing::warn!(
            backlog = publisher.backlog(),
            "could not deliver the last replies before exiting"
        );
    }
    background.cancel();
    let _ = tokio::join!(http, sender);
    tracing::info!("builder stopped");
    Ok(())
}

/// Why requests end when the builder stops.
const SHUTDOWN_MESSAGE: &str = "the builder is shutting down";

/// The single worker: runs queued jobs one after the other, each with its
/// own cancellation (shutdown, or `build.cancel`).
async fn work(
    queue: Arc<Queue<Queued>>,
    runner: Arc<Runner>,
    monitor: Arc<Monitor>,
    shutdown: CancellationToken,
) {
    loop {
        // Registered as running while still under the queue's lock, so a
        // `build.cancel` always finds the job in one place or the other.
        let cancel = shutdown.child_token();
        let taken = queue
            .next_with(|queued| monitor.build_started(&queued.job, cancel.clone()))
            .await;
        let Some(Queued { job }) = taken else {
            break;
        };
        let replies = job.replies.clone();
        let build_id = job.build_id.clone();
        let (repo, target) = (job.repo.clone(), job.target.to_string());
        let task = tokio::spawn({
            let runner = Arc::clone(&runner);
            let cancel = cancel.clone();
            let shutdown = shutdown.clone();
            async move {
                let reason = || {
                    if shutdown.is_cancelled() {
                        SHUTDOWN_MESSAGE
                    } else {
                        "cancelled by request"
                    }
                };
                runner.run(&job, &cancel, reason).await
            }
        });
        let report = match task.await {
            Ok(report) => report,
            Err(err) => {
                tracing::error!(%build_id, %err, "build task failed");
                JobReport {
                    status: BuildStatus::Failed,
                    rev: None,
                    hosts: Vec::new(),
                    error: Some(ErrorBody::new(
                        ErrorCode::Internal,
                        format!("the build task failed: {err}"),
                    )),
                    duration: Duration::ZERO,
                }
            }
        };
        // Everything that answers status and queue questions is settled
        // before the requester hears `finished`.
        monitor.build_finished(&build_id, &repo, report.status, report.duration);
        queue.done();
        replies.send(&build_id, finished_event(repo, target, report));
    }
    monitor.worker_running(false);
}

/// The `finished` event for a report.
fn finished_event(repo: String, target: String, report: JobReport) -> Event {
    let succeeded = report
        .hosts
        .iter()
        .filter(|h| h.status == HostStatus::Success)
        .count();
    Event::Finished {
        repo,
        target,
        rev: report.rev,
        status: report.status,
        duration_ms: report.duration.as_millis() as u64,
        succeeded,
        failed: report.hosts.len() - succeeded,
        hosts: report.hosts,
        error: report.error,
    }
}

/// Ends a request that never started: cancelled while it waited.
fn cancel_waiting(job: Job, monitor: &Monitor, reason: &str) {
    tracing::info!(build_id = %job.build_id, reason, "cancelling queued build");
    let report = JobReport {
        status: BuildStatus::Cancelled,
        rev: None,
        hosts: Vec::new(),
        error: Some(ErrorBody::new(ErrorCode::Cancelled, reason)),
        duration: Duration::ZERO,
    };
    monitor.build_finished(&job.build_id, &job.repo, report.status, report.duration);
    job.replies.send(
        &job.build_id,
        finished_event(job.repo.clone(), job.target.to_string(), report),
    );
}
