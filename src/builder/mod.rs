//! The build service: take requests from NATS, validate and queue them, and
//! run them one request at a time (a request's hosts build up to
//! `parallel_hosts` at once).
//!
//! The layers, from the wire inwards (docs/architecture.md draws them):
//! [`intake`] answers requests at once and queues accepted ones
//! ([`request`], [`queue`]); a single worker hands each to the [`runner`],
//! which evaluates ahead ([`eval`]), builds while [`watch`] reports on it,
//! and roots what it built ([`roots`]), running Nix through [`step`];
//! [`finisher`] ends or pauses every request; every reply goes out through a
//! non-blocking publisher ([`replies`]), one per NATS connection (status
//! and cancel requests have their own); [`monitor`] keeps what operators
//! see; [`cancel`] carries why a request stopped.

mod cancel;
mod eval;
mod finisher;
mod intake;
mod journal;
mod live;
mod machines;
mod memory;
mod monitor;
mod queue;
mod replies;
mod request;
mod roots;
mod runner;
mod step;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Message, Subscriber};
use futures_util::StreamExt;
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::history::{EventTap, Recorder};
use crate::metrics::{self, Exporter, MetricsError};
use crate::nats::{self, Connection, NatsError};
use crate::nix::NixCli;
use crate::nix::version::{NixVersion, VersionError};
use crate::protocol::{
    BuildStatus, CANCEL_SUBJECT, ErrorBody, ErrorCode, STATUS_SUBJECT, default_queue_group,
    repo_subscription,
};
use crate::systemd;
use crate::web::Web;
use cancel::{Cancellation, StopReason};
use finisher::{Finisher, Stage};
use intake::Intake;
use journal::{Journal, Journaling};
use live::LiveRequests;
use monitor::Monitor;
use queue::Queue;
use replies::Publisher;
use request::{Job, Report};
use runner::Runner;

/// How long shutdown waits for the last replies to reach the server.
const FINAL_FLUSH: Duration = Duration::from_secs(3);
// Stopping the running Nix (SIGTERM, then SIGKILL after the grace) and
// delivering the last replies fit in the promised budget.
const _: () = assert!(
    crate::nix::process::KILL_GRACE.as_secs() + FINAL_FLUSH.as_secs()
        < crate::SHUTDOWN_BUDGET.as_secs()
);
/// Messages a subscription may hold before NATS drops them (as a slow
/// consumer): a flood of requests cannot grow the builder's memory.
const SUBSCRIPTION_CAPACITY: usize = 16_384;
/// How long the builder waits for NATS before telling systemd it is ready
/// anyway: it serves metrics and `/healthz` (which says NATS is down) and
/// takes requests as soon as NATS is back, so a NATS outage at boot must
/// not make systemd time the unit out and restart it in a loop.
const NATS_READY_WAIT: Duration = Duration::from_secs(5);

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
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

/// Runs the builder until `shutdown` fires and every request has its
/// terminal event.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), BuilderError> {
    let shutdown = Cancellation::root(shutdown, stop_reason(&config));
    let mut service = Service::start(config, &shutdown).await?;
    service.serve(&shutdown).await;
    service.stop(&shutdown).await;
    Ok(())
}

/// What stopping the builder does to its requests: with a journal to
/// resume from, it pauses them until the next start; without, it ends them.
fn stop_reason(config: &Config) -> StopReason {
    if config.builder.journal_file.is_some() && config.builder.resume {
        StopReason::Interrupted
    } else {
        StopReason::Shutdown
    }
}

/// The tasks taking requests, one per subscription, each handing its
/// messages to the intake: a flood on one (of status requests, say) never
/// holds up the others, and they run side by side.
struct Readers {
    /// One per repo.
    builds: Vec<JoinHandle<Subscriber>>,
    status: JoinHandle<Subscriber>,
    cancels: JoinHandle<Subscriber>,
    /// Stops them, once the last request has its answer.
    stop: CancellationToken,
    /// Fires if NATS ends a build subscription.
    builds_ended: CancellationToken,
}

impl Readers {
    fn start(subscriptions: Subscriptions, intake: &Arc<Intake>) -> Self {
        let Subscriptions {
            builds,
            status,
            cancels,
        } = subscriptions;
        let stop = CancellationToken::new();
        let builds_ended = CancellationToken::new();
        let spawn = |subscription, ended, handle: fn(&Intake, Message)| {
            let intake = Arc::clone(intake);
            tokio::spawn(read(subscription, stop.clone(), ended, move |message| {
                handle(&intake, message)
            }))
        };
        Self {
            builds: builds
                .into_iter()
                .map(|repo| spawn(repo, Some(builds_ended.clone()), Intake::build))
                .collect(),
            status: spawn(status, None, Intake::status),
            cancels: spawn(cancels, None, Intake::cancel),
            stop,
            builds_ended,
        }
    }

