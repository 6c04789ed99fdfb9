//! Receiving requests: builds (validate, coalesce, queue, acknowledge),
//! `build.status` and `build.cancel`. Nothing here waits on Nix or on
//! NATS, so requests are answered at once even while a build runs.

use std::sync::Arc;
use std::time::SystemTime;

use async_nats::{Message, Subject};
use bytes::Bytes;
use serde::Serialize;

use super::cancel::StopReason;
use super::finisher::{Finisher, Stage};
use super::journal::{AcceptedRequest, Journaling, Record, Unfinished};
use super::live::{Answered, AttachError, LiveRequests, Resent, SubjectUse};
use super::monitor::{Monitor, RunningCancel};
use super::queue::{PushError, Queue, Take};
use super::replies::{Class, Publisher, Replies};
use super::request::{Job, Report, may_cancel};
use crate::config::Config;
use crate::history::{BuildMeta, EventTap};
use crate::protocol::{
    self, BuildStatus, CancelEvent, CancelOutcome, CancelRequest, CancelledState, ErrorBody,
    ErrorCode, Event, RESPONSES_PREFIX, StatusEvent, SubjectKind, Target, ValidRequest,
};
use crate::signing::{self, Signature};

/// What identifies a request for coalescing: the same repo, target, ref,
/// rev and log choice build the same thing; the same owner (or none) may
/// share it, so a cancel by one owner never ends another's request.
/// Borrowed: every waiting job is compared without copying it.
#[derive(Debug, PartialEq, Eq)]
struct Identity<'a> {
    repo: &'a str,
    target: &'a Target,
    git_ref: Option<&'a str>,
    rev: Option<&'a str>,
    logs: bool,
    owner: Option<&'a str>,
}

impl<'a> Identity<'a> {
    fn of(job: &'a Job) -> Self {
        Self {
            repo: &job.repo,
            target: &job.target,
            git_ref: job.git_ref.as_deref(),
            rev: job.rev.as_deref(),
            logs: job.logs,
            owner: job.owner.as_deref(),
        }
    }
}

/// Receives requests from the subscriptions.
pub(crate) struct Intake {
    config: Arc<Config>,
    publisher: Arc<Publisher>,
    /// Answers status and cancel requests, over the connection they came on.
    answers: Arc<Publisher>,
    queue: Arc<Queue<Job>>,
    monitor: Arc<Monitor>,
    live: Arc<LiveRequests>,
    journal: Journaling,
    finisher: Arc<Finisher>,
    /// Rejections (and requests given no answer) are logged at most this
    /// often, so a flood of bad requests neither floods the journal nor
    /// slows the intake down.
    rejection_log: RateLimit,
    /// The last status sent and when it was made: reused for
    /// [`STATUS_REUSE`] while answers wait to be sent.
    status_sent: std::sync::Mutex<Option<(std::time::Instant, Bytes)>>,
    /// Sees the events of every accepted build (history, live feed).
    tap: Option<Arc<EventTap>>,
    /// The builder's name, told in `accepted` (read once: the host name
    /// is a file read).
    name: String,
}

/// How long one status is sent again, while answers wait to be sent (a
/// flood of status requests): a status is a snapshot anyway, and making
/// and encoding one for every request would slow the intake down.
const STATUS_REUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Lets through a number of events per second and counts the rest.
#[derive(Debug)]
struct RateLimit {
    per_second: u32,
    state: std::sync::Mutex<(tokio::time::Instant, u32, u64)>,
}

impl RateLimit {
    /// Allows `per_second` events each second.
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: std::sync::Mutex::new((tokio::time::Instant::now(), 0, 0)),
        }
    }

    /// Whether this event may be logged; when a new second starts, also how
    /// many were held back in the last one.
    fn allow(&self) -> (bool, u64) {
        let now = tokio::time::Instant::now();
        let mut state = crate::sync::lock(&self.state);
        let (since, count, held_back) = &mut *state;
        let mut report = 0;
        if now.duration_since(*since) >= std::time::Duration::from_secs(1) {
            *since = now;
            *count = 0;
            report = std::mem::take(held_back);
        }
        if *count < self.per_second {
            *count += 1;
            (true, report)
        } else {
            *held_back += 1;
            (false, report)
        }
    }
}

/// Why a build request is turned away before it gets an id.
enum Refusal {
    Invalid(protocol::RequestError),
    Unauthorized(ErrorBody),
}

impl Refusal {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(err) => err.code(),
            Self::Unauthorized(error) => error.code,
        }
    }

    /// The message is made only here: most refusals under a flood are
    /// neither answered nor logged.
    fn error_body(&self) -> ErrorBody {
        match self {
            Self::Invalid(err) => err.to_error_body(),
            Self::Unauthorized(error) => error.clone(),
        }
    }
}

