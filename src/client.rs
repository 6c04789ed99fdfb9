//! The requesting side of the protocol, shared by the CLI and the MCP server:
//! publish a build request and follow its events to the terminal one.

use std::time::Duration;

use std::sync::Arc;

use async_nats::{Message, StatusCode, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use thiserror::Error;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::nats::{self, ConnectSettings, Connection, ConnectionState, NatsError};
use crate::protocol::{
    self, BuildRequest, BuilderStatus, CANCEL_SUBJECT, CancelEvent, CancelOutcome, CancelRequest,
    Event, RESPONSES_PREFIX, RESPONSES_TOKEN, Reply, RequestError, STATUS_SUBJECT, StatusEvent,
    Target,
};
use crate::signing::{self, BadPublicKey, Signature, Signer};

/// Beyond three heartbeats, how long a client waits for a builder that went
/// quiet before it gives up (NATS hiccups, a busy machine).
const SILENCE_GRACE: Duration = Duration::from_secs(10);

/// Why a request got no (complete) answer.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error(transparent)]
    Connect(#[from] NatsError),
    #[error("invalid request: {0}")]
    Invalid(#[from] RequestError),
    #[error("invalid repo name {0}: use letters, digits, '-' and '_'")]
    InvalidRepo(String),
    #[error("no builder is listening on {subject} (NATS reported no responders)")]
    NoResponders { subject: String },
    #[error("no builder serves repo {repo} (nobody is subscribed to {subject})")]
    NoBuilderServesRepo { repo: String, subject: String },
    #[error("no builder has a running or waiting build {build_id} (none answered within {})", humantime::format_duration(*.waited))]
    NoSuchBuild { build_id: String, waited: Duration },
    #[error("no builder acknowledged the request on {subject} within {}", humantime::format_duration(*.waited))]
    NotAcknowledged { subject: String, waited: Duration },
    #[error("gave up after {}: the build did not finish in time (raise --timeout)", humantime::format_duration(*.waited))]
    TimedOut { waited: Duration },
    #[error("the builder went silent: nothing heard for {} (it sends a heartbeat every {}); it may have stopped or lost NATS", humantime::format_duration(*.silent), humantime::format_duration(*.heartbeat))]
    BuilderSilent {
        silent: Duration,
        heartbeat: Duration,
    },
    #[error("--builder-key: {0}")]
    BadBuilderKey(#[from] BadPublicKey),
    #[error("the builder stopped {} ago to restart and has not resumed the build (raise --resume-timeout)", humantime::format_duration(*.waited))]
    NotResumed { waited: Duration },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("the NATS connection closed before the build finished")]
    Closed,
}

/// How long to wait.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the whole request, from publishing to the terminal event.
    pub total: Duration,
    /// For the first reply (`accepted` is sent at once on receipt).
    pub accept: Duration,
    /// After `interrupted`, for the builder to come back (`resumed`).
    pub resume: Duration,
    /// How long to keep asking while NATS says no builder listens (a
    /// builder restarting); `None`: give up at once.
    pub wait_for_builder: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            total: Duration::from_secs(3 * 60 * 60),
            accept: Duration::from_secs(30),
            resume: Duration::from_secs(10 * 60),
            wait_for_builder: None,
        }
    }
}

/// How long to wait between attempts while no builder listens.
const NO_RESPONDERS_RETRY: Duration = Duration::from_secs(1);
/// How many times a request that hears no `accepted` (or `rejected`) is
/// sent again (same reply subject, same bytes) within the accept wait: the
/// first answer, or the request itself, may have been dropped by a builder
/// under a flood (a flood passes in seconds), or by NATS.
const ACCEPT_RESENDS: u32 = 12;

/// When the `n`th re-send (from 0) is due after the one before: every half
/// second for the first eight (the builder may take seconds to work off
/// what a flood left queued), then 1, 2, 4, 8 s: the last at 19 s into the
/// default 30 s accept wait.
fn resend_delay(n: u32) -> Duration {
    match n.checked_sub(8) {
        None => Duration::from_millis(500),
        Some(later) => Duration::from_secs(1 << later.min(3)),
    }
}

