//! Getting events to requesters without ever holding up a build.
//!
//! Every reply goes through one [`Publisher`]: an ordered outbox drained by
//! a single task. Enqueueing never waits, so a NATS outage cannot stall a
//! build (async-nats stops taking publishes once its own buffer is full
//! while it reconnects). Progress and log events are expendable and their
//! number in the outbox is capped; everything else — above all the terminal
//! events — is kept until it is sent.
//!
//! After a reconnection the outbox is held for a moment before it drains:
//! requesters reconnect too, and an event published before their
//! subscription is back would be lost.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use async_nats::connection::State;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::{Event, Reply};

/// How long the outbox waits after a reconnection before it drains.
pub const RECONNECT_HOLD: Duration = Duration::from_secs(3);
/// Expendable events (progress, log) kept waiting at most; beyond it the
/// newest are dropped.
pub const MAX_EXPENDABLE_QUEUED: usize = 256;

struct Outgoing {
    subject: Subject,
    payload: Bytes,
    expendable: bool,
}

#[derive(Default)]
struct Outbox {
    items: VecDeque<Outgoing>,
    expendable: usize,
    dropped: u64,
    /// An item taken out and not yet handed to NATS.
    sending: bool,
}

impl Outbox {
    fn is_drained(&self) -> bool {
        self.items.is_empty() && !self.sending
    }
}

/// The single sender of replies.
pub struct Publisher {
    nats: async_nats::Client,
    outbox: Mutex<Outbox>,
    wake: Notify,
    drained: Notify,
    /// Milliseconds since `epoch` of the last reconnection (0: none yet).
    reconnected_at: AtomicU64,
    connects: AtomicU64,
    epoch: Instant,
}

impl Publisher {
    /// A publisher over `nats`; run [`Publisher::run`] to drain it.
    pub fn new(nats: async_nats::Client) -> Arc<Self> {
        Arc::new(Self {
            nats,
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            drained: Notify::new(),
            reconnected_at: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes reconnections (from the connection's event callback).
    pub fn nats_event(&self, event: &async_nats::Event) {
        if matches!(event, async_nats::Event::Connected)
            && self.connects.fetch_add(1, Ordering::Relaxed) > 0
        {
            self.note_reconnected();
        }
    }

    /// Starts the hold from now (or keeps a later start).
    fn note_reconnected(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.reconnected_at.fetch_max(now.max(1), Ordering::Relaxed);
    }

    /// Queues `payload` for `subject`; never waits.
    pub fn enqueue(&self, subject: Subject, payload: Bytes, expendable: bool) {
        let mut outbox = self.lock();
        if expendable {
            if outbox.expendable >= MAX_EXPENDABLE_QUEUED {
                outbox.dropped += 1;
                return;
            }
            outbox.expendable += 1;
        }
        outbox.items.push_back(Outgoing {
            subject,
            payload,
            expendable,
        });
        drop(outbox);
        self.wake.notify_one();
    }

    /// Messages waiting to be sent.
    pub fn backlog(&self) -> usize {
        let outbox = self.lock();
        outbox.items.len() + usize::from(outbox.sending)
    }

    /// Waits until everything queued so far is handed to NATS, or `limit`.
    pub async fn drain(&self, limit: Duration) -> bool {
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
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let wake = self.wake.notified();
            let next = {
                let mut outbox = self.lock();
                let next = outbox.items.pop_front();
                if let Some(item) = &next {
                    outbox.sending = true;
                    if item.expendable {
                        outbox.expendable -= 1;
                    }
                }
                if outbox.items.is_empty() && outbox.dropped > 0 {
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
            if let Err(err) = self.nats.publish(item.subject.clone(), item.payload).await {
                tracing::warn!(%err, subject = %item.subject, "cannot publish a reply");
            }
            let mut outbox = self.lock();
            outbox.sending = false;
            if outbox.items.is_empty() {
                self.drained.notify_waiters();
            }
        }
    }

    /// Returns once connected and past the hold after a reconnection.
    async fn until_deliverable(&self) {
        let mut seen_down = false;
        loop {
            if self.nats.connection_state() != State::Connected {
                seen_down = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            // The event callback that notes the reconnection runs in its
            // own task and may not have yet: a disconnection seen here
            // starts the hold by itself.
            if std::mem::take(&mut seen_down) {
                self.note_reconnected();
            }
            let at = self.reconnected_at.load(Ordering::Relaxed);
            if at > 0 {
                let release = self.epoch + Duration::from_millis(at) + RECONNECT_HOLD;
                if Instant::now() < release {
                    tokio::time::sleep_until(release).await;
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
pub struct Replies {
    publisher: Arc<Publisher>,
    to: Arc<Mutex<Vec<Subject>>>,
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
    pub fn new(publisher: Arc<Publisher>, to: Option<Subject>) -> Self {
        Self {
            publisher,
            to: Arc::new(Mutex::new(to.into_iter().collect())),
        }
    }

    fn subjects(&self) -> Vec<Subject> {
        self.to.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds a requester: it gets every event sent from now on.
    pub fn add(&self, subject: Subject) {
        self.to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(subject);
    }

    /// Sends one event to every requester; never waits.
    pub fn send(&self, build_id: &str, event: Event) {
        let subjects = self.subjects();
        if subjects.is_empty() {
            return;
        }
        send_to(&self.publisher, &subjects, build_id, event);
    }

    /// Sends one event to one subject only (e.g. `accepted` to a requester
    /// joining a coalesced build).
    pub fn send_to(&self, subject: &Subject, build_id: &str, event: Event) {
        send_to(
            &self.publisher,
            std::slice::from_ref(subject),
            build_id,
            event,
        );
    }
}

fn send_to(publisher: &Publisher, subjects: &[Subject], build_id: &str, event: Event) {
    let expendable = matches!(event, Event::Progress { .. } | Event::Log { .. });
    let name = event.name();
    let reply = Reply {
        build_id: build_id.to_owned(),
        event,
    };
    let payload = match serde_json::to_vec(&reply) {
        Ok(payload) => Bytes::from(payload),
        Err(err) => {
            tracing::error!(%err, event = name, "cannot encode a reply");
            return;
        }
    };
    for subject in subjects {
        publisher.enqueue(subject.clone(), payload.clone(), expendable);
    }
}
