//! A cancellation that carries why: the builder's shutdown, and each
//! running request's own cancel (a child of the shutdown), each say in
//! their own words why a request stopped.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Why requests end when the builder stops.
pub(crate) const SHUTDOWN: &str = "the builder is shutting down";
/// Why requests stop when the builder stops and will resume them.
pub(crate) const INTERRUPTED: &str = "the builder is restarting; the build resumes when it is back";
/// Why a request ends after `build.cancel`.
pub(crate) const BY_REQUEST: &str = "cancelled by request";

/// A [`CancellationToken`] with a reason. A child is cancelled with its
/// parent and then gives the parent's reason, unless it was cancelled
/// itself first.
#[derive(Debug, Clone)]
pub(crate) struct Cancellation {
    token: CancellationToken,
    reason: Arc<OnceLock<&'static str>>,
    parent: Option<Box<Cancellation>>,
}

impl Cancellation {
    /// A root over `token` (e.g. the signal handler's), which gives
    /// `reason` when that token fires.
    pub(crate) fn root(token: CancellationToken, reason: &'static str) -> Self {
        let cancellation = Self {
            token,
            reason: Arc::default(),
            parent: None,
        };
        let _ = cancellation.reason.set(reason);
        cancellation
    }

    /// A cancellation of its own, also cancelled with `self`.
    pub(crate) fn child(&self) -> Self {
        Self {
            token: self.token.child_token(),
            reason: Arc::default(),
            parent: Some(Box::new(self.clone())),
        }
    }

    /// Cancels with `reason`; a cancellation that already fired keeps its
    /// first reason.
    pub(crate) fn cancel(&self, reason: &'static str) {
        if !self.token.is_cancelled() {
            let _ = self.reason.set(reason);
        }
        self.token.cancel();
    }

    /// Why it fired (meaningful once it has).
    pub(crate) fn reason(&self) -> &'static str {
        match (self.reason.get(), &self.parent) {
            (Some(reason), _) => reason,
            (None, Some(parent)) => parent.reason(),
            (None, None) => "cancelled",
        }
    }

    /// Whether it has fired.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when it fires.
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// The plain token, for code that only needs to stop (Nix processes).
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_gives_its_own_reason_or_its_parents() {
        let shutdown = Cancellation::root(CancellationToken::new(), SHUTDOWN);
        let first = shutdown.child();
        let second = shutdown.child();
        first.cancel(BY_REQUEST);
        assert!(first.is_cancelled() && !second.is_cancelled());
        assert_eq!(first.reason(), BY_REQUEST);

        shutdown.cancel("ignored: the root has its reason");
        assert!(second.is_cancelled());
        assert_eq!(second.reason(), SHUTDOWN);
        // A later cancel does not rewrite why it stopped.
        second.cancel(BY_REQUEST);
        assert_eq!(second.reason(), SHUTDOWN);
        assert_eq!(first.reason(), BY_REQUEST);
    }
}