/// When an unanswered request is sent again: [`resend_delay`] after the
/// sending before, at most [`ACCEPT_RESENDS`] times.
#[derive(Debug)]
struct Resends {
    /// Re-sends so far.
    sent: u32,
    /// When the next is due; `None` once all are sent.
    next_at: Option<Instant>,
}

impl Resends {
    /// The schedule of a request first published at `published`.
    fn new(published: Instant) -> Self {
        Self {
            sent: 0,
            next_at: Some(published + resend_delay(0)),
        }
    }

    /// Whether a re-send is due at `now`.
    fn due(&self, now: Instant) -> bool {
        self.next_at.is_some_and(|at| now >= at)
    }

    fn next_at(&self) -> Option<Instant> {
        self.next_at
    }

    /// The request went out again at `now`.
    fn sent_again(&mut self, now: Instant) {
        self.sent += 1;
        self.next_at = (self.sent < ACCEPT_RESENDS).then(|| now + resend_delay(self.sent));
    }
}

/// How long a builder that sends a heartbeat every `heartbeat_ms` may
/// stay silent before the client gives up on it: three heartbeats missed,
/// plus [`SILENCE_GRACE`]; `None` for a builder that sends none (0).
fn silence_limit(heartbeat_ms: u64) -> Option<Duration> {
    (heartbeat_ms > 0)
        .then(|| Duration::from_millis(heartbeat_ms.saturating_mul(3)) + SILENCE_GRACE)
}

/// A connection that sends build requests.
pub struct BuildClient {
    nats: async_nats::Client,
    state: watch::Receiver<ConnectionState>,
    /// Signs requests, with the NKey the connection authenticates with.
    signer: Option<Arc<Signer>>,
    /// Replies count only when signed by this key (`--builder-key`).
    builder_key: Option<String>,
    client_id: String,
}

/// One reply as received: parsed, and the exact bytes (for `--json`).
#[derive(Debug, Clone)]
pub struct Received {
    pub reply: Reply,
    pub raw: Bytes,
}

/// How long a status query keeps listening after the first answer, for
/// the other builders sharing the NATS server.
pub const GATHER: Duration = Duration::from_millis(500);
/// Most answers a status query collects; more are ignored.
pub const MAX_ANSWERS: usize = 64;

/// One builder's answer to `build.status`.
#[derive(Debug, Clone)]
pub struct StatusAnswer {
    pub status: BuilderStatus,
    /// The exact bytes (for `--json`).
    pub raw: Bytes,
    /// What the answer's signature headers say.
    pub signature: Signature,
}

impl StatusAnswer {
    /// The key that validly signed the answer; `None` when it is unsigned
    /// or its signature does not check out.
    pub fn key(&self) -> Option<&str> {
        match &self.signature {
            Signature::Valid(key) => Some(key),
            Signature::Unsigned | Signature::Invalid(_) => None,
        }
    }

    /// The order answers are shown in: by builder name (unnamed last),
    /// then by key (unsigned last).
    fn order(&self) -> (bool, Option<&str>, bool, Option<&str>) {
        let name = self.status.builder.as_deref();
        (name.is_none(), name, self.key().is_none(), self.key())
    }
}

/// The answers of a status query as they come in: until when to listen,
/// and a bound on how many are kept.
#[derive(Debug)]
struct Gathering {
    answers: Vec<StatusAnswer>,
    deadline: Instant,
    /// Answers beyond [`MAX_ANSWERS`], ignored.
    ignored: usize,
}

impl Gathering {
    /// A query published at `now`, waiting up to `wait` for a first answer.
    fn new(now: Instant, wait: Duration) -> Self {
        Self {
            answers: Vec::new(),
            deadline: now + wait,
            ignored: 0,
        }
    }

    fn deadline(&self) -> Instant {
        self.deadline
    }

    fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// An answer received at `now`: the first leaves [`GATHER`] for the rest.
    fn add(&mut self, answer: StatusAnswer, now: Instant) {
        if self.answers.is_empty() {
            self.deadline = now + GATHER;
        }
        if self.answers.len() >= MAX_ANSWERS {
            if self.ignored == 0 {
                tracing::warn!("more than {MAX_ANSWERS} builders answered; ignoring the rest");
            }
            self.ignored += 1;
            return;
        }
        self.answers.push(answer);
    }

