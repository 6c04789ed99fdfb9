//! The build service: take requests from NATS, validate and queue them, and
//! run them one at a time.

pub mod eval;
pub mod job;
pub mod monitor;
pub mod queue;
pub mod replies;

use std::sync::Arc;
use std::time::Duration;

use async_nats::Message;
use futures_util::StreamExt;
use thiserror::Error;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{self, Exporter, MetricsError};
use crate::nats::{self, NatsError};
use crate::nix::NixCli;
use crate::nix::version::{NixVersion, VersionError};
use crate::protocol::{
    self, BuildRequest, BuildStatus, ErrorBody, ErrorCode, Event, HostStatus, REQUEST_SUBSCRIPTION,
    RESPONSES_PREFIX, RequestError, STATUS_SUBJECT, StatusEvent, SubjectKind, Target,
};
use crate::systemd;
use job::{Job, JobReport, Runner};
use monitor::Monitor;
use queue::{PushError, Queue};
use replies::Replies;

/// How long shutdown waits for the last replies to reach the server.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

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

/// A queued job plus the signal that its `accepted` event is out, so the
/// worker never sends `started` ahead of it.
pub struct Queued {
    job: Job,
    announced: oneshot::Receiver<()>,
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
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(metrics::serve(
        listener,
        Arc::clone(&monitor) as Arc<dyn Exporter>,
        http_stop.clone(),
    ));

    let settings = nats::ConnectSettings {
        urls: config.nats.url.to_vec(),
        auth: match (&config.nats.nkey_seed_file, &config.nats.credentials_file) {
            (Some(seed), _) => nats::Auth::NkeySeedFile(seed.clone()),
            (None, Some(creds)) => nats::Auth::CredentialsFile(creds.clone()),
            (None, None) => nats::Auth::None,
        },
        name: "homelab-deploy-builder".to_owned(),
        retry_initial_connect: true,
    };
    let client = nats::connect(&settings, {
        let monitor = Arc::clone(&monitor);
        move |event| monitor.nats_event(event)
    })
    .await?;
    monitor.set_nats(client.clone());
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
    client
        .flush()
        .await
        .map_err(|err| BuilderError::Subscribe {
            subject: REQUEST_SUBSCRIPTION.to_owned(),
            reason: err.to_string(),
        })?;
    tracing::info!(
        subject = REQUEST_SUBSCRIPTION,
        repos = config.repos.len(),
        "builder ready"
    );
    systemd::ready();

    tracing::info!(
        workers = config.builder.eval_workers,
        max_memory = %config.builder.eval_max_memory,
        "evaluating ahead of builds"
    );
    let runner = Arc::new(Runner::new(
        NixCli::new("nix", version),
        Arc::clone(&config),
        Arc::clone(&monitor),
    ));
    let mut worker = tokio::spawn(work(
        Arc::clone(&queue),
        runner,
        Arc::clone(&monitor),
        shutdown.clone(),
    ));
    let intake = Intake {
        config: Arc::clone(&config),
        client: client.clone(),
        queue: Arc::clone(&queue),
        monitor: Arc::clone(&monitor),
    };

    let watchdog_every = systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
    let mut closing = false;
    loop {
        tokio::select! {
            message = requests.next() => match message {
                Some(message) => intake.handle(message).await,
                None => {
                    tracing::error!("request subscription ended; shutting down");
                    shutdown.cancel();
                    break;
                }
            },
            Some(message) = status_requests.next() => intake.status(message).await,
            _ = watchdog.tick(), if watchdog_every.is_some() => systemd::watchdog(),
            () = shutdown.cancelled(), if !closing => {
                closing = true;
                systemd::stopping();
                tracing::info!("shutting down: cancelling queued and running builds");
                for queued in queue.close() {
                    cancel_waiting(queued.job, &monitor).await;
                }
            }
            _ = &mut worker, if closing => break,
        }
    }
    if !worker.is_finished() {
        for queued in queue.close() {
            cancel_waiting(queued.job, &monitor).await;
        }
        let _ = worker.await;
    }
    let _ = requests.unsubscribe().await;
    let _ = status_requests.unsubscribe().await;
    if tokio::time::timeout(FINAL_FLUSH, client.flush())
        .await
        .is_err()
    {
        tracing::warn!("could not flush the last replies before exiting");
    }
    http_stop.cancel();
    let _ = http.await;
    tracing::info!("builder stopped");
    Ok(())
}

/// Receives requests: validates, queues and acknowledges them.
struct Intake {
    config: Arc<Config>,
    client: async_nats::Client,
    queue: Arc<Queue<Queued>>,
    monitor: Arc<Monitor>,
}

