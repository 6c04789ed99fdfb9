//! A cancellation that carries why: the builder's shutdown, and each
//! running request's own cancel (a child of the shutdown), each say in
//! their own words why a request stopped.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Why a request stopped before it was done. Whether a stop ends the
/// request or only pauses it (to resume at the next start) is decided by
/// this value, never by its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// The builder is stopping for good (no journal to resume from).
    Shutdown,
    /// The builder is stopping and resumes the request when it is back.
    Interrupted,
    /// A `build.cancel` from the build's owner or an admin.
    ByRequest,
}

impl StopReason {
    /// What requesters are told (the `cancelled` error's message).
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Shutdown => "the builder is shutting down",
            Self::Interrupted => "the builder is restarting; the build resumes when it is back",
            Self::ByRequest => "cancelled by request",
        }
    }

    /// Whether the request pauses (and stays in the journal) rather than
    /// ending.
    pub(crate) fn pauses(self) -> bool {
        self == Self::Interrupted
    }
}

/// A [`CancellationToken`] with a reason. A child is cancelled with its
/// parent and then gives the parent's reason, unless it was cancelled
/// itself first.
#[derive(Debug, Clone)]
pub(crate) struct Cancellation {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
    parent: Option<Box<Cancellation>>,
}

impl Cancellation {
    /// A root over `token` (e.g. the signal handler's), which gives
    /// `reason` when that token fires.
    pub(crate) fn root(token: CancellationToken, reason: StopReason) -> Self {
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
    pub(crate) fn cancel(&self, reason: StopReason) {
        if !self.token.is_cancelled() {
            let _ = self.reason.set(reason);
        }
        self.token.cancel();
    }

    /// Why it fired (meaningful once it has; a root always has its
    /// reason, so every child finds one).
    pub(crate) fn reason(&self) -> StopReason {
        match (self.reason.get(), &self.parent) {
            (Some(reason), _) => *reason,
            (None, Some(parent)) => parent.reason(),
            (None, None) => StopReason::Shutdown,
        }
    }

    /// Whether it fired to pause the request rather than end it.
    pub(crate) fn pauses(&self) -> bool {
        self.is_cancelled() && self.reason().pauses()
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
        let shutdown = Cancellation::root(CancellationToken::new(), StopReason::Shutdown);
        let first = shutdown.child();
        let second = shutdown.child();
        first.cancel(StopReason::ByRequest);
        assert!(first.is_cancelled() && !second.is_cancelled());
        assert_eq!(first.reason(), StopReason::ByRequest);

        // Ignored: the root has its reason.
        shutdown.cancel(StopReason::Interrupted);
        assert!(second.is_cancelled());
        assert_eq!(second.reason(), StopReason::Shutdown);
        // A later cancel does not rewrite why it stopped.
        second.cancel(StopReason::ByRequest);
        assert_eq!(second.reason(), StopReason::Shutdown);
        assert_eq!(first.reason(), StopReason::ByRequest);
    }

    #[test]
    fn only_an_interrupting_stop_pauses_and_only_once_fired() {
        let restart = Cancellation::root(CancellationToken::new(), StopReason::Interrupted);
        let request = restart.child();
        assert!(!request.pauses(), "nothing fired yet");
        restart.cancel(StopReason::Interrupted);
        assert!(request.pauses());

        let restart = Cancellation::root(CancellationToken::new(), StopReason::Interrupted);
        let cancelled = restart.child();
        cancelled.cancel(StopReason::ByRequest);
        restart.cancel(StopReason::Interrupted);
        assert!(!cancelled.pauses(), "a cancel by request ends the build");
        for reason in [StopReason::Shutdown, StopReason::ByRequest] {
            assert!(!reason.pauses());
            assert_ne!(reason.message(), StopReason::Interrupted.message());
        }
    }
}