    /// The answers, sorted by builder name, then key (a stable sort: equal
    /// ones stay in the order they came).
    fn finish(mut self) -> Vec<StatusAnswer> {
        self.answers.sort_by(|a, b| a.order().cmp(&b.order()));
        self.answers
    }
}

impl BuildClient {
    /// Connects with the CLI's settings; fails at once if no server answers
    /// (unless the settings retry). With `builder_key`, only replies signed
    /// by that key count.
    pub async fn connect(
        settings: &ConnectSettings,
        builder_key: Option<&str>,
    ) -> Result<Self, ClientError> {
        let builder_key = builder_key.map(signing::parse_user_key).transpose()?;
        let Connection {
            client,
            state,
            signer,
        } = nats::connect(settings).await?;
        Ok(Self {
            nats: client,
            state,
            signer,
            builder_key,
            client_id: protocol::random_hex::<8>(),
        })
    }

    /// Whether `message`, received on our reply subject, is from the
    /// builder as far as we can tell: validly signed by `--builder-key`
    /// when one is given (anything goes without one).
    fn is_from_builder(&self, message: &Message) -> bool {
        let Some(expected) = &self.builder_key else {
            return true;
        };
        match signing::verify(
            message.headers.as_ref(),
            &message.subject,
            "",
            &message.payload,
        ) {
            Signature::Valid(key) if &key == expected => true,
            Signature::Valid(_) => {
                tracing::warn!("ignoring a reply signed by another key than --builder-key");
                false
            }
            Signature::Unsigned => {
                tracing::warn!("ignoring an unsigned reply (--builder-key wants a signature)");
                false
            }
            Signature::Invalid(why) => {
                tracing::warn!(why, "ignoring a reply whose signature is not valid");
                false
            }
        }
    }

    /// Waits up to `within` for the connection to be up; false if it is not.
    pub async fn wait_connected(&self, within: Duration) -> bool {
        let mut state = self.state.clone();
        tokio::time::timeout(within, state.wait_for(|state| state.connected))
            .await
            .is_ok_and(|seen| seen.is_ok())
    }

    /// A fresh reply subject under `build.responses.`: this client's id
    /// and 64 random bits per request, so nobody who saw an earlier one
    /// can tell the next one and make it serve another request first.
    pub fn reply_subject(&self) -> String {
        format!(
            "{RESPONSES_PREFIX}{}.{}",
            self.client_id,
            protocol::random_hex::<8>()
        )
    }

    /// Publishes `body` on `subject` with a fresh reply subject, subscribed
    /// to first so no reply can be missed, and waits until the server has it.
    async fn publish_request(
        &self,
        subject: &str,
        body: Bytes,
    ) -> Result<(Subscriber, String), ClientError> {
        let reply_to = self.reply_subject();
        let subscriber = self
            .nats
            .subscribe(reply_to.clone())
            .await
            .map_err(|e| ClientError::Nats(e.to_string()))?;
        self.publish(subject, &reply_to, body).await?;
        Ok((subscriber, reply_to))
    }

    /// Publishes (signed, with our NKey) and waits until the server has it.
    async fn publish(&self, subject: &str, reply_to: &str, body: Bytes) -> Result<(), ClientError> {
        let nats_error = |err: &dyn std::fmt::Display| ClientError::Nats(err.to_string());
        let reply_to = reply_to.to_owned();
        match &self.signer {
            Some(signer) => {
                let headers = signer.headers(subject, &reply_to, &body);
                self.nats
                    .publish_with_reply_and_headers(subject.to_owned(), reply_to, headers, body)
                    .await
            }
            None => {
                self.nats
                    .publish_with_reply(subject.to_owned(), reply_to, body)
                    .await
            }
        }
        .map_err(|e| nats_error(&e))?;
        self.nats.flush().await.map_err(|e| nats_error(&e))?;
        Ok(())
    }

