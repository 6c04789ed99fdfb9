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
//!
//! Credentials (a token in a repo URL that Nix repeats in a message) are
//! masked here, on the way out, whatever the reply.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
/// Bytes of a message's `max_payload` left for its signature headers.
const SIGNATURE_ROOM: usize = 512;

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
pub(crate) struct Publisher {
    nats: async_nats::Client,
    state: watch::Receiver<ConnectionState>,
    /// Signs every reply, when the builder has an NKey.
    signer: Option<Arc<Signer>>,
    outbox: Mutex<Outbox>,
    wake: Notify,
    drained: Notify,
}

impl Publisher {
    /// A publisher over `connection`; run [`Publisher::run`] to drain it.
    pub(crate) fn new(connection: &Connection) -> Arc<Self> {
        Arc::new(Self {
            nats: connection.client.clone(),
            state: connection.state.clone(),
            signer: connection.signer.clone(),
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            drained: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        lock(&self.outbox)
    }

    /// Queues `payload` for `subject`; never waits. Every reply passes
    /// here, so this is where credentials are taken out (see [`crate::redact`]).
    pub(crate) fn enqueue(&self, subject: Subject, payload: Bytes, expendable: bool) {
        let payload = redact_payload(payload);
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

    /// The largest reply the server takes, less room for the signature
    /// headers.
    fn max_reply_bytes(&self) -> usize {
        self.nats.max_payload().saturating_sub(SIGNATURE_ROOM)
    }

    /// Messages waiting to be sent.
    pub(crate) fn backlog(&self) -> usize {
        let outbox = self.lock();
        outbox.items.len() + usize::from(outbox.sending)
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
            let published = match &self.signer {
                Some(signer) => {
                    let headers = signer.headers(&item.subject, "", &item.payload);
                    self.nats
                        .publish_with_headers(item.subject.clone(), headers, item.payload)
                        .await
                }
                None => self.nats.publish(item.subject.clone(), item.payload).await,
            };
            if let Err(err) = published {
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
        }
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
        let subjects = self.subjects();
        if subjects.is_empty() {
            return;
        }
        send_to(&self.publisher, &subjects, build_id, event);
    }

    /// Sends one event to one subject only (e.g. `accepted` to a requester
    /// joining a coalesced build).
    pub(crate) fn send_to(&self, subject: &Subject, build_id: &str, event: Event) {
        send_to(
            &self.publisher,
            std::slice::from_ref(subject),
            build_id,
            event,
        );
    }
}

/// `payload` with credentials masked; the same bytes when there are none.
fn redact_payload(payload: Bytes) -> Bytes {
    match redact(&String::from_utf8_lossy(&payload)) {
        std::borrow::Cow::Borrowed(_) => payload,
        std::borrow::Cow::Owned(redacted) => Bytes::from(redacted),
    }
}

fn send_to(publisher: &Publisher, subjects: &[Subject], build_id: &str, event: Event) {
    let expendable = matches!(
        event,
        Event::Progress { .. } | Event::Log { .. } | Event::Heartbeat
    );
    let name = event.name();
    let reply = Reply {
        build_id: build_id.to_owned(),
        event,
    };
    // A terminal event too large for the server is shortened, never lost.
    let payload = match reply.to_json_within(publisher.max_reply_bytes()) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_leave_without_credentials() {
        let reply = Reply {
            build_id: "b".into(),
            event: Event::Log {
                host: "ns1".into(),
                lines: vec!["fetching 'https://oauth2:glpat-SECRET@git.example/r.git'".into()],
            },
        };
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
