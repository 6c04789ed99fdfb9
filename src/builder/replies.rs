//! Getting events to requesters without ever holding up a build.
//!
//! Every reply goes through a [`Publisher`] (one per connection: build
//! events on the builder's, answers to status and cancel requests on the
//! connection they came on): an outbox drained by a single task. Enqueueing never waits, so a NATS outage cannot stall a
//! build (async-nats stops taking publishes once its own buffer is full
//! while it reconnects). What is queued is bounded by [`Class`]:
//!
//! - events of accepted builds go out in order, ahead of everything else;
//!   progress, log and heartbeat events among them are expendable and
//!   their number is capped; the rest — above all the terminal events —
//!   is kept until it is sent (there are at most `queue_limit` + 1 builds);
//! - answers to requests that were not accepted (`build.status`,
//!   `build.cancel`, `rejected`) wait behind them, at most
//!   [`MAX_ANSWERS_QUEUED`], and at most [`MAX_ANSWERS_PER_SECOND`] go out;
//!   beyond that they are dropped and counted, so a flood of requests
//!   neither grows the builder's memory nor fills the way out (the client's
//!   buffer, the socket, the server) ahead of the events of the builds it
//!   accepted, nor costs the time it takes to make and send an answer.
//!
//! Every event of a build carries `seq`, counted per build here
//! ([`Replies`]), so a requester can tell a replay from a new event.
//!
//! After a reconnection the outbox is held for a moment before it drains:
//! requesters reconnect too, and an event published before their
//! subscription is back would be lost.
//!
//! Credentials (a token in a repo URL that Nix repeats in a message) are
//! masked here, on the way out, whatever the reply.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::history::{BuildMeta, EventTap};
use crate::nats::{Connection, ConnectionState};
use crate::protocol::{Event, Reply};
use crate::redact::redact;
use crate::signing::Signer;
use crate::sync::lock;

/// How long the outbox waits after a reconnection before it drains.
pub(crate) const RECONNECT_HOLD: Duration = Duration::from_secs(3);
/// Expendable events (progress, log) kept waiting at most; beyond it the
/// newest are dropped.
pub(crate) const MAX_EXPENDABLE_QUEUED: usize = 256;
/// Answers to requests that were not accepted (status, cancel, rejected)
/// kept waiting at most; beyond it the newest are dropped and counted.
pub(crate) const MAX_ANSWERS_QUEUED: usize = 1024;
/// Answers to requests that were not accepted sent per second at most
/// (and in a burst): far more than people and scripts ask, far less than
/// a flood.
pub(crate) const MAX_ANSWERS_PER_SECOND: u32 = 10_000;
/// A resumed build numbers its events from (seconds since the epoch at the
/// builder's start) × this, above every number sent before the restart
/// (a build sends far fewer events than this in one run of the builder).
const RESUMED_SEQ_STEP: u64 = 1 << 20;

/// How a reply is queued (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// An event of an accepted build that must arrive: kept until sent.
    Event,
    /// Progress, log, heartbeat: capped at [`MAX_EXPENDABLE_QUEUED`].
    Expendable,
    /// An answer to a request that was not accepted: sent after events,
    /// capped at [`MAX_ANSWERS_QUEUED`].
    Answer,
}

impl Class {
    /// How an event of a build is queued.
    fn of(event: &Event) -> Self {
        match event {
            Event::Progress { .. } | Event::Log { .. } | Event::Heartbeat => Self::Expendable,
            Event::Rejected { .. } => Self::Answer,
            _ => Self::Event,
        }
    }
}
/// Bytes of a message's `max_payload` left for its signature headers.
const SIGNATURE_ROOM: usize = 512;

/// Called once a reply has reached the server's socket.
pub(crate) type OnSent = Box<dyn FnOnce() + Send>;

struct Outgoing {
    subject: Subject,
    payload: Bytes,
    expendable: bool,
    /// Run after the reply is published and the connection flushed; never
    /// when it could not be.
    on_sent: Option<OnSent>,
}