    /// Asks every builder for its status: publishes `build.status` once
    /// and collects the answers until [`GATHER`] has passed since the
    /// first (or until `wait` if none comes), at most [`MAX_ANSWERS`].
    /// Answers are never merged: two builders may share a name and are
    /// told apart by the key that signed them. Sorted by name, then key.
    pub async fn status(&self, wait: Duration) -> Result<Vec<StatusAnswer>, ClientError> {
        let (mut subscriber, _) = self.publish_request(STATUS_SUBJECT, Bytes::new()).await?;
        let mut gathering = Gathering::new(Instant::now(), wait);
        loop {
            let message =
                match tokio::time::timeout_at(gathering.deadline(), subscriber.next()).await {
                    Ok(Some(message)) => message,
                    Ok(None) if gathering.is_empty() => return Err(ClientError::Closed),
                    Ok(None) | Err(_) => break,
                };
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                if gathering.is_empty() {
                    return Err(ClientError::NoResponders {
                        subject: STATUS_SUBJECT.to_owned(),
                    });
                }
                continue;
            }
            if message.status.is_some() || !self.is_from_builder(&message) {
                continue;
            }
            let StatusEvent::Status(status) =
                match serde_json::from_slice::<StatusEvent>(&message.payload) {
                    Ok(event) => event,
                    Err(err) => {
                        tracing::warn!(%err, "ignoring a malformed status answer");
                        continue;
                    }
                };
            let signature = signing::verify(
                message.headers.as_ref(),
                &message.subject,
                "",
                &message.payload,
            );
            gathering.add(
                StatusAnswer {
                    status,
                    raw: message.payload,
                    signature,
                },
                Instant::now(),
            );
        }
        if gathering.is_empty() {
            return Err(ClientError::NotAcknowledged {
                subject: STATUS_SUBJECT.to_owned(),
                waited: wait,
            });
        }
        Ok(gathering.finish())
    }

    /// Asks the builder to cancel a build.
    pub async fn cancel(
        &self,
        build_id: &str,
        wait: Duration,
    ) -> Result<(CancelOutcome, Bytes), ClientError> {
        let request = CancelRequest {
            build_id: build_id.to_owned(),
        };
        request.validate()?;
        let body =
            serde_json::to_vec(&request).map_err(|err| ClientError::Nats(err.to_string()))?;
        // An answer about another build is not an answer to this cancel.
        // Only the builder that has the build answers (every builder
        // answers a cancel it cannot accept): silence means none has it.
        let (CancelEvent::Cancel(outcome), raw) = self
            .ask(
                CANCEL_SUBJECT,
                body.into(),
                wait,
                |CancelEvent::Cancel(outcome)| outcome.build_id == build_id,
            )
            .await
            .map_err(|err| match err {
                ClientError::NotAcknowledged { waited, .. } => ClientError::NoSuchBuild {
                    build_id: build_id.to_owned(),
                    waited,
                },
                err => err,
            })?;
        Ok((outcome, raw))
    }

    /// One request, one reply of type `T` that `answers` it.
    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        body: Bytes,
        wait: Duration,
        answers: impl Fn(&T) -> bool,
    ) -> Result<(T, Bytes), ClientError> {
        let (mut subscriber, _) = self.publish_request(subject, body).await?;
        let deadline = Instant::now() + wait;
        let not_acknowledged = || ClientError::NotAcknowledged {
            subject: subject.to_owned(),
            waited: wait,
        };
        loop {
            let message = tokio::time::timeout_at(deadline, subscriber.next())
                .await
                .map_err(|_| not_acknowledged())?
                .ok_or(ClientError::Closed)?;
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                return Err(ClientError::NoResponders {
                    subject: subject.to_owned(),
                });
            }
            if !self.is_from_builder(&message) {
                continue;
            }
            match serde_json::from_slice::<T>(&message.payload) {
                Ok(reply) if answers(&reply) => return Ok((reply, message.payload)),
                Ok(_) => tracing::warn!("ignoring an answer to another request"),
                Err(err) => tracing::warn!(%err, "ignoring a malformed reply"),
            }
        }
    }

    /// Validates and publishes a build request, subscribed to its reply
    /// subject first so no event can be missed.
    pub async fn request<'a>(
        &'a self,
        repo: &str,
        target: &str,
        request: &BuildRequest,
        timeouts: Timeouts,
    ) -> Result<BuildEvents<'a>, ClientError> {
        validate(repo, target, request)?;
        let subject = protocol::request_subject(repo, target);
        let body = if request == &BuildRequest::default() {
            Bytes::new()
        } else {
            serde_json::to_vec(request)
                .map_err(|err| ClientError::Nats(err.to_string()))?
                .into()
        };
        let (subscriber, reply_to) = self.publish_request(&subject, body.clone()).await?;
        let now = Instant::now();
        Ok(BuildEvents {
            client: self,
            subscriber,
            digest: protocol::request_digest(&subject, &reply_to, &body),
            expected: Expected {
                repo: repo.to_owned(),
                target: target.to_owned(),
                git_ref: request.git_ref.clone(),
            },
            subject,
            reply_to,
            body,
            resends: Resends::new(now),
            last_seq: None,
            retry_until: timeouts.wait_for_builder.map(|wait| now + wait),
            retry_at: None,
            accept_wait: timeouts.accept.min(timeouts.total),
            resume_timeout: timeouts.resume,
            interrupted: false,
            started: now,
            deadline: now + timeouts.total,
            accept_deadline: now + timeouts.accept.min(timeouts.total),
            build_id: None,
            heard_at: now,
            silence_limit: None,
            finished: false,
        })
    }
}