impl Intake {
    async fn handle(&self, message: Message) {
        let (repo, target) = match protocol::classify_subject(&message.subject) {
            SubjectKind::Build { repo, target } => (repo.to_owned(), target.to_owned()),
            // Replies (ours included) and anything else are never requests.
            SubjectKind::Response | SubjectKind::Other => return,
        };
        let build_id = protocol::new_build_id();
        let replies = Replies::new(self.client.clone(), message.reply.clone());
        let span = tracing::info_span!("request", %build_id, %repo, %target);

        let validated = self.validate(&repo, &target, &message);
        let (target, request) = match validated {
            Ok(ok) => ok,
            Err(err) => {
                tracing::warn!(parent: &span, code = %err.code(), %err, "request rejected");
                self.monitor.rejected(err.code());
                replies
                    .send(
                        &build_id,
                        Event::Rejected {
                            error: err.to_error_body(),
                        },
                    )
                    .await;
                return;
            }
        };
        let git_ref = request
            .git_ref
            .clone()
            .or_else(|| self.config.repos.get(&repo).and_then(|r| r.git_ref.clone()));
        let (announce, announced) = oneshot::channel();
        let job = Job {
            build_id: build_id.clone(),
            repo: repo.clone(),
            target: target.clone(),
            git_ref: git_ref.clone(),
            rev: request.rev.map(|rev| rev.to_ascii_lowercase()),
            logs: request.logs,
            replies: replies.clone(),
            received_at: std::time::SystemTime::now(),
        };
        let pushed = self.queue.push(Queued { job, announced });
        let event = match pushed {
            Ok(queue_position) => {
                tracing::info!(parent: &span, queue_position, git_ref = git_ref.as_deref().unwrap_or("-"), "request accepted");
                Event::Accepted {
                    repo,
                    target: target.to_string(),
                    git_ref,
                    queue_position,
                }
            }
            Err(PushError::Full) => {
                tracing::warn!(parent: &span, limit = self.config.builder.queue_limit, "request rejected: queue full");
                self.monitor.rejected(ErrorCode::QueueFull);
                Event::Rejected {
                    error: ErrorBody::new(
                        ErrorCode::QueueFull,
                        format!(
                            "{} requests are already waiting (queue_limit); try again later",
                            self.config.builder.queue_limit
                        ),
                    ),
                }
            }
            Err(PushError::Closed) => {
                tracing::warn!(parent: &span, "request rejected: shutting down");
                self.monitor.rejected(ErrorCode::ShuttingDown);
                Event::Rejected {
                    error: ErrorBody::new(
                        ErrorCode::ShuttingDown,
                        "the builder is shutting down; try again when it is back",
                    ),
                }
            }
        };
        replies.send(&build_id, event).await;
        // Dropped on rejection too, which is harmless: nobody waits then.
        let _ = announce.send(());
    }

    /// Answers a `build.status` request.
    async fn status(&self, message: Message) {
        let Some(reply) = message.reply else {
            return;
        };
        if !reply.starts_with(RESPONSES_PREFIX) {
            tracing::warn!(subject = %reply, "status request with a reply subject outside build.responses.; ignored");
            return;
        }
        let status = StatusEvent::Status(self.monitor.status());
        match serde_json::to_vec(&status) {
            Ok(payload) => {
                if let Err(err) = self.client.publish(reply, payload.into()).await {
                    tracing::warn!(%err, "cannot publish the status reply");
                }
            }
            Err(err) => tracing::error!(%err, "cannot encode the status reply"),
        }
    }

    fn validate(
        &self,
        repo: &str,
        target: &str,
        message: &Message,
    ) -> Result<(Target, BuildRequest), RequestError> {
        if !self.config.repos.contains_key(repo) {
            return Err(RequestError::UnknownRepo {
                repo: protocol::quote_for_error(repo),
                known: self
                    .config
                    .repos
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let target = Target::parse(target)?;
        if let Some(reply) = &message.reply {
            if !reply.starts_with(RESPONSES_PREFIX) {
                return Err(RequestError::BadReplySubject {
                    subject: protocol::quote_for_error(reply),
                });
            }
        }
        let request = BuildRequest::parse(&message.payload)?;
        Ok((target, request))
    }
}

/// The single worker: runs queued jobs one after the other.
async fn work(
    queue: Arc<Queue<Queued>>,
    runner: Arc<Runner>,
    monitor: Arc<Monitor>,
    cancel: CancellationToken,
) {
    monitor.worker_running(true);
    while let Some(Queued { job, announced }) = queue.next().await {
        let _ = announced.await;
        let replies = job.replies.clone();
        let build_id = job.build_id.clone();
        let (repo, target) = (job.repo.clone(), job.target.to_string());
        monitor.build_started(&build_id, &repo, &target, job.git_ref.as_deref());
        let task = tokio::spawn({
            let runner = Arc::clone(&runner);
            let cancel = cancel.clone();
            async move { runner.run(&job, &cancel).await }
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
        monitor.build_finished(&build_id, &repo, report.status, report.duration);
        replies
            .send(&build_id, finished_event(repo, target, report))
            .await;
        queue.done();
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

/// Ends a request that never started because the builder is stopping.
async fn cancel_waiting(job: Job, monitor: &Monitor) {
    tracing::info!(build_id = %job.build_id, "cancelling queued build");
    let report = JobReport {
        status: BuildStatus::Cancelled,
        rev: None,
        hosts: Vec::new(),
        error: Some(ErrorBody::new(
            ErrorCode::Cancelled,
            "the builder is shutting down",
        )),
        duration: Duration::ZERO,
    };
    monitor.build_finished(&job.build_id, &job.repo, report.status, report.duration);
    job.replies
        .send(
            &job.build_id,
            finished_event(job.repo.clone(), job.target.to_string(), report),
        )
        .await;
}