#[derive(Default)]
struct Outbox {
    /// Events of accepted builds, in order.
    events: VecDeque<Outgoing>,
    /// Answers to requests that were not accepted.
    answers: VecDeque<Outgoing>,
    expendable: usize,
    dropped: u64,
    /// Answers that may still be sent (see [`MAX_ANSWERS_PER_SECOND`]),
    /// as of `answers_counted`.
    answer_budget: f64,
    answers_counted: Option<Instant>,
    /// An item taken out and not yet handed to NATS.
    sending: bool,
}

impl Outbox {
    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.answers.is_empty()
    }

    fn is_drained(&self) -> bool {
        self.is_empty() && !self.sending
    }

    fn len(&self) -> usize {
        self.events.len() + self.answers.len()
    }

    /// Whether one more answer may be queued now: under
    /// [`MAX_ANSWERS_QUEUED`] and within [`MAX_ANSWERS_PER_SECOND`].
    fn room_for_answer(&mut self, now: Instant) -> bool {
        let rate = f64::from(MAX_ANSWERS_PER_SECOND);
        self.answer_budget = match self.answers_counted {
            Some(then) => (self.answer_budget + (now - then).as_secs_f64() * rate).min(rate),
            None => rate,
        };
        self.answers_counted = Some(now);
        self.answers.len() < MAX_ANSWERS_QUEUED && self.answer_budget >= 1.0
    }
}

/// The single sender of replies.
pub(crate) struct Publisher {
    /// Where replies go; `None` only for a publisher in unit tests, which
    /// keeps everything queued for the test to read.
    nats: Option<async_nats::Client>,
    state: watch::Receiver<ConnectionState>,
    /// Signs every reply, when the builder has an NKey.
    signer: Option<Arc<Signer>>,
    outbox: Mutex<Outbox>,
    wake: Notify,
    drained: Notify,
    /// Called for every answer dropped for want of room (see
    /// [`Outbox::room_for_answer`]).
    on_overload: Box<dyn Fn() + Send + Sync>,
}

impl Publisher {
    /// A publisher over `connection`; run [`Publisher::run`] to drain it.
    /// `on_overload` is called for each answer dropped for want of room.
    pub(crate) fn new(
        connection: &Connection,
        on_overload: impl Fn() + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            nats: Some(connection.client.clone()),
            state: connection.state.clone(),
            signer: connection.signer.clone(),
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            drained: Notify::new(),
            on_overload: Box::new(on_overload),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        lock(&self.outbox)
    }

    /// A publisher with no NATS behind it, for unit tests: replies stay
    /// queued until [`Publisher::take_queued`].
    #[cfg(test)]
    pub(crate) fn offline() -> Arc<Self> {
        let (_, state) = watch::channel(ConnectionState {
            connected: false,
            connects: 0,
            since: std::time::Instant::now(),
        });
        Arc::new(Self {
            nats: None,
            state,
            signer: None,
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            drained: Notify::new(),
            on_overload: Box::new(|| {}),
        })
    }

    /// Everything queued so far, in the order it would be sent (events of
    /// accepted builds first), as subject and decoded JSON.
    #[cfg(test)]
    pub(crate) fn take_queued(&self) -> Vec<(String, serde_json::Value)> {
        let mut outbox = self.lock();
        let events = std::mem::take(&mut outbox.events);
        let answers = std::mem::take(&mut outbox.answers);
        outbox.expendable = 0;
        events
            .into_iter()
            .chain(answers)
            .map(|item| {
                // Taken as if sent.
                if let Some(on_sent) = item.on_sent {
                    on_sent();
                }
                let json = serde_json::from_slice(&item.payload).expect("replies are JSON");
                (item.subject.to_string(), json)
            })
            .collect()
    }

    /// Whether an answer queued now would be sent rather than dropped, so
    /// the intake can skip making one nobody will get; when not, that
    /// answer counts as dropped.
    pub(crate) fn room_for_answer(&self) -> bool {
        let room = self.lock().room_for_answer(Instant::now());
        if !room {
            (self.on_overload)();
        }
        room
    }

    /// Whether answers wait to be sent: the publisher is behind.
    pub(crate) fn answers_waiting(&self) -> bool {
        !self.lock().answers.is_empty()
    }