/// Checks a request the way the builder will, before anything is sent.
pub fn validate(repo: &str, target: &str, request: &BuildRequest) -> Result<(), ClientError> {
    if !protocol::is_valid_name(repo) || repo == RESPONSES_TOKEN {
        return Err(ClientError::InvalidRepo(protocol::quote_for_error(repo)));
    }
    Target::parse(target)?;
    request.validate()?;
    Ok(())
}

/// What an `accepted` for our request must say.
struct Expected {
    repo: String,
    target: String,
    /// The ref asked for; `None` leaves it to the builder.
    git_ref: Option<String>,
}

/// The events of one request, ending with its terminal event.
pub struct BuildEvents<'a> {
    client: &'a BuildClient,
    subscriber: Subscriber,
    subject: String,
    reply_to: String,
    body: Bytes,
    /// [`protocol::request_digest`] of what we sent.
    digest: String,
    expected: Expected,
    /// Re-sends while no `accepted` came.
    resends: Resends,
    /// The `seq` of the last event taken: a replay is never taken twice.
    last_seq: Option<u64>,
    /// Until when "no responders" means "ask again" (`--wait-for-builder`).
    retry_until: Option<Instant>,
    /// When to ask again, after "no responders".
    retry_at: Option<Instant>,
    /// How long a builder has to acknowledge the request.
    accept_wait: Duration,
    resume_timeout: Duration,
    /// Between `interrupted` and `resumed`.
    interrupted: bool,
    started: Instant,
    deadline: Instant,
    accept_deadline: Instant,
    /// Fixed by the first `accepted` (or `rejected`): events of any other
    /// build on our subject are not ours.
    build_id: Option<String>,
    /// When the last event of our build arrived.
    heard_at: Instant,
    /// How long the builder may stay silent (from its `heartbeat_ms`).
    silence_limit: Option<Duration>,
    finished: bool,
}