    /// Stops taking requests and unsubscribes.
    async fn stop(self) {
        self.stop.cancel();
        for reader in self.builds.into_iter().chain([self.status, self.cancels]) {
            if let Ok(mut subscription) = reader.await {
                let _ = subscription.unsubscribe().await;
            }
        }
    }
}

/// The builder's subscriptions.
struct Subscriptions {
    /// `build.<repo>.*` of each repo, in its queue group.
    builds: Vec<Subscriber>,
    status: Subscriber,
    cancels: Subscriber,
}

/// Hands every message of `subscription` to `handle` until `stop`, or
/// until the subscription ends (then `ended` fires); gives it back.
async fn read(
    mut subscription: Subscriber,
    stop: CancellationToken,
    ended: Option<CancellationToken>,
    handle: impl Fn(Message),
) -> Subscriber {
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            message = subscription.next() => match message {
                Some(message) => handle(message),
                None => {
                    if let Some(ended) = &ended {
                        ended.cancel();
                    }
                    break;
                }
            },
        }
    }
    subscription
}

/// A started builder: every task running, requests taken once NATS is up.
struct Service {
    config: Arc<Config>,
    connection: Connection,
    /// Where status and cancel requests arrive and are answered.
    queries: Connection,
    /// Sends the answers to status and cancel requests.
    answers: Arc<Publisher>,
    answers_sender: JoinHandle<()>,
    publisher: Arc<Publisher>,
    intake: Arc<Intake>,
    monitor: Arc<Monitor>,
    readers: Readers,
    worker: JoinHandle<()>,
    /// Stops the metrics server and the publisher, after the last reply.
    background: CancellationToken,
    http: JoinHandle<()>,
    sender: JoinHandle<()>,
    heartbeats: JoinHandle<()>,
    machines: JoinHandle<()>,
    /// Feeds the history and `/api/v1/events`.
    tap: Arc<EventTap>,
}