    /// Queues `payload` for `subject`; never waits. Every reply passes
    /// here, so this is where credentials are taken out (see [`crate::redact`]).
    pub(crate) fn enqueue(&self, subject: Subject, payload: Bytes, class: Class) {
        self.enqueue_then(subject, payload, class, None);
    }

    /// [`Publisher::enqueue`], running `on_sent` once the reply has been
    /// published and the connection flushed (events of accepted builds
    /// only: the others may be dropped).
    pub(crate) fn enqueue_then(
        &self,
        subject: Subject,
        payload: Bytes,
        class: Class,
        on_sent: Option<OnSent>,
    ) {
        let payload = redact_payload(payload);
        let mut outbox = self.lock();
        match class {
            Class::Expendable if outbox.expendable >= MAX_EXPENDABLE_QUEUED => {
                outbox.dropped += 1;
                return;
            }
            Class::Answer if !outbox.room_for_answer(Instant::now()) => {
                drop(outbox);
                (self.on_overload)();
                return;
            }
            Class::Answer => outbox.answer_budget -= 1.0,
            Class::Expendable => outbox.expendable += 1,
            Class::Event => {}
        }
        let item = Outgoing {
            subject,
            payload,
            expendable: class == Class::Expendable,
            on_sent: on_sent.filter(|_| class == Class::Event),
        };
        match class {
            Class::Answer => outbox.answers.push_back(item),
            Class::Event | Class::Expendable => outbox.events.push_back(item),
        }
        drop(outbox);
        self.wake.notify_one();
    }

    /// The largest reply the server takes, less room for the signature
    /// headers.
    pub(crate) fn max_reply_bytes(&self) -> usize {
        // NATS's default limit where there is no server to ask.
        const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
        let max_payload = self
            .nats
            .as_ref()
            .map_or(DEFAULT_MAX_PAYLOAD, async_nats::Client::max_payload);
        max_payload.saturating_sub(SIGNATURE_ROOM)
    }

    /// Messages waiting to be sent.
    pub(crate) fn backlog(&self) -> usize {
        let outbox = self.lock();
        outbox.len() + usize::from(outbox.sending)
    }

    /// Waits until everything queued so far is handed to NATS, or `limit`.
    pub(crate) async fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let drained = self.drained.notified();
            if self.lock().is_drained() {
                return true;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return self.lock().is_drained();
            }
        }
    }

    /// Sends queued messages in order until `stop`.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let Some(nats) = self.nats.clone() else {
            return stop.cancelled().await;
        };
        loop {
            let wake = self.wake.notified();
            let next = {
                let mut outbox = self.lock();
                // Events of accepted builds first: a flood of other
                // requests never delays them.
                let next = match outbox.events.pop_front() {
                    Some(item) => Some(item),
                    None => outbox.answers.pop_front(),
                };
                if let Some(item) = &next {
                    outbox.sending = true;
                    if item.expendable {
                        outbox.expendable -= 1;
                    }
                }
                if outbox.is_empty() && outbox.dropped > 0 {
                    tracing::warn!(
                        dropped = outbox.dropped,
                        "progress/log events dropped while NATS was slow or away"
                    );
                    outbox.dropped = 0;
                }
                next
            };
            let Some(item) = next else {
                tokio::select! {
                    () = wake => continue,
                    () = stop.cancelled() => return,
                }
            };
            tokio::select! {
                () = self.until_deliverable() => {}
                () = stop.cancelled() => return,
            }
            let published = match &self.signer {
                Some(signer) => {
                    let headers = signer.headers(&item.subject, "", &item.payload);
                    nats.publish_with_headers(item.subject.clone(), headers, item.payload)
                        .await
                }
                None => nats.publish(item.subject.clone(), item.payload).await,
            };
            match (published, item.on_sent) {
                (Err(err), _) => {
                    tracing::warn!(%err, subject = %item.subject, "cannot publish a reply");
                }
                // On the way to the server: the socket has it even if the
                // builder dies now.
                (Ok(()), Some(on_sent)) => match nats.flush().await {
                    Ok(()) => on_sent(),
                    Err(err) => tracing::warn!(%err, "cannot flush a terminal reply"),
                },
                (Ok(()), None) => {}
            }
            let mut outbox = self.lock();
            outbox.sending = false;
            if outbox.is_empty() {
                self.drained.notify_waiters();
            }
        }
    }

    /// Returns once connected and past the hold after a reconnection.
    async fn until_deliverable(&self) {
        let mut state = self.state.clone();
        loop {
            let now = *state.borrow_and_update();
            if !now.connected {
                if state.changed().await.is_err() {
                    return; // the connection is gone; publishing will say so
                }
                continue;
            }
            if now.is_reconnection() {
                let release = Instant::from_std(now.since) + RECONNECT_HOLD;
                if Instant::now() < release {
                    // A change (lost again) is looked at before sending.
                    let _ = tokio::time::timeout_at(release, state.changed()).await;
                    continue;
                }
            }
            return;
        }
    }
}

