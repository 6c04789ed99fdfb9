//! Receiving requests: builds (validate, coalesce, queue, acknowledge),
//! `build.status` and `build.cancel`. Nothing here waits on Nix or on
//! NATS, so requests are answered at once even while a build runs.

use std::sync::Arc;
use std::time::SystemTime;

use async_nats::{Message, Subject};
use bytes::Bytes;
use serde::Serialize;

use super::cancel;
use super::monitor::{Monitor, RunningCancel};
use super::queue::{PushError, Queue};
use super::replies::{Publisher, Replies};
use super::request::{Job, Report};
use crate::config::Config;
use crate::protocol::{
    self, BuildStatus, CancelEvent, CancelOutcome, CancelRequest, CancelledState, ErrorBody,
    ErrorCode, Event, RESPONSES_PREFIX, RequestError, StatusEvent, SubjectKind, Target,
    ValidRequest,
};

/// What identifies a request for coalescing: the same repo, target, ref,
/// rev and log choice build the same thing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    repo: String,
    target: Target,
    git_ref: Option<String>,
    rev: Option<String>,
    logs: bool,
}

impl Identity {
    fn of(job: &Job) -> Self {
        Self {
            repo: job.repo.clone(),
            target: job.target.clone(),
            git_ref: job.git_ref.clone(),
            rev: job.rev.clone(),
            logs: job.logs,
        }
    }
}

/// Receives requests from the subscriptions.
pub(crate) struct Intake {
    config: Arc<Config>,
    publisher: Arc<Publisher>,
    queue: Arc<Queue<Job>>,
    monitor: Arc<Monitor>,
    /// Rejections are logged at most this often, so a flood of bad
    /// requests neither floods the journal nor slows the intake down.
    rejection_log: RateLimit,
}

/// Lets through a number of events per second and counts the rest.
#[derive(Debug)]
struct RateLimit {
    per_second: u32,
    state: std::sync::Mutex<(std::time::Instant, u32, u64)>,
}

