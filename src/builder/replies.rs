//! Sending a request's events to its requester.

use async_nats::Subject;

use crate::protocol::{Event, Reply};

/// Where a request's events go: its reply subject, if it had one (a request
/// without one is built all the same, for fire-and-forget timers).
#[derive(Debug, Clone)]
pub struct Replies {
    nats: async_nats::Client,
    to: Option<Subject>,
}

impl Replies {
    /// Events for `to` over `nats`.
    pub fn new(nats: async_nats::Client, to: Option<Subject>) -> Self {
        Self { nats, to }
    }

    /// Publishes one event. Delivery problems are logged, never fatal: a
    /// build goes on even when its requester cannot be reached.
    pub async fn send(&self, build_id: &str, event: Event) {
        let Some(to) = &self.to else {
            return;
        };
        let name = event.name();
        let reply = Reply {
            build_id: build_id.to_owned(),
            event,
        };
        let payload = match serde_json::to_vec(&reply) {
            Ok(payload) => payload,
            Err(err) => {
                tracing::error!(%err, event = name, "cannot encode reply");
                return;
            }
        };
        if let Err(err) = self.nats.publish(to.clone(), payload.into()).await {
            tracing::warn!(%err, event = name, subject = %to, "cannot publish reply");
        }
    }
}