/// Where one request's events go: the reply subjects of its requesters
/// (several when identical requests were coalesced; none for a
/// fire-and-forget request, which is built all the same).
#[derive(Clone)]
pub(crate) struct Replies {
    publisher: Arc<Publisher>,
    to: Arc<Mutex<Vec<Subject>>>,
    /// When an event was last sent to every requester.
    last_sent: Arc<Mutex<Instant>>,
    /// The `seq` of the next event of the build.
    next_seq: Arc<AtomicU64>,
    /// Where the build's events go besides its requesters.
    tap: Option<Tapped>,
}

/// The build's events seen by the history and `/api/v1/events`.
#[derive(Clone)]
struct Tapped {
    tap: Arc<EventTap>,
    meta: Arc<BuildMeta>,
}

impl std::fmt::Debug for Replies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies")
            .field("to", &self.subjects())
            .finish()
    }
}

impl Replies {
    /// Events for the requester at `to`, if any.
    pub(crate) fn new(publisher: Arc<Publisher>, to: Option<Subject>) -> Self {
        Self {
            publisher,
            to: Arc::new(Mutex::new(to.into_iter().collect())),
            last_sent: Arc::new(Mutex::new(Instant::now())),
            next_seq: Arc::new(AtomicU64::new(0)),
            tap: None,
        }
    }

    /// The same, with every event also shown to `tap` as an event of the
    /// build `meta` describes.
    pub(crate) fn tapped(mut self, tap: &Arc<EventTap>, meta: BuildMeta) -> Self {
        self.tap = Some(Tapped {
            tap: Arc::clone(tap),
            meta: Arc::new(meta),
        });
        self
    }

    /// For a build resumed after a restart: its events are numbered above
    /// every number the previous run of the builder could have sent.
    pub(crate) fn resumed(self) -> Self {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        self.next_seq.store(
            since_epoch.saturating_mul(RESUMED_SEQ_STEP),
            Ordering::Relaxed,
        );
        self
    }

    fn take_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The requesters' subjects.
    pub(crate) fn subjects(&self) -> Vec<Subject> {
        lock(&self.to).clone()
    }

    /// Adds a requester: it gets every event sent from now on.
    pub(crate) fn add(&self, subject: Subject) {
        lock(&self.to).push(subject);
    }

    /// How long since the last event to every requester.
    pub(crate) fn idle_for(&self) -> Duration {
        lock(&self.last_sent).elapsed()
    }

    /// Sends one event to every requester; never waits.
    pub(crate) fn send(&self, build_id: &str, event: Event) {
        *lock(&self.last_sent) = Instant::now();
        let class = Class::of(&event);
        let reply = Reply {
            build_id: build_id.to_owned(),
            seq: Some(self.take_seq()),
            event,
        };
        self.observe(&reply);
        let subjects = self.subjects();
        if !subjects.is_empty() {
            send_to(&self.publisher, &subjects, &reply, class);
        }
    }