impl Service {
    /// Detects Nix, serves metrics, connects to NATS (in the background:
    /// the builder starts without it), subscribes and starts the worker.
    async fn start(config: Config, shutdown: &Cancellation) -> Result<Self, BuilderError> {
        let config = Arc::new(config);
        let version = NixVersion::detect("nix").await?;
        tracing::info!(nix = %version, "detected Nix");

        // Metrics come up first: a taken port fails the start at once.
        let listener = metrics::bind(config.metrics.listen).await?;
        // The port actually bound (`:0` picks one).
        let listening = listener.local_addr().unwrap_or(config.metrics.listen);
        tracing::info!(addr = %listening, "metrics listening");
        let web_url = config.web.enabled.then(|| {
            let url = config.web.public_url(listening);
            tracing::info!(%url, "serving the status pages");
            url
        });
        let settings = nats::ConnectSettings {
            subscription_capacity: Some(SUBSCRIPTION_CAPACITY),
            ..nats::ConnectSettings::from_config(&config.nats, "homelab-deploy-builder")
        };
        let connection = nats::connect(&settings).await?;
        match &connection.signer {
            // Clients check replies against this key (--builder-key).
            Some(signer) => tracing::info!(key = signer.public_key(), "replies are signed"),
            None => tracing::warn!(
                "no NKey in [nats]: replies are not signed, so clients cannot tell them from forgeries"
            ),
        }

        let (journaling, recovered) = match &config.builder.journal_file {
            Some(path) => {
                let (journal, recovered) = Journal::open(path)?;
                if recovered.skipped > 0 {
                    tracing::warn!(
                        path = %path.display(),
                        lines = recovered.skipped,
                        "skipped unreadable journal lines (a write cut short by a crash, or damage)"
                    );
                }
                (Journaling::to(Arc::new(journal)), recovered.requests)
            }
            None => (Journaling::default(), Vec::new()),
        };

        let queue = Arc::new(Queue::shared(
            config.builder.queue_limit,
            config.builder.queue_per_owner,
            |job: &Job| job.owner.clone(),
        ));
        let monitor = Arc::new(
            Monitor::new(
                &config,
                Arc::clone(&queue),
                connection.state.clone(),
                journaling.clone(),
            )?
            .with_web_url(web_url),
        );
        let recorder = config.builder.history_db.as_deref().and_then(|path| {
            let resuming: Vec<String> = recovered
                .iter()
                .map(|unfinished| unfinished.request.build_id.clone())
                .collect();
            let failed = {
                let monitor = Arc::clone(&monitor);
                move || monitor.history_write_failed()
            };
            let keep = config.builder.history_keep.into();
            match Recorder::start(path, keep, &resuming, failed) {
                Ok(recorder) => {
                    tracing::info!(path = %path.display(), "keeping history");
                    Some(recorder)
                }
                // Builds matter more than their history: go on without it.
                Err(err) => {
                    tracing::error!(%err, "cannot keep history; building without it");
                    monitor.history_write_failed();
                    None
                }
            }
        });
        let tap = EventTap::new(recorder);
        let web = config.web.enabled.then(|| {
            let monitor = Arc::clone(&monitor);
            Arc::new(Web::new(
                move || monitor.status(),
                Arc::clone(&tap),
                config.builder.history_db.clone(),
            ))
        });
        let background = CancellationToken::new();
        let http = tokio::spawn(metrics::serve(
            listener,
            Arc::clone(&monitor) as Arc<dyn Exporter>,
            web,
            background.clone(),
        ));
        let publisher = Publisher::new(&connection, {
            let monitor = Arc::clone(&monitor);
            move || monitor.ignored("overloaded")
        });
        let sender = tokio::spawn(Arc::clone(&publisher).run(background.clone()));

        // Status and cancel requests come over a connection of their own: a
        // flood of them queues in the server and in that connection's
        // buffers, never ahead of a build request.
        // They are answered over it too: a server that lets the builder
        // only answer what it received (allow_responses) requires that.
        let queries = nats::connect(&nats::ConnectSettings {
            name: "homelab-deploy-builder-queries".to_owned(),
            ..settings.clone()
        })
        .await?;
        let answers = Publisher::new(&queries, {
            let monitor = Arc::clone(&monitor);
            move || monitor.ignored("overloaded")
        });
        let answers_sender = tokio::spawn(Arc::clone(&answers).run(background.clone()));
        let subscribe = |connection: &Connection, subject: String, group: Option<String>| {
            let client = connection.client.clone();
            async move {
                let subscribed = match group {
                    Some(group) => client.queue_subscribe(subject.clone(), group).await,
                    None => client.subscribe(subject.clone()).await,
                };
                subscribed.map_err(|err| BuilderError::Subscribe {
                    subject,
                    reason: err.to_string(),
                })
            }
        };
        // Only the builder's own repos, each in its queue group: a request
        // for a repo nobody serves gets NATS's "no responders", and
        // builders serving the same repo share its requests.
        let mut builds = Vec::with_capacity(config.repos.len());
        for repo in config.repos.keys() {
            let group = config
                .nats
                .queue_group
                .clone()
                .unwrap_or_else(|| default_queue_group(repo));
            builds.push(subscribe(&connection, repo_subscription(repo), Some(group)).await?);
        }
        // Every builder answers status; cancels reach every builder, and
        // the one that has the build answers.
        let subscriptions = Subscriptions {
            builds,
            status: subscribe(&queries, STATUS_SUBJECT.to_owned(), None).await?,
            cancels: subscribe(&queries, CANCEL_SUBJECT.to_owned(), None).await?,
        };

        let machines = tokio::spawn(machines::check_machines(
            NixCli::new("nix", version),
            Arc::clone(&monitor),
            background.clone(),
        ));
        let runner = Arc::new(Runner::new(
            NixCli::new("nix", version),
            Arc::clone(&config),
            Arc::clone(&monitor),
            journaling.clone(),
        ));
        // Roots left by a crash go before any request runs.
        runner.start_up().await;
        let live = Arc::new(LiveRequests::default());
        let finisher = Arc::new(Finisher::new(
            Arc::clone(&monitor),
            Arc::clone(&queue),
            journaling.clone(),
            Arc::clone(&live),
        ));
        let intake = Arc::new(
            Intake::new(
                Arc::clone(&config),
                Arc::clone(&publisher),
                Arc::clone(&answers),
                Arc::clone(&queue),
                Arc::clone(&monitor),
                Arc::clone(&live),
                journaling,
                Arc::clone(&finisher),
            )
            .tapping(Arc::clone(&tap)),
        );
        // Requests from before a stop or a crash run first, in their order.
        for unfinished in recovered {
            intake.resume(unfinished);
        }
        let heartbeats = tokio::spawn(send_heartbeats(
            Arc::clone(&live),
            config.builder.progress_interval,
            background.clone(),
        ));
        // Alive from here, not from when the task first runs: ready means
        // `/healthz` says ok.
        monitor.worker_running(true);
        let worker = tokio::spawn(work(
            queue,
            runner,
            Arc::clone(&monitor),
            finisher,
            shutdown.clone(),
        ));
        let readers = Readers::start(subscriptions, &intake);
        Ok(Self {
            config,
            connection,
            queries,
            answers,
            answers_sender,
            publisher,
            intake,
            monitor,
            readers,
            worker,
            background,
            http,
            sender,
            heartbeats,
            machines,
            tap,
        })
    }