/// Where a request's answer may go.
enum ReplyTo {
    /// Nowhere: the request asked for none.
    Nobody,
    /// This subject, under `build.responses.` and serving no live request.
    Subject(Subject),
    /// Nowhere more: the request was sent again and is answered already.
    Answered,
    /// Nowhere: the subject is not one the builder answers on.
    Refused,
}

impl Intake {
    /// An intake that queues onto `queue`, replies to build requests
    /// through `publisher` and to status and cancel requests through
    /// `answers`, keeps `live` up to date and ends requests through
    /// `finisher`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Arc<Config>,
        publisher: Arc<Publisher>,
        answers: Arc<Publisher>,
        queue: Arc<Queue<Job>>,
        monitor: Arc<Monitor>,
        live: Arc<LiveRequests>,
        journal: Journaling,
        finisher: Arc<Finisher>,
    ) -> Self {
        Self {
            name: config.builder.display_name(),
            config,
            publisher,
            answers,
            queue,
            monitor,
            live,
            journal,
            finisher,
            rejection_log: RateLimit::new(20),
            status_sent: std::sync::Mutex::new(None),
            tap: None,
        }
    }

    /// The same intake, showing every accepted build's events to `tap`.
    pub(crate) fn tapping(mut self, tap: Arc<EventTap>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// `replies` for an accepted build, tapped if there is a tap.
    fn tapped(&self, replies: Replies, meta: BuildMeta) -> Replies {
        match &self.tap {
            Some(tap) => replies.tapped(tap, meta),
            None => replies,
        }
    }

    /// Refuses new requests from now on (`shutting_down`). Every waiting
    /// one is told `interrupted` when the stop pauses requests (they stay
    /// in the journal and resume at the next start), or ended with
    /// `finished`/`cancelled` for `reason`.
    pub(crate) fn close(&self, reason: StopReason) {
        for job in self.queue.close() {
            if reason.pauses() {
                tracing::info!(build_id = %job.build_id, "waiting build interrupted; it resumes at the next start");
                self.finisher.interrupt(&job, Stage::Waiting);
            } else {
                self.cancel_waiting(&job, reason);
            }
        }
    }

    /// Ends a request that never started: cancelled while it waited.
    fn cancel_waiting(&self, job: &Job, reason: StopReason) {
        tracing::info!(build_id = %job.build_id, reason = reason.message(), "cancelling queued build");
        let report = Report::ended_early(
            BuildStatus::Cancelled,
            ErrorBody::new(ErrorCode::Cancelled, reason.message()),
        );
        self.finisher.finish(job, report, Stage::Waiting);
    }

    /// Queues a request from the journal again, under its build id and
    /// with its requesters, and tells them it goes on (`resumed`). One
    /// whose repo or target the config no longer allows ends `failed` at
    /// once. Requests from before a stop or a crash are resumed before any
    /// new one is taken, so they run first, in their order.
    pub(crate) fn resume(&self, unfinished: Unfinished) {
        let request = &unfinished.request;
        let mut subjects = request.replies.iter().map(|s| Subject::from(s.as_str()));
        let replies = self.tapped(
            Replies::new(Arc::clone(&self.publisher), subjects.next()).resumed(),
            BuildMeta {
                repo: request.repo.clone(),
                target: request.target.clone(),
                git_ref: request.git_ref.clone(),
                owner: request.owner.clone(),
                accepted_at: request.received_at(),
            },
        );
        for subject in subjects {
            replies.add(subject);
        }
        let target = Target::parse(&request.target);
        let job = Job {
            build_id: request.build_id.clone(),
            repo: request.repo.clone(),
            target: target.clone().unwrap_or(Target::All),
            git_ref: request.git_ref.clone(),
            rev: request.rev.clone(),
            logs: request.logs,
            owner: request.owner.clone(),
            replies: replies.clone(),
            received_at: request.received_at(),
            resume: Some(unfinished.resume()),
        };
        if !self.config.repos.contains_key(&job.repo) || target.is_err() {
            tracing::warn!(build_id = %job.build_id, repo = %job.repo, "journaled request no longer fits the config; ending it");
            let error = ErrorBody::new(
                ErrorCode::UnknownRepo,
                format!("repo {} is no longer configured on the builder", job.repo),
            );
            let report = Report::ended_early(BuildStatus::Failed, error);
            self.finisher.finish(&job, report, Stage::Waiting);
            return;
        }
        let done: Vec<String> = unfinished.done.iter().map(|h| h.host.clone()).collect();
        tracing::info!(build_id = %job.build_id, repo = %job.repo, target = %job.target, done = done.len(), "resuming a journaled request");
        self.live.register(&job.build_id, &replies, None);
        replies.send(
            &job.build_id,
            Event::Resumed {
                done,
                heartbeat_ms: super::request::millis(self.config.builder.progress_interval),
            },
        );
        self.monitor.resumed();
        self.queue.restore(job);
    }

    /// Where the answer to `message` may go. The builder speaks only on
    /// subjects under `build.responses.`, and a subject already serving a
    /// live request gets nothing more: a requester's subject cannot be
    /// borrowed to send it another build's events (or a rejection). The
    /// one exception is the very request that subject serves, sent again
    /// (`digest`, for build requests): it is told `accepted` again. The
    /// digest is computed only for a subject in use, so a flood costs none.
    fn reply_to(&self, message: &Message, digest: Option<&dyn Fn() -> String>) -> ReplyTo {
        let Some(reply) = &message.reply else {
            return ReplyTo::Nobody;
        };
        let reason = if !reply.starts_with(RESPONSES_PREFIX) {
            "foreign_reply_subject"
        } else {
            let subject_use = match digest {
                _ if !self.live.is_attached(reply) => SubjectUse::Free,
                Some(digest) => self.live.subject_use(reply, &digest()),
                None => SubjectUse::Taken,
            };
            match subject_use {
                SubjectUse::Free => return ReplyTo::Subject(reply.clone()),
                SubjectUse::Resent(resent) => {
                    let Resent {
                        build_id,
                        accepted,
                        replies,
                    } = *resent;
                    tracing::info!(%build_id, "request sent again; answering accepted again");
                    replies.send_to(reply, &build_id, accepted, Class::Answer);
                    return ReplyTo::Answered;
                }
                SubjectUse::Taken => "reply_subject_in_use",
            }
        };
        self.monitor.ignored(reason);
        if self.may_log() {
            tracing::warn!(
                subject = %message.subject,
                reply = %protocol::quote_for_error(reply),
                reason,
                "request ignored: no answer goes to its reply subject"
            );
        }
        ReplyTo::Refused
    }

    /// Whether one more rejection may be logged now (see `rejection_log`).
    fn may_log(&self) -> bool {
        let (log, held_back) = self.rejection_log.allow();
        if held_back > 0 {
            tracing::warn!(
                count = held_back,
                "more requests rejected or ignored (not logged one by one)"
            );
        }
        log
    }

    /// Handles a message on `build.<repo>.*` of one of the builder's repos.
    pub(crate) fn build(&self, message: Message) {
        if !matches!(
            protocol::classify_subject(&message.subject),
            SubjectKind::Build { .. }
        ) {
            // Replies (ours included) and anything else are never requests.
            return;
        }
        let digest = || {
            protocol::request_digest(
                &message.subject,
                message.reply.as_deref().unwrap_or(""),
                &message.payload,
            )
        };
        let reply = match self.reply_to(&message, Some(&digest)) {
            ReplyTo::Refused | ReplyTo::Answered => return,
            ReplyTo::Nobody => None,
            ReplyTo::Subject(subject) => Some(subject),
        };

        // The cheap checks first, the signature last: a flood of malformed
        // requests costs no digest, signature check, id or span, and no
        // error message unless it is answered or logged.
        let valid = protocol::parse_build_request(
            &message.subject,
            &message.payload,
            |repo| self.config.repos.contains_key(repo),
            || {
                self.config
                    .repos
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        )
        .map_err(Refusal::Invalid)
        .and_then(|request| match request {
            Some(request) => Ok(Some((
                request,
                self.signer(&message).map_err(Refusal::Unauthorized)?,
            ))),
            None => Ok(None),
        });
        let (
            ValidRequest {
                repo,
                target,
                body: request,
            },
            owner,
        ) = match valid {
            Ok(Some(valid)) => valid,
            Ok(None) => return,
            Err(refusal) => return self.reject_at_once(&message, reply, &digest, refusal),
        };
        let digest = digest();
        let build_id = protocol::new_build_id();
        let span = tracing::info_span!("request", %build_id, %repo, %target);
        let git_ref = request
            .git_ref
            .clone()
            .or_else(|| self.config.repos.get(&repo).and_then(|r| r.git_ref.clone()));
        let received_at = SystemTime::now();
        let replies = self.tapped(
            Replies::new(Arc::clone(&self.publisher), reply.clone()),
            BuildMeta {
                repo: repo.clone(),
                target: target.to_string(),
                git_ref: git_ref.clone(),
                owner: owner.clone(),
                accepted_at: received_at,
            },
        );
        let job = Job {
            build_id: build_id.clone(),
            repo: repo.clone(),
            target: target.clone(),
            git_ref: git_ref.clone(),
            rev: request.rev.map(|rev| rev.to_ascii_lowercase()),
            logs: request.logs,
            owner: owner.clone(),
            replies: replies.clone(),
            received_at,
            resume: None,
        };

        if let Some(reply) = &reply {
            if self.coalesce(&job, reply, &digest, &span) {
                return;
            }
        }

        let heartbeat_ms = super::request::millis(self.config.builder.progress_interval);
        let accepted = |queue_position| Event::Accepted {
            builder: Some(self.name.clone()),
            request_digest: Some(digest.clone()),
            repo: repo.clone(),
            target: target.to_string(),
            git_ref: git_ref.clone(),
            queue_position,
            heartbeat_ms,
        };
        // On disk before `accepted` is sent: an accepted request survives a
        // restart. (A full queue is refused before anything is written.)
        let pushed = self.queue.has_room(&job).and_then(|()| {
            let record = Record::Accepted(AcceptedRequest::of(&job));
            if let Err(err) = self.journal.record(record) {
                tracing::error!(parent: &span, %err, "request rejected: cannot journal it");
                return Err(PushError::Unrecorded);
            }
            // `accepted` is queued for sending, and the request counted as
            // live, before the worker can take the job: `accepted` always
            // precedes `started`, and the request leaves `live` only after.
            self.queue.push_announced(job, |position| {
                let accepted = accepted(position);
                let answered = Answered {
                    digest: digest.clone(),
                    accepted: accepted.clone(),
                };
                self.live.register(&build_id, &replies, Some(answered));
                replies.send(&build_id, accepted);
            })
        });
        match pushed {
            Ok(queue_position) => tracing::info!(
                parent: &span,
                queue_position,
                git_ref = git_ref.as_deref().unwrap_or("-"),
                owner = owner.as_deref().unwrap_or("-"),
                "request accepted"
            ),
            Err(PushError::Full) => {
                let limit = self.config.builder.queue_limit;
                tracing::warn!(parent: &span, limit, "request rejected: queue full");
                let message =
                    format!("{limit} requests are already waiting (queue_limit); try again later");
                self.reject(
                    &replies,
                    &build_id,
                    &digest,
                    ErrorBody::new(ErrorCode::QueueFull, message),
                );
            }
            Err(PushError::OwnerFull) => {
                let limit = self.config.builder.queue_per_owner;
                tracing::warn!(parent: &span, limit, owner = owner.as_deref().unwrap_or("-"), "request rejected: its owner's share of the queue is full");
                let message = format!(
                    "{limit} of your requests are already waiting (queue_per_owner; unsigned requests share one share); try again later"
                );
                self.reject(
                    &replies,
                    &build_id,
                    &digest,
                    ErrorBody::new(ErrorCode::QueueFull, message),
                );
            }
            Err(PushError::Closed) => {
                tracing::warn!(parent: &span, "request rejected: shutting down");
                // Closed between the check and the push: the record goes.
                self.journal.note(Record::Ended {
                    build_id: build_id.clone(),
                });
                let message = "the builder is shutting down; try again when it is back";
                self.reject(
                    &replies,
                    &build_id,
                    &digest,
                    ErrorBody::new(ErrorCode::ShuttingDown, message),
                );
            }
            Err(PushError::Unrecorded) => {
                let message = "the builder cannot record the request on disk; see its log";
                self.reject(
                    &replies,
                    &build_id,
                    &digest,
                    ErrorBody::new(ErrorCode::Internal, message),
                );
            }
        }
    }

    /// Who signed a build request: its owner (`None`: unsigned). A bad
    /// signature, none where `[auth] require_signed` asks for one, or a key
    /// missing from `[auth] requesters` where that is set, is
    /// `unauthorized`.
    fn signer(&self, message: &Message) -> Result<Option<String>, ErrorBody> {
        let reply = message.reply.as_deref().unwrap_or("");
        let signature = signing::verify(
            message.headers.as_ref(),
            &message.subject,
            reply,
            &message.payload,
        );
        match signature {
            Signature::Valid(key) if self.config.auth.may_request(Some(&key)) => Ok(Some(key)),
            Signature::Valid(key) => Err(ErrorBody::new(
                ErrorCode::Unauthorized,
                format!("{key} may not request builds here ([auth] requesters)"),
            )),
            Signature::Unsigned if !self.config.auth.may_request(None) => Err(ErrorBody::new(
                ErrorCode::Unauthorized,
                "this builder takes requests only from the keys it lists: sign with one of them (--nkey-file or --creds-file)",
            )),
            Signature::Invalid(why) => Err(ErrorBody::new(
                ErrorCode::Unauthorized,
                format!("the request's signature is not valid: {why}"),
            )),
            Signature::Unsigned if self.config.auth.require_signed => Err(ErrorBody::new(
                ErrorCode::Unauthorized,
                "this builder takes only signed requests: connect with --nkey-file or --creds-file",
            )),
            Signature::Unsigned => Ok(None),
        }
    }

    /// Joins `job`'s requester to an identical request that is still
    /// waiting: it gets `accepted` with that build's id, then every later
    /// event of it. A build with [`protocol::MAX_REQUESTERS_PER_BUILD`]
    /// requesters takes no more; the request then queues on its own.
    fn coalesce(&self, job: &Job, reply: &Subject, digest: &str, span: &tracing::Span) -> bool {
        let identity = Identity::of(job);
        let heartbeat_ms = super::request::millis(self.config.builder.progress_interval);
        let mut joined = false;
        self.queue.join(
            |waiting| Identity::of(waiting) == identity,
            |waiting, queue_position| {
                // Attached and `accepted` sent under the queue's lock:
                // `accepted` comes before anything the build sends later.
                let accepted = Event::Accepted {
                    builder: Some(self.name.clone()),
                    request_digest: Some(digest.to_owned()),
                    repo: waiting.repo.clone(),
                    target: waiting.target.to_string(),
                    git_ref: waiting.git_ref.clone(),
                    queue_position,
                    heartbeat_ms,
                };
                let answered = Answered {
                    digest: digest.to_owned(),
                    accepted: accepted.clone(),
                };
                match self.live.attach(&waiting.build_id, reply, answered) {
                    Ok(()) => {}
                    Err(AttachError::Full | AttachError::Taken) => return,
                }
                joined = true;
                self.journal.note(Record::Joined {
                    build_id: waiting.build_id.clone(),
                    reply: reply.to_string(),
                });
                waiting
                    .replies
                    .send_to(reply, &waiting.build_id, accepted, Class::Event);
                tracing::info!(
                    parent: span,
                    joined = %waiting.build_id,
                    queue_position,
                    "request joined an identical waiting build"
                );
            },
        );
        joined
    }

    /// Rejects a request that was never given an id: answered at `reply`
    /// when there is room for the answer, counted either way. Under a
    /// flood most are neither answered nor logged, and cost no message.
    fn reject_at_once(
        &self,
        message: &Message,
        reply: Option<Subject>,
        digest: &dyn Fn() -> String,
        refusal: Refusal,
    ) {
        let logged = self.may_log().then(|| refusal.error_body());
        if let Some(error) = &logged {
            tracing::warn!(
                subject = %protocol::quote_for_error(&message.subject),
                code = %error.code,
                message = %error.message,
                "request rejected"
            );
        }
        match reply {
            Some(reply) if self.publisher.room_for_answer() => {
                let error = logged.unwrap_or_else(|| refusal.error_body());
                let replies = Replies::new(Arc::clone(&self.publisher), Some(reply));
                self.reject(&replies, &protocol::new_build_id(), &digest(), error);
            }
            _ => self.monitor.rejected(refusal.code()),
        }
    }

    fn reject(&self, replies: &Replies, build_id: &str, digest: &str, error: ErrorBody) {
        self.monitor.rejected(error.code);
        replies.send(
            build_id,
            Event::Rejected {
                request_digest: Some(digest.to_owned()),
                error,
            },
        );
    }

    /// Answers a `build.status` request.
    pub(crate) fn status(&self, message: Message) {
        // Under a flood of status requests, the status is not even made
        // for answers that would be dropped.
        if let ReplyTo::Subject(reply) = self.reply_to(&message, None) {
            if self.answers.room_for_answer() {
                if let Some(payload) = self.status_payload() {
                    self.answers.enqueue(reply, payload, Class::Answer);
                }
            }
        }
    }

    /// The encoded status: a fresh one, unless answers are waiting and
    /// the last one is younger than [`STATUS_REUSE`].
    fn status_payload(&self) -> Option<Bytes> {
        let mut sent = crate::sync::lock(&self.status_sent);
        if let Some((made, payload)) = &*sent {
            if made.elapsed() < STATUS_REUSE && self.answers.answers_waiting() {
                return Some(payload.clone());
            }
        }
        // Shortened to fit NATS rather than not sent at all.
        let status = StatusEvent::Status(self.monitor.status());
        match status.to_json_within(self.answers.max_reply_bytes()) {
            Ok(payload) => {
                let payload = Bytes::from(payload);
                *sent = Some((std::time::Instant::now(), payload.clone()));
                Some(payload)
            }
            Err(err) => {
                tracing::error!(%err, "cannot encode a reply");
                None
            }
        }
    }

    /// Handles a `build.cancel` request: a waiting build leaves the queue,
    /// a running one is stopped; either gets its terminal event. Only the
    /// build's owner or an admin may (see [`may_cancel`]); anyone else gets
    /// `forbidden` and the build goes on.
    pub(crate) fn cancel(&self, message: Message) {
        // Like a build, a cancel may come without a reply subject.
        let reply = match self.reply_to(&message, None) {
            ReplyTo::Refused | ReplyTo::Answered => return,
            ReplyTo::Nobody => None,
            ReplyTo::Subject(subject) => Some(subject),
        };
        let outcome = match self.cancel_outcome(&message) {
            Ok(outcome) => outcome,
            Err((build_id, error)) => CancelOutcome {
                build_id,
                found: false,
                state: None,
                error: Some(error),
            },
        };
        // Several builders may share the NATS server: only the one that
        // has the build answers (and all answer a cancel that is invalid
        // whoever reads it). Silence from every builder means nobody has it.
        let not_here = !outcome.found && outcome.state.is_none() && outcome.error.is_none();
        if not_here {
            tracing::debug!(build_id = %outcome.build_id, "cancel of a build this builder does not have");
            return;
        }
        if let Some(reply) = reply {
            self.answer(reply, &CancelEvent::Cancel(outcome));
        }
    }

    fn cancel_outcome(&self, message: &Message) -> Result<CancelOutcome, (String, ErrorBody)> {
        let CancelRequest { build_id } = CancelRequest::parse(&message.payload)
            .map_err(|err| (String::new(), err.to_error_body()))?;
        let signature = signing::verify(
            message.headers.as_ref(),
            &message.subject,
            message.reply.as_deref().unwrap_or(""),
            &message.payload,
        );
        let signer = match signature {
            Signature::Valid(key) => Some(key),
            Signature::Unsigned => None,
            Signature::Invalid(why) => {
                let message = format!("the cancel's signature is not valid: {why}");
                return Err((build_id, ErrorBody::new(ErrorCode::Unauthorized, message)));
            }
        };
        let admins = &self.config.auth.admins;
        let allow = |owner: Option<&str>| may_cancel(owner, signer.as_deref(), admins);
        // The queue first: a job only moves from it to running, so looking
        // in this order cannot miss one in passing.
        let found = match self.queue.take_if(
            |job| job.build_id == build_id,
            |job| allow(job.owner.as_deref()),
        ) {
            Take::Taken(job) => {
                self.cancel_waiting(&job, StopReason::ByRequest);
                Take::Taken(CancelledState::Queued)
            }
            Take::Refused => Take::Refused,
            Take::Missing => match self.monitor.cancel_running(&build_id, allow) {
                RunningCancel::Cancelled => Take::Taken(CancelledState::Running),
                RunningCancel::Refused => Take::Refused,
                // Every host is done: it ends with its own result.
                RunningCancel::TooLate => {
                    tracing::info!(%build_id, "cancel requested too late: the build is finishing");
                    return Ok(CancelOutcome {
                        build_id,
                        found: false,
                        state: Some(CancelledState::Finishing),
                        error: None,
                    });
                }
                RunningCancel::NotRunning => Take::Missing,
            },
        };
        let signer_text = signer.as_deref().unwrap_or("-");
        let state = match found {
            Take::Taken(state) => Some(state),
            Take::Missing => None,
            Take::Refused => {
                tracing::warn!(%build_id, signer = signer_text, "cancel refused: not the build's owner or an admin");
                let message = match signer {
                    Some(_) => "only the build's owner or an admin may cancel it",
                    None => {
                        "cancels must be signed (--nkey-file or --creds-file) by the build's owner or an admin"
                    }
                };
                return Err((build_id, ErrorBody::new(ErrorCode::Forbidden, message)));
            }
        };
        tracing::info!(%build_id, ?state, signer = signer_text, "cancel requested");
        Ok(CancelOutcome {
            build_id,
            found: state.is_some(),
            state,
            error: None,
        })
    }

    /// Answers a cancel request, over the connection it came on.
    fn answer(&self, reply: Subject, body: &impl Serialize) {
        match serde_json::to_vec(body) {
            Ok(payload) => self
                .answers
                .enqueue(reply, Bytes::from(payload), Class::Answer),
            Err(err) => tracing::error!(%err, "cannot encode a reply"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use async_nats::HeaderMap;
    use serde_json::{Value, json};
    use tokio::sync::watch;

    use super::*;
    use crate::builder::cancel::Cancellation;
    use crate::nats::ConnectionState;
    use crate::protocol::CANCEL_SUBJECT;
    use crate::signing::Signer;

    const CONFIG: &str = r#"
[nats]
url = "nats://127.0.0.1:4222"
[repos.demo]
url = "git+file:///srv/demo"
[repos.other]
url = "git+file:///srv/other"
"#;

    /// An intake with everything behind it but NATS: replies stay queued
    /// in offline publishers for the test to read.
    struct Fixture {
        intake: Intake,
        events: Arc<Publisher>,
        answers: Arc<Publisher>,
        queue: Arc<Queue<Job>>,
        monitor: Arc<Monitor>,
    }

    /// `extra` is more of the config file (an `[auth]` table, say).
    fn fixture(extra: &str) -> Fixture {
        let text = format!("{CONFIG}{extra}");
        let config = Arc::new(Config::parse(&text, Path::new("test.toml")).unwrap());
        let queue = Arc::new(Queue::shared(
            config.builder.queue_limit,
            config.builder.queue_per_owner,
            |job: &Job| job.owner.clone(),
        ));
        let (_, nats) = watch::channel(ConnectionState {
            connected: true,
            connects: 1,
            since: std::time::Instant::now(),
        });
        let journal = Journaling::default();
        let monitor =
            Arc::new(Monitor::new(&config, Arc::clone(&queue), nats, journal.clone()).unwrap());
        let live = Arc::new(LiveRequests::default());
        let finisher = Arc::new(Finisher::new(
            Arc::clone(&monitor),
            Arc::clone(&queue),
            journal.clone(),
            Arc::clone(&live),
        ));
        let (events, answers) = (Publisher::offline(), Publisher::offline());
        let intake = Intake::new(
            config,
            Arc::clone(&events),
            Arc::clone(&answers),
            Arc::clone(&queue),
            Arc::clone(&monitor),
            live,
            journal,
            finisher,
        );
        Fixture {
            intake,
            events,
            answers,
            queue,
            monitor,
        }
    }

    fn message(subject: &str, reply: &str, body: &str, signer: Option<&Signer>) -> Message {
        let headers: Option<HeaderMap> =
            signer.map(|signer| signer.headers(subject, reply, body.as_bytes()));
        Message {
            subject: subject.into(),
            reply: (!reply.is_empty()).then(|| reply.into()),
            payload: Bytes::from(body.to_owned()),
            headers,
            status: None,
            description: None,
            length: body.len(),
        }
    }

    fn signer() -> Signer {
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        Signer::from_seed(&seed).unwrap()
    }

    /// The events queued for `subject`, in order.
    fn events_to(sent: &[(String, Value)], subject: &str) -> Vec<Value> {
        sent.iter()
            .filter(|(to, _)| to == subject)
            .map(|(_, reply)| reply.clone())
            .collect()
    }

    fn build_id_of(accepted: &Value) -> String {
        assert_eq!(accepted["event"], "accepted", "{accepted}");
        accepted["build_id"].as_str().unwrap().to_owned()
    }

    #[test]
    fn identical_requests_share_one_build_and_others_queue_their_own() {
        let f = fixture("");
        let alice = signer();
        let request = |reply: &str, body: &str, signer: Option<&Signer>| {
            f.intake
                .build(message("build.demo.all", reply, body, signer));
        };
        request("build.responses.a.1", "", None);
        request("build.responses.a.2", "", None);
        // Each differs from the first in one part of what it builds, or
        // in who may cancel it.
        request("build.responses.a.3", r#"{"logs":true}"#, None);
        request("build.responses.a.4", r#"{"ref":"staging"}"#, None);
        request("build.responses.a.5", "", Some(&alice));
        f.intake
            .build(message("build.other.all", "build.responses.a.6", "", None));

        let sent = f.events.take_queued();
        let ids: Vec<String> = (1..=6)
            .map(|n| build_id_of(&events_to(&sent, &format!("build.responses.a.{n}"))[0]))
            .collect();
        assert_eq!(ids[0], ids[1], "the same request joins the waiting build");
        for (n, id) in ids.iter().enumerate().skip(2) {
            assert_ne!(*id, ids[0], "request {} must not join", n + 1);
        }
        assert_eq!(f.queue.waiting(), 5);
    }

    #[test]
    fn a_cancel_ends_a_waiting_build_for_its_owner_only() {
        let f = fixture("");
        let (owner, stranger) = (signer(), signer());
        f.intake.build(message(
            "build.demo.all",
            "build.responses.o.1",
            "",
            Some(&owner),
        ));
        let build_id = build_id_of(&f.events.take_queued()[0].1);
        let cancel = |by: &Signer, reply: &str| {
            let body = json!({ "build_id": build_id }).to_string();
            f.intake
                .cancel(message(CANCEL_SUBJECT, reply, &body, Some(by)));
            f.answers.take_queued().pop().map(|(_, answer)| answer)
        };

        let refused = cancel(&stranger, "build.responses.s.1").unwrap();
        assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
        assert_eq!(f.queue.waiting(), 1, "a refused cancel leaves the build");
        assert!(f.events.take_queued().is_empty());

        let done = cancel(&owner, "build.responses.o.2").unwrap();
        assert_eq!(done["found"], true, "{done}");
        assert_eq!(done["state"], "queued", "{done}");
        assert_eq!(f.queue.waiting(), 0);
        let finished = &f.events.take_queued()[0].1;
        assert_eq!(finished["event"], "finished", "{finished}");
        assert_eq!(finished["status"], "cancelled");
        assert_eq!(
            finished["error"]["message"],
            StopReason::ByRequest.message()
        );

        // Gone from this builder: it leaves the answer to a builder that
        // has the build (if any does).
        let gone = cancel(&owner, "build.responses.o.3");
        assert_eq!(gone, None);
    }

    #[test]
    fn a_cancel_stops_the_running_build_and_is_too_late_once_it_settled() {
        let admin = signer();
        let f = fixture(&format!("[auth]\nadmins = [{:?}]\n", admin.public_key()));
        f.intake
            .build(message("build.demo.all", "build.responses.r.1", "", None));
        let build_id = build_id_of(&f.events.take_queued()[0].1);
        let Take::Taken(job) = f.queue.take_if(|_| true, |_| true) else {
            panic!("the job is waiting");
        };
        let shutdown = Cancellation::root(Default::default(), StopReason::Shutdown);
        let running = shutdown.child();
        f.monitor.build_started(&job, running.clone());

        let body = json!({ "build_id": build_id }).to_string();
        let cancel = |by: &Signer, reply: &str| {
            f.intake
                .cancel(message(CANCEL_SUBJECT, reply, &body, Some(by)));
            f.answers.take_queued().remove(0).1
        };
        // An unsigned build: only an admin may cancel it.
        let refused = cancel(&signer(), "build.responses.x.1");
        assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
        assert!(!running.is_cancelled());

        let stopped = cancel(&admin, "build.responses.x.2");
        assert_eq!(stopped["state"], "running", "{stopped}");
        assert!(running.is_cancelled());
        assert_eq!(running.reason(), StopReason::ByRequest);
        assert!(!running.pauses());

        // Every host done: a cancel now changes nothing.
        assert!(f.monitor.settle(&build_id, &running));
        let late = cancel(&admin, "build.responses.x.3");
        assert_eq!(late["state"], "finishing", "{late}");
        assert_eq!(late["found"], false);
    }

    #[test]
    fn closing_pauses_or_ends_the_waiting_requests_by_the_stop_reason() {
        for reason in [StopReason::Interrupted, StopReason::Shutdown] {
            let f = fixture("");
            f.intake
                .build(message("build.demo.all", "build.responses.c.1", "", None));
            f.events.take_queued();
            f.intake.close(reason);
            let sent = f.events.take_queued();
            let event = &sent[0].1;
            if reason.pauses() {
                assert_eq!(event["event"], "interrupted", "{event}");
            } else {
                assert_eq!(event["event"], "finished", "{event}");
                assert_eq!(event["status"], "cancelled");
                assert_eq!(event["error"]["message"], reason.message());
            }
            // Closed: the next request is refused.
            f.intake
                .build(message("build.demo.all", "build.responses.c.2", "", None));
            let refused = &f.events.take_queued()[0].1;
            assert_eq!(refused["error"]["code"], "shutting_down", "{refused}");
        }
    }

    #[test]
    fn a_journaled_request_for_a_repo_now_gone_ends_failed_at_once() {
        let f = fixture("");
        let request = AcceptedRequest {
            build_id: "b-gone".into(),
            repo: "retired".into(),
            target: "all".into(),
            git_ref: None,
            rev: None,
            logs: false,
            owner: None,
            replies: vec!["build.responses.j.1".into()],
            received_at: 0,
        };
        f.intake.resume(Unfinished {
            request: request.clone(),
            started: None,
            done: Vec::new(),
        });
        let sent = f.events.take_queued();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].0, "build.responses.j.1");
        assert_eq!(sent[0].1["event"], "finished");
        assert_eq!(sent[0].1["status"], "failed");
        assert_eq!(sent[0].1["error"]["code"], "unknown_repo");
        assert_eq!(f.queue.waiting(), 0);

        // One that still fits is queued again and told it goes on.
        f.intake.resume(Unfinished {
            request: AcceptedRequest {
                repo: "demo".into(),
                ..request
            },
            started: None,
            done: Vec::new(),
        });
        let sent = f.events.take_queued();
        assert_eq!(sent[0].1["event"], "resumed", "{sent:?}");
        assert_eq!(f.queue.waiting(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_are_logged_twenty_a_second_and_the_rest_counted() {
        let limit = RateLimit::new(20);
        let allowed = (0..25).filter(|_| limit.allow().0).count();
        assert_eq!(allowed, 20);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(limit.allow(), (false, 0), "still the same second");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            limit.allow(),
            (true, 6),
            "the next second reports the held back"
        );
        assert_eq!(limit.allow(), (true, 0));
    }
}
