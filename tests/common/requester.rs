//! A raw protocol client: sends requests and collects the builder's
//! replies as they arrive.

use std::time::Instant;

use futures_util::StreamExt;
use homelab_deploy::protocol::{Event, Reply};

use super::identity::Identity;
use super::nats::NatsServer;
use super::wait::WAIT;

/// One reply with the moment it arrived.
#[derive(Debug, Clone)]
pub struct Timed {
    pub reply: Reply,
    pub at: Instant,
}

/// A raw protocol client for tests.
pub struct Requester {
    pub nats: async_nats::Client,
    next: std::sync::atomic::AtomicU64,
    id: String,
}

/// The events of one request as they arrive.
pub struct Pending {
    pub subscriber: async_nats::Subscriber,
    pub reply_to: String,
}

impl Requester {
    pub async fn new(nats: &NatsServer) -> Self {
        Self::with_options(&nats.url(), async_nats::ConnectOptions::new()).await
    }

    /// A requester connecting with `options` (credentials, reconnect
    /// behaviour), which reconnects as quickly as the CLI does.
    pub async fn with_options(url: &str, options: async_nats::ConnectOptions) -> Self {
        let nats = options
            .reconnect_delay_callback(homelab_deploy::nats::reconnect_delay)
            .connect(url)
            .await
            .unwrap();
        Self {
            nats,
            next: Default::default(),
            id: homelab_deploy::protocol::random_hex::<4>(),
        }
    }

    /// A fresh reply subject under build.responses.
    pub fn reply_subject(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("build.responses.test{}.{n}", self.id)
    }

    /// Publishes `body` on `subject` with a fresh reply subject.
    pub async fn send(&self, subject: &str, body: &str) -> Pending {
        let reply_to = self.reply_subject();
        let subscriber = self.nats.subscribe(reply_to.clone()).await.unwrap();
        self.nats
            .publish_with_reply(subject.to_owned(), reply_to.clone(), body.to_owned().into())
            .await
            .unwrap();
        self.nats.flush().await.unwrap();
        Pending {
            subscriber,
            reply_to,
        }
    }

    /// Sends a build request (no options) and waits until its first host
    /// has started; returns the request and the events so far.
    pub async fn send_until_started(&self, subject: &str) -> (Pending, Vec<Timed>) {
        let mut pending = self.send(subject, "").await;
        let events = pending
            .until(|e| matches!(e, Event::HostStarted { .. }))
            .await;
        (pending, events)
    }

    /// Asks `build.status` and returns the builder's report.
    pub async fn status(&self) -> homelab_deploy::protocol::BuilderStatus {
        let mut pending = self.send("build.status", "").await;
        let message = tokio::time::timeout(WAIT, pending.subscriber.next())
            .await
            .expect("no status reply in time")
            .expect("subscription closed");
        let homelab_deploy::protocol::StatusEvent::Status(status) =
            serde_json::from_slice(&message.payload).unwrap();
        status
    }

    /// Sends a request and collects its events up to the terminal one.
    pub async fn build(&self, subject: &str, body: &str) -> Vec<Reply> {
        let mut pending = self.send(subject, body).await;
        pending
            .until_terminal()
            .await
            .into_iter()
            .map(|t| t.reply)
            .collect()
    }
}

impl Pending {
    /// The next reply, failing the test after [`WAIT`].
    pub async fn next(&mut self) -> Timed {
        let message = tokio::time::timeout(WAIT, self.subscriber.next())
            .await
            .expect("timed out waiting for a reply")
            .expect("subscription closed");
        let reply: Reply = serde_json::from_slice(&message.payload).unwrap_or_else(|err| {
            panic!(
                "malformed reply {err}: {}",
                String::from_utf8_lossy(&message.payload)
            )
        });
        Timed {
            reply,
            at: Instant::now(),
        }
    }

    /// Collects replies up to and including the terminal one.
    pub async fn until_terminal(&mut self) -> Vec<Timed> {
        let mut replies = Vec::new();
        loop {
            let timed = self.next().await;
            let terminal = timed.reply.is_terminal();
            replies.push(timed);
            if terminal {
                return replies;
            }
        }
    }

    /// Collects replies until one matches `stop` (inclusive).
    pub async fn until(&mut self, stop: impl Fn(&Event) -> bool) -> Vec<Timed> {
        let mut replies = Vec::new();
        loop {
            let timed = self.next().await;
            let matched = stop(&timed.reply.event);
            replies.push(timed);
            if matched {
                return replies;
            }
        }
    }

    /// Whether a reply is already waiting (without blocking).
    pub fn try_next(&mut self) -> Option<Reply> {
        use futures_util::FutureExt;
        let message = self.subscriber.next().now_or_never()??;
        serde_json::from_slice(&message.payload).ok()
    }
}

/// A [`Requester`] authenticated as `identity`.
pub async fn connect_as(nats: &NatsServer, identity: &Identity) -> Requester {
    let seed = std::fs::read_to_string(&identity.seed_file).unwrap();
    Requester::with_options(
        &nats.url(),
        async_nats::ConnectOptions::with_nkey(seed.trim().to_owned()),
    )
    .await
}