    /// Answers requests until `shutdown` fires and the worker has ended
    /// every request.
    async fn serve(&mut self, shutdown: &Cancellation) {
        // Ready for systemd once the subscriptions are confirmed, or after
        // NATS_READY_WAIT without NATS (see there).
        let nats_up = {
            let client = self.connection.client.clone();
            let queries = self.queries.client.clone();
            let mut state = self.connection.state.clone();
            // Connected first, then each connection flushed: the
            // subscriptions have been written to the server. async-nats
            // offers no round trip a builder allowed to publish nothing
            // could make, so the server may take them a moment after
            // READY=1; a request in that moment meets "no responders",
            // as if the builder were still starting (`--wait-for-builder`).
            async move {
                let _ = state.wait_for(|state| state.connected).await;
                client.flush().await.and(queries.flush().await)
            }
        };
        tokio::pin!(nats_up);
        let ready_wait = tokio::time::sleep(NATS_READY_WAIT);
        tokio::pin!(ready_wait);
        let (mut subscribed, mut told_ready) = (false, false);

        let watchdog_every = systemd::watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        let mut closing = false;
        loop {
            tokio::select! {
                flushed = &mut nats_up, if !subscribed => {
                    subscribed = true;
                    match flushed {
                        Ok(()) => {
                            tracing::info!(
                                name = %self.config.builder.display_name(),
                                repos = ?self.config.repos.keys().collect::<Vec<_>>(),
                                workers = self.config.builder.eval_workers,
                                max_memory = %self.config.builder.eval_max_memory,
                                "builder ready"
                            );
                            if std::mem::replace(&mut told_ready, true) {
                                systemd::status("serving");
                            } else {
                                systemd::ready();
                            }
                        }
                        Err(err) => tracing::warn!(%err, "cannot confirm the NATS subscriptions"),
                    }
                }
                () = &mut ready_wait, if !subscribed && !told_ready => {
                    told_ready = true;
                    tracing::warn!(
                        waited = %humantime::format_duration(NATS_READY_WAIT),
                        "NATS is not reachable yet; serving metrics and taking requests once it is"
                    );
                    systemd::ready();
                    systemd::status("waiting for NATS");
                }
                () = self.readers.builds_ended.cancelled() => {
                    tracing::error!("request subscription ended; shutting down");
                    shutdown.cancel(StopReason::Shutdown);
                    break;
                }
                // systemd's watchdog runs from READY=1 on.
                _ = watchdog.tick(), if told_ready && watchdog_every.is_some() => systemd::watchdog(),
                () = shutdown.cancelled(), if !closing => {
                    // New requests are refused (shutting_down) while the running
                    // build stops and every waiting one gets its terminal event.
                    closing = true;
                    systemd::stopping();
                    tracing::info!("shutting down: cancelling queued and running builds");
                    self.intake.close(shutdown.reason());
                }
                _ = &mut self.worker, if closing => break,
            }
        }
    }

    /// Ends what is left, delivers the last replies (for a bounded time)
    /// and stops the background tasks.
    async fn stop(self, shutdown: &Cancellation) {
        let Self {
            connection,
            queries,
            publisher,
            answers,
            answers_sender,
            intake,
            monitor,
            readers,
            worker,
            background,
            http,
            sender,
            heartbeats,
            machines,
            tap,
            ..
        } = self;
        if !worker.is_finished() {
            intake.close(shutdown.reason());
            let _ = worker.await;
        }
        readers.stop().await;
        let flushed = |connection: Connection| async move {
            tokio::time::timeout(FINAL_FLUSH, connection.client.flush())
                .await
                .is_ok_and(|flushed| flushed.is_ok())
        };
        let (events, answered) = tokio::join!(
            async { publisher.drain(FINAL_FLUSH).await && flushed(connection).await },
            async { answers.drain(FINAL_FLUSH).await && flushed(queries).await },
        );
        if !(events && answered) {
            tracing::warn!(
                backlog = publisher.backlog() + answers.backlog(),
                "could not deliver the last replies before exiting"
            );
        }
        // The last `finished` events go into the history too.
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(recorder) = tap.recorder() {
                recorder.close(FINAL_FLUSH);
            }
        })
        .await;
        background.cancel();
        let _ = tokio::join!(http, sender, answers_sender, heartbeats, machines);
        let _ = tokio::task::spawn_blocking(move || monitor.flush_state()).await;
        tracing::info!("builder stopped");
    }
}