impl BuildEvents<'_> {
    /// The next event; `Ok(None)` after the terminal one.
    pub async fn next(&mut self) -> Result<Option<Received>, ClientError> {
        // Cancellation safe (callers `select!` on it): every wait is a
        // deadline kept in `self`, never a sleep inside.
        while !self.finished {
            let now = Instant::now();
            if self.retry_at.is_some_and(|at| now >= at) {
                self.client
                    .publish(&self.subject, &self.reply_to, self.body.clone())
                    .await?;
                self.retry_at = None;
                continue;
            }
            if self.build_id.is_none() && self.resends.due(now) {
                // The same bytes on the same reply subject: the builder
                // answers `accepted` again if it has the request already.
                tracing::info!("no answer yet; sending the request again");
                self.client
                    .publish(&self.subject, &self.reply_to, self.body.clone())
                    .await?;
                self.resends.sent_again(now);
                continue;
            }
            let mut wait_until = self.wait_until();
            for wake in [
                self.retry_at,
                self.resends.next_at().filter(|_| self.build_id.is_none()),
            ] {
                wait_until = wake.map_or(wait_until, |at| at.min(wait_until));
            }
            let message = match tokio::time::timeout_at(wait_until, self.subscriber.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => return Err(ClientError::Closed),
                // Woken to ask again, not out of time.
                Err(_) if Instant::now() < self.wait_until() => continue,
                Err(_) => return Err(self.gave_up()),
            };
            if message.status == Some(StatusCode::NO_RESPONDERS) {
                let now = Instant::now();
                if self.build_id.is_none() && self.retry_until.is_some_and(|until| now < until) {
                    // A builder restarting: ask again in a moment.
                    self.retry_at = Some(now + NO_RESPONDERS_RETRY);
                    self.accept_deadline = self.accept_deadline.max(now + self.accept_wait);
                    continue;
                }
                return Err(ClientError::NoBuilderServesRepo {
                    repo: self.expected.repo.clone(),
                    subject: self.subject.clone(),
                });
            }
            if message.status.is_some() || !self.client.is_from_builder(&message) {
                continue;
            }
            let reply = match serde_json::from_slice::<Reply>(&message.payload) {
                Ok(reply) => reply,
                Err(err) => {
                    tracing::warn!(%err, "ignoring a malformed reply");
                    continue;
                }
            };
            let bound_before = self.build_id.is_some();
            if !self.is_ours(&reply) {
                continue;
            }
            if let Some(seq) = reply.seq {
                if self.last_seq.is_some_and(|last| seq <= last) {
                    // A replay (or a stale copy) is no sign of life.
                    tracing::warn!(
                        seq,
                        event = reply.event.name(),
                        "ignoring an event seen before"
                    );
                    continue;
                }
                self.last_seq = Some(seq);
            }
            self.heard_at = Instant::now();
            if bound_before && matches!(reply.event, Event::Accepted { .. }) {
                // The answer to a re-sent request: nothing new to show.
                continue;
            }
            match &reply.event {
                Event::Accepted { heartbeat_ms, .. } | Event::Resumed { heartbeat_ms, .. } => {
                    self.interrupted = false;
                    self.silence_limit = silence_limit(*heartbeat_ms);
                }
                Event::Interrupted { resume: true } => self.interrupted = true,
                _ => {}
            }
            self.finished = reply.is_terminal();
            return Ok(Some(Received {
                reply,
                raw: message.payload,
            }));
        }
        Ok(None)
    }

    /// Whether an `accepted` or `rejected` answers our request: it names
    /// the digest of what we sent (required with `--builder-key`; a
    /// builder that names none is believed only without one), and an
    /// `accepted` names our repo, target and ref.
    fn answers_us(&self, event: &Event) -> bool {
        let digest = match event {
            Event::Accepted {
                request_digest,
                repo,
                target,
                git_ref,
                ..
            } => {
                let ref_differs = self
                    .expected
                    .git_ref
                    .as_ref()
                    .is_some_and(|wanted| git_ref.as_ref() != Some(wanted));
                if *repo != self.expected.repo || *target != self.expected.target || ref_differs {
                    tracing::warn!(%repo, %target, "ignoring an accepted for another request");
                    return false;
                }
                request_digest
            }
            Event::Rejected { request_digest, .. } => request_digest,
            _ => return true,
        };
        match digest {
            Some(digest) if *digest == self.digest => true,
            Some(_) => {
                tracing::warn!(
                    event = event.name(),
                    "ignoring an answer to another request (request_digest differs)"
                );
                false
            }
            None if self.client.builder_key.is_some() => {
                tracing::warn!(
                    event = event.name(),
                    "ignoring an answer without request_digest (--builder-key wants one)"
                );
                false
            }
            None => true,
        }
    }

    /// Binds to the first `accepted` or `rejected` that answers our
    /// request (or `interrupted`, `resumed`) and keeps only events of
    /// that build.
    fn is_ours(&mut self, reply: &Reply) -> bool {
        if !self.answers_us(&reply.event) {
            return false;
        }
        match &self.build_id {
            Some(id) if *id == reply.build_id => true,
            Some(id) => {
                tracing::warn!(ours = %id, other = %reply.build_id, "ignoring an event of another build");
                false
            }
            // A request journaled just before the builder stopped may hear
            // `interrupted` or `resumed` before (or instead of) `accepted`.
            None if matches!(
                reply.event,
                Event::Accepted { .. }
                    | Event::Rejected { .. }
                    | Event::Interrupted { .. }
                    | Event::Resumed { .. }
            ) =>
            {
                self.build_id = Some(reply.build_id.clone());
                true
            }
            None => {
                tracing::warn!(other = %reply.build_id, event = reply.event.name(), "ignoring an event before our request was accepted");
                false
            }
        }
    }

    /// Until when to wait for the next event.
    fn wait_until(&self) -> Instant {
        if self.build_id.is_none() {
            return self.accept_deadline;
        }
        if self.interrupted {
            return self.deadline.min(self.heard_at + self.resume_timeout);
        }
        match self.silence_limit {
            Some(limit) => self.deadline.min(self.heard_at + limit),
            None => self.deadline,
        }
    }

    /// Why the wait ended without an event.
    fn gave_up(&self) -> ClientError {
        let now = Instant::now();
        match (&self.build_id, self.silence_limit) {
            (None, _) => ClientError::NotAcknowledged {
                subject: self.subject.clone(),
                waited: self.started.elapsed(),
            },
            (Some(_), _) if self.interrupted && now < self.deadline => ClientError::NotResumed {
                waited: now - self.heard_at,
            },
            (Some(_), Some(limit)) if now < self.deadline => ClientError::BuilderSilent {
                silent: now - self.heard_at,
                heartbeat: limit.saturating_sub(SILENCE_GRACE) / 3,
            },
            (Some(_), _) => ClientError::TimedOut {
                waited: self.started.elapsed(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_requests_are_sent_again_soon_then_less_often() {
        let delays: Vec<u128> = (0..ACCEPT_RESENDS)
            .map(|n| resend_delay(n).as_millis())
            .collect();
        assert_eq!(
            delays,
            [
                500, 500, 500, 500, 500, 500, 500, 500, 1000, 2000, 4000, 8000
            ]
        );
        assert!(delays.iter().sum::<u128>() < Timeouts::default().accept.as_millis());
    }

    /// Re-sends as `next` makes them: when one is due, then at once the next.
    async fn resend_times() -> Vec<Duration> {
        let published = Instant::now();
        let mut resends = Resends::new(published);
        let mut times = Vec::new();
        while let Some(at) = resends.next_at() {
            tokio::time::sleep_until(at).await;
            let now = Instant::now();
            assert!(resends.due(now));
            resends.sent_again(now);
            times.push(now - published);
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_goes_out_every_half_second_for_4_s_then_after_1_2_4_8_s() {
        let millis: Vec<u128> = resend_times()
            .await
            .iter()
            .map(Duration::as_millis)
            .collect();
        assert_eq!(
            millis,
            [
                500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 7000, 11000, 19000
            ]
        );
        assert_eq!(millis.len(), usize::try_from(ACCEPT_RESENDS).unwrap());
        // The last one still leaves the builder time to answer.
        assert!(Duration::from_millis(19_000) < Timeouts::default().accept);
    }

    #[tokio::test(start_paused = true)]
    async fn no_resend_is_due_before_its_time() {
        let published = Instant::now();
        let mut resends = Resends::new(published);
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!resends.due(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(resends.due(Instant::now()));
        // Counted from when it went out, not from when it was due.
        tokio::time::advance(Duration::from_millis(300)).await;
        resends.sent_again(Instant::now());
        assert_eq!(
            resends.next_at(),
            Some(published + Duration::from_millis(1300))
        );
    }

    #[test]
    fn the_silence_limit_is_three_heartbeats_and_the_grace() {
        assert_eq!(
            silence_limit(5_000),
            Some(Duration::from_secs(15) + SILENCE_GRACE)
        );
        assert_eq!(
            silence_limit(1),
            Some(Duration::from_millis(3) + SILENCE_GRACE)
        );
        assert_eq!(silence_limit(0), None, "no heartbeats: no limit");
        assert_eq!(
            silence_limit(u64::MAX),
            Some(Duration::from_millis(u64::MAX) + SILENCE_GRACE)
        );
    }

    fn answer(name: Option<&str>, signature: Signature) -> StatusAnswer {
        StatusAnswer {
            status: BuilderStatus {
                builder: name.map(str::to_owned),
                version: "1.0.0".into(),
                repos: vec![],
                running: None,
                queue: vec![],
                last_results: vec![],
                machines: vec![],
                omitted_results: 0,
                web_url: None,
            },
            raw: Bytes::from(name.unwrap_or("-").to_owned()),
            signature,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_query_listens_a_short_while_after_the_first_answer() {
        let start = Instant::now();
        let mut gathering = Gathering::new(start, Duration::from_secs(10));
        assert_eq!(gathering.deadline(), start + Duration::from_secs(10));
        assert!(gathering.is_empty());
        let first = start + Duration::from_secs(3);
        gathering.add(answer(Some("a"), Signature::Unsigned), first);
        assert_eq!(gathering.deadline(), first + GATHER);
        // Later answers do not extend the window.
        gathering.add(
            answer(Some("b"), Signature::Unsigned),
            first + Duration::from_millis(400),
        );
        assert_eq!(gathering.deadline(), first + GATHER);
        assert_eq!(gathering.finish().len(), 2);
    }

    #[test]
    fn a_status_query_keeps_at_most_64_answers() {
        let now = Instant::now();
        let mut gathering = Gathering::new(now, Duration::from_secs(1));
        for _ in 0..MAX_ANSWERS + 3 {
            gathering.add(answer(Some("a"), Signature::Unsigned), now);
        }
        assert_eq!(gathering.ignored, 3);
        assert_eq!(gathering.finish().len(), MAX_ANSWERS);
    }

    #[test]
    fn answers_are_sorted_by_name_then_key_and_never_merged() {
        let key = |c: char| format!("U{}", c.to_string().repeat(55));
        let now = Instant::now();
        let mut gathering = Gathering::new(now, Duration::from_secs(1));
        for (name, signature) in [
            (None, Signature::Unsigned),
            (Some("b"), Signature::Valid(key('B'))),
            (Some("a"), Signature::Unsigned),
            (Some("a"), Signature::Valid(key('C'))),
            (Some("a"), Signature::Invalid("bad")),
            (Some("a"), Signature::Valid(key('A'))),
        ] {
            gathering.add(answer(name, signature), now);
        }
        let order: Vec<(Option<String>, Option<String>)> = gathering
            .finish()
            .iter()
            .map(|a| (a.status.builder.clone(), a.key().map(str::to_owned)))
            .collect();
        let named = |name: &str, key: Option<String>| (Some(name.to_owned()), key);
        assert_eq!(
            order,
            [
                named("a", Some(key('A'))),
                named("a", Some(key('C'))),
                // Unsigned, then badly signed: the order they came in.
                named("a", None),
                named("a", None),
                named("b", Some(key('B'))),
                (None, None),
            ]
        );
    }

    #[test]
    fn only_a_valid_signature_gives_an_answer_a_key() {
        assert_eq!(
            answer(None, Signature::Valid("UKEY".into())).key(),
            Some("UKEY")
        );
        assert_eq!(answer(None, Signature::Unsigned).key(), None);
        assert_eq!(answer(None, Signature::Invalid("forged")).key(), None);
    }

    #[test]
    fn a_build_nobody_serves_names_the_repo() {
        let err = ClientError::NoBuilderServesRepo {
            repo: "nixos".into(),
            subject: "build.nixos.ns1".into(),
        };
        assert_eq!(
            err.to_string(),
            "no builder serves repo nixos (nobody is subscribed to build.nixos.ns1)"
        );
        let err = ClientError::NoSuchBuild {
            build_id: "0123456789abcdef".into(),
            waited: Duration::from_secs(10),
        };
        assert!(
            err.to_string()
                .starts_with("no builder has a running or waiting build 0123456789abcdef"),
            "{err}"
        );
    }

    #[test]
    fn client_side_validation_matches_the_builder() {
        let ok = BuildRequest::default();
        assert!(validate("nixos-servers", "all", &ok).is_ok());
        assert!(validate("nixos-servers", "ns1", &ok).is_ok());
        assert!(matches!(
            validate("responses", "x", &ok),
            Err(ClientError::InvalidRepo(_))
        ));
        assert!(matches!(
            validate("a.b", "x", &ok),
            Err(ClientError::InvalidRepo(_))
        ));
        assert!(matches!(
            validate("r", "$(id)", &ok),
            Err(ClientError::Invalid(_))
        ));
        let bad_ref = BuildRequest {
            git_ref: Some("--upload-pack=x".into()),
            ..BuildRequest::default()
        };
        assert!(matches!(
            validate("r", "all", &bad_ref),
            Err(ClientError::Invalid(_))
        ));
    }
}