impl RateLimit {
    /// Allows `per_second` events each second.
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: std::sync::Mutex::new((std::time::Instant::now(), 0, 0)),
        }
    }

    /// Whether this event may be logged; when a new second starts, also how
    /// many were held back in the last one.
    fn allow(&self) -> (bool, u64) {
        let mut state = crate::sync::lock(&self.state);
        let (since, count, held_back) = &mut *state;
        let mut report = 0;
        if since.elapsed() >= std::time::Duration::from_secs(1) {
            *since = std::time::Instant::now();
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

impl Intake {
    /// An intake that queues onto `queue` and replies through `publisher`.
    pub(crate) fn new(
        config: Arc<Config>,
        publisher: Arc<Publisher>,
        queue: Arc<Queue<Job>>,
        monitor: Arc<Monitor>,
    ) -> Self {
        Self {
            config,
            publisher,
            queue,
            monitor,
            rejection_log: RateLimit::new(20),
        }
    }

    /// Refuses new requests from now on (`shutting_down`) and ends every
    /// waiting one with `finished`/`cancelled`, saying `reason`.
    pub(crate) fn close(&self, reason: &str) {
        for job in self.queue.close() {
            self.cancel_waiting(&job, reason);
        }
    }

    /// Ends a request that never started: cancelled while it waited.
    fn cancel_waiting(&self, job: &Job, reason: &str) {
        tracing::info!(build_id = %job.build_id, reason, "cancelling queued build");
        let report = Report::ended_early(
            BuildStatus::Cancelled,
            ErrorBody::new(ErrorCode::Cancelled, reason),
        );
        self.monitor
            .build_finished(&job.build_id, &job.repo, report.status, report.duration);
        job.finish(report);
    }

    /// Handles a message on `build.*.*`.
    pub(crate) fn build(&self, message: Message) {
        let (repo, target) = match protocol::classify_subject(&message.subject) {
            SubjectKind::Build { repo, target } => (repo.to_owned(), target.to_owned()),
            // Replies (ours included) and anything else are never requests.
            SubjectKind::Response | SubjectKind::Other => return,
        };
        let build_id = protocol::new_build_id();
        let replies = Replies::new(Arc::clone(&self.publisher), message.reply.clone());
        let span = tracing::info_span!("request", %build_id, %repo, %target);

        let valid = check_reply_subject(&message).and_then(|()| {
            protocol::parse_build_request(
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
        });
        let ValidRequest {
            target,
            body: request,
            ..
        } = match valid {
            Ok(Some(valid)) => valid,
            Ok(None) => return,
            Err(err) => {
                let (log, held_back) = self.rejection_log.allow();
                if held_back > 0 {
                    tracing::warn!(
                        count = held_back,
                        "more requests rejected (not logged one by one)"
                    );
                }
                if log {
                    tracing::warn!(parent: &span, code = %err.code(), %err, "request rejected");
                }
                self.reject(&replies, &build_id, err.to_error_body());
                return;
            }
        };
        let git_ref = request
            .git_ref
            .clone()
            .or_else(|| self.config.repos.get(&repo).and_then(|r| r.git_ref.clone()));
        let job = Job {
            build_id: build_id.clone(),
            repo: repo.clone(),
            target: target.clone(),
            git_ref: git_ref.clone(),
            rev: request.rev.map(|rev| rev.to_ascii_lowercase()),
            logs: request.logs,
            replies: replies.clone(),
            received_at: SystemTime::now(),
        };

        if let Some(reply) = &message.reply {
            if self.coalesce(&job, reply, &span) {
                return;
            }
        }

        let accepted = |queue_position| Event::Accepted {
            repo: repo.clone(),
            target: target.to_string(),
            git_ref: git_ref.clone(),
            queue_position,
        };
        // `accepted` is queued for sending before the worker can take the
        // job, so it always precedes `started`.
        let pushed = self.queue.push_announced(job, |position| {
            replies.send(&build_id, accepted(position));
        });
        match pushed {
            Ok(queue_position) => tracing::info!(
                parent: &span,
                queue_position,
                git_ref = git_ref.as_deref().unwrap_or("-"),
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
                    ErrorBody::new(ErrorCode::QueueFull, message),
                );
            }
            Err(PushError::Closed) => {
                tracing::warn!(parent: &span, "request rejected: shutting down");
                let message = "the builder is shutting down; try again when it is back";
                self.reject(
                    &replies,
                    &build_id,
                    ErrorBody::new(ErrorCode::ShuttingDown, message),
                );
            }
        }
    }

    /// Joins `job`'s requester to an identical request that is still
    /// waiting: it gets `accepted` with that build's id, then every later
    /// event of it.
    fn coalesce(&self, job: &Job, reply: &Subject, span: &tracing::Span) -> bool {
        let identity = Identity::of(job);
        self.queue.join(
            |waiting| Identity::of(waiting) == identity,
            |waiting, queue_position| {
                // Sent before joining, under the queue's lock: `accepted`
                // comes before anything the build sends afterwards.
                waiting.replies.send_to(
                    reply,
                    &waiting.build_id,
                    Event::Accepted {
                        repo: waiting.repo.clone(),
                        target: waiting.target.to_string(),
                        git_ref: waiting.git_ref.clone(),
                        queue_position,
                    },
                );
                waiting.replies.add(reply.clone());
                tracing::info!(
                    parent: span,
                    joined = %waiting.build_id,
                    queue_position,
                    "request joined an identical waiting build"
                );
            },
        )
    }

    fn reject(&self, replies: &Replies, build_id: &str, error: ErrorBody) {
        self.monitor.rejected(error.code);
        replies.send(build_id, Event::Rejected { error });
    }

    /// Answers a `build.status` request.
    pub(crate) fn status(&self, message: Message) {
        if let Some(reply) = reply_subject(&message) {
            self.answer(reply, &StatusEvent::Status(self.monitor.status()));
        }
    }

    /// Handles a `build.cancel` request: a waiting build leaves the queue,
    /// a running one is stopped; either gets its terminal event.
    pub(crate) fn cancel(&self, message: Message) {
        // Like a build, a cancel may come without a reply subject; one
        // with a reply subject replies could not reach is ignored.
        if message.reply.is_some() && check_reply_subject(&message).is_err() {
            let _ = reply_subject(&message); // logs why
            return;
        }
        let reply = message.reply.clone();
        let request = CancelRequest::parse(&message.payload);
        let outcome = match request {
            Err(err) => CancelOutcome {
                build_id: String::new(),
                found: false,
                state: None,
                error: Some(err.to_error_body()),
            },
            Ok(CancelRequest { build_id }) => {
                // The queue first: a job only moves from it to running,
                // so looking in this order cannot miss one in passing.
                let (found, state) =
                    if let Some(job) = self.queue.remove(|job| job.build_id == build_id) {
                        self.cancel_waiting(&job, cancel::BY_REQUEST);
                        (true, Some(CancelledState::Queued))
                    } else {
                        match self.monitor.cancel_running(&build_id) {
                            RunningCancel::Cancelled => (true, Some(CancelledState::Running)),
                            RunningCancel::TooLate => (false, Some(CancelledState::Finishing)),
                            RunningCancel::NotRunning => (false, None),
                        }
                    };
                tracing::info!(%build_id, found, ?state, "cancel requested");
                CancelOutcome {
                    build_id,
                    found,
                    state,
                    error: None,
                }
            }
        };
        if let Some(reply) = reply {
            self.answer(reply, &CancelEvent::Cancel(outcome));
        }
    }

    fn answer(&self, reply: Subject, body: &impl Serialize) {
        match serde_json::to_vec(body) {
            Ok(payload) => self.publisher.enqueue(reply, Bytes::from(payload), false),
            Err(err) => tracing::error!(%err, "cannot encode a reply"),
        }
    }
}

/// A request's reply subject, when it is one replies may go to.
fn reply_subject(message: &Message) -> Option<Subject> {
    match check_reply_subject(message) {
        Ok(()) => message.reply.clone(),
        Err(err) => {
            tracing::warn!(subject = %message.subject, %err, "request ignored");
            None
        }
    }
}

fn check_reply_subject(message: &Message) -> Result<(), RequestError> {
    match &message.reply {
        Some(reply) if !reply.starts_with(RESPONSES_PREFIX) => Err(RequestError::BadReplySubject {
            subject: protocol::quote_for_error(reply),
        }),
        _ => Ok(()),
    }
}