/// The single worker: runs queued jobs one after the other, each with its
/// own cancellation (a child of the shutdown, fired by `build.cancel`).
async fn work(
    queue: Arc<Queue<Job>>,
    runner: Arc<Runner>,
    monitor: Arc<Monitor>,
    finisher: Arc<Finisher>,
    shutdown: Cancellation,
) {
    loop {
        // Registered as running while still under the queue's lock, so a
        // `build.cancel` always finds the job in one place or the other.
        let cancel = shutdown.child();
        let taken = queue
            .next_with(|job| monitor.build_started(job, cancel.clone()))
            .await;
        let Some(job) = taken else {
            break;
        };
        let job = Arc::new(job);
        let task = tokio::spawn({
            let runner = Arc::clone(&runner);
            let job = Arc::clone(&job);
            let cancel = cancel.clone();
            async move { runner.run(&job, &cancel).await }
        });
        let report = match task.await {
            Ok(report) => report,
            Err(err) => {
                tracing::error!(build_id = %job.build_id, %err, "build task failed");
                Report::ended_early(
                    BuildStatus::Failed,
                    ErrorBody::new(ErrorCode::Internal, format!("the build task failed: {err}")),
                )
            }
        };
        if report.status == BuildStatus::Cancelled && cancel.pauses() {
            tracing::info!(build_id = %job.build_id, "build interrupted; it resumes at the next start");
            finisher.interrupt(&job, Stage::Running);
        } else {
            finisher.finish(&job, report, Stage::Running);
        }
    }
    monitor.worker_running(false);
}

/// Sends `heartbeat` to every live request that has heard nothing for
/// `every` (the `heartbeat_ms` that `accepted` announces) and a little
/// more, until `stop`. A building host's requesters hear `progress` at
/// least that often already; heartbeats fill the gaps (the queue, fetching,
/// evaluating), at most `every` × 1.5 + 1 s apart.
async fn send_heartbeats(live: Arc<LiveRequests>, every: Duration, stop: CancellationToken) {
    const SLACK: Duration = Duration::from_secs(1);
    let mut ticker = tokio::time::interval(every / 2);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => live.send_heartbeats(every + SLACK),
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::protocol::Event;
    use replies::Replies;

    fn config(builder: &str) -> Config {
        let text = format!(
            "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[repos.demo]\nurl = \"git+file:///srv/demo\"\n[builder]\n{builder}"
        );
        Config::parse(&text, Path::new("test.toml")).unwrap()
    }

    #[test]
    fn stopping_pauses_requests_only_with_a_journal_to_resume_from() {
        let journal = "journal_file = \"/var/lib/homelab-deploy/journal\"\n";
        assert_eq!(stop_reason(&config(journal)), StopReason::Interrupted);
        let no_resume = format!("{journal}resume = false\n");
        assert_eq!(stop_reason(&config(&no_resume)), StopReason::Shutdown);
        assert_eq!(stop_reason(&config("")), StopReason::Shutdown);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_request_hears_a_heartbeat_within_one_and_a_half_intervals_and_a_second() {
        let every = Duration::from_secs(10);
        let publisher = replies::Publisher::offline();
        let live = Arc::new(LiveRequests::default());
        let replies = Replies::new(Arc::clone(&publisher), Some("build.responses.h.1".into()));
        live.register("b-quiet", &replies, None);
        let stop = CancellationToken::new();
        let task = tokio::spawn(send_heartbeats(Arc::clone(&live), every, stop.clone()));

        let heartbeats = |publisher: &replies::Publisher| {
            publisher
                .take_queued()
                .iter()
                .filter(|(_, reply)| reply["event"] == "heartbeat")
                .count()
        };
        // Quiet for `every` + 1 s is not yet due...
        tokio::time::advance(every).await;
        tokio::task::yield_now().await;
        assert_eq!(heartbeats(&publisher), 0);
        // ...and is heard by the next tick, at most 1.5 intervals + 1 s in.
        tokio::time::advance(every / 2 + Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(heartbeats(&publisher), 1);

        // A request that hears events meanwhile needs no heartbeat.
        for _ in 0..6 {
            replies.send("b-quiet", Event::Heartbeat);
            publisher.take_queued();
            tokio::time::advance(every / 2).await;
            tokio::task::yield_now().await;
            assert_eq!(heartbeats(&publisher), 0);
        }
        stop.cancel();
        task.await.unwrap();
    }
}