    /// Sends one event to every requester, then runs `on_sent` once all of
    /// them are on their way to the server (at once without requesters).
    pub(crate) fn send_then(&self, build_id: &str, event: Event, on_sent: OnSent) {
        *lock(&self.last_sent) = Instant::now();
        let reply = Reply {
            build_id: build_id.to_owned(),
            seq: Some(self.take_seq()),
            event,
        };
        self.observe(&reply);
        let subjects = self.subjects();
        let Some((last, others)) = subjects.split_last() else {
            return on_sent();
        };
        let Some(payload) = encode(&self.publisher, &reply) else {
            return;
        };
        for subject in others {
            self.publisher
                .enqueue(subject.clone(), payload.clone(), Class::Event);
        }
        self.publisher
            .enqueue_then(last.clone(), payload, Class::Event, Some(on_sent));
    }

    /// Sends one event to one subject only (e.g. `accepted` to a requester
    /// joining a coalesced build), queued as `class`.
    pub(crate) fn send_to(&self, subject: &Subject, build_id: &str, event: Event, class: Class) {
        let reply = Reply {
            build_id: build_id.to_owned(),
            seq: Some(self.take_seq()),
            event,
        };
        self.observe(&reply);
        send_to(
            &self.publisher,
            std::slice::from_ref(subject),
            &reply,
            class,
        );
    }
}

impl Replies {
    fn observe(&self, reply: &Reply) {
        if let Some(Tapped { tap, meta }) = &self.tap {
            tap.observe(meta, reply);
        }
    }
}

/// `payload` with credentials masked; the same bytes when there are none.
fn redact_payload(payload: Bytes) -> Bytes {
    match redact(&String::from_utf8_lossy(&payload)) {
        std::borrow::Cow::Borrowed(_) => payload,
        std::borrow::Cow::Owned(redacted) => Bytes::from(redacted),
    }
}

/// `reply` as sent: a terminal event too large for the server is
/// shortened, never lost.
fn encode(publisher: &Publisher, reply: &Reply) -> Option<Bytes> {
    match reply.to_json_within(publisher.max_reply_bytes()) {
        Ok(payload) => Some(Bytes::from(payload)),
        Err(err) => {
            tracing::error!(%err, event = reply.event.name(), "cannot encode a reply");
            None
        }
    }
}

fn send_to(publisher: &Publisher, subjects: &[Subject], reply: &Reply, class: Class) {
    let Some(payload) = encode(publisher, reply) else {
        return;
    };
    for subject in subjects {
        publisher.enqueue(subject.clone(), payload.clone(), class);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_beyond_the_rate_wait_for_the_budget() {
        let mut outbox = Outbox::default();
        let start = Instant::now();
        for _ in 0..MAX_ANSWERS_PER_SECOND {
            assert!(outbox.room_for_answer(start));
            outbox.answer_budget -= 1.0;
        }
        assert!(!outbox.room_for_answer(start));
        let later = start + Duration::from_millis(10);
        let refilled = MAX_ANSWERS_PER_SECOND / 100;
        for _ in 0..refilled {
            assert!(outbox.room_for_answer(later));
            outbox.answer_budget -= 1.0;
        }
        assert!(!outbox.room_for_answer(later));
        // Never more than a second's worth, however long it was idle.
        assert!(outbox.room_for_answer(later + Duration::from_secs(60)));
        assert!(outbox.answer_budget <= f64::from(MAX_ANSWERS_PER_SECOND));
    }

    #[test]
    fn payloads_leave_without_credentials() {
        let reply = Reply::new(
            "b",
            Event::Log {
                host: "ns1".into(),
                lines: vec!["fetching 'https://oauth2:glpat-SECRET@git.example/r.git'".into()],
            },
        );
        let payload = Bytes::from(serde_json::to_vec(&reply).unwrap());
        let sent = redact_payload(payload);
        let text = std::str::from_utf8(&sent).unwrap();
        assert!(!text.contains("SECRET"), "{text}");
        let back: Reply = serde_json::from_slice(&sent).unwrap();
        let Event::Log { lines, .. } = back.event else {
            panic!("not a log event: {text}");
        };
        assert_eq!(lines[0], "fetching 'https://***@git.example/r.git'");
        let clean = Bytes::from_static(b"{\"build_id\":\"b\"}");
        assert_eq!(redact_payload(clean.clone()).as_ptr(), clean.as_ptr());
    }
}
