//! The requests the builder has accepted and not yet finished, with the
//! reply subjects attached to them: a subject serves one live request at a
//! time, so nobody can attach a requester's subject to another build (or
//! the same one twice), and every live request hears a heartbeat while
//! nothing else is sent. Each subject remembers the digest of the request
//! that brought it, so the same request sent again (a requester that did
//! not hear `accepted`) is told `accepted` again instead of being ignored.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::Subject;

use super::replies::Replies;
use crate::protocol::{Event, MAX_REQUESTERS_PER_BUILD};
use crate::sync::lock;

/// Why a requester could not be attached to a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttachError {
    /// The subject already serves a live request.
    Taken,
    /// The build already has [`MAX_REQUESTERS_PER_BUILD`] requesters.
    Full,
}

/// The request that brought a reply subject: its digest and the
/// `accepted` it was answered with.
#[derive(Debug, Clone)]
pub(crate) struct Answered {
    pub(crate) digest: String,
    pub(crate) accepted: Event,
}

/// A reply subject serving a live request.
struct Attached {
    build_id: String,
    /// `None` for requests read back from the journal.
    answered: Option<Answered>,
}

/// A request sent again: the `accepted` it got, to send again through its
/// build's replies.
pub(crate) struct Resent {
    pub(crate) build_id: String,
    pub(crate) accepted: Event,
    pub(crate) replies: Replies,
}

/// What a request's reply subject is to the live requests.
pub(crate) enum SubjectUse {
    /// It serves none: the request may be answered there.
    Free,
    /// It serves a live request, and this is that request again.
    Resent(Box<Resent>),
    /// It serves another request (or one whose digest is not known).
    Taken,
}

#[derive(Default)]
struct Inner {
    requests: HashMap<String, Replies>,
    /// Reply subject → the build it serves.
    subjects: HashMap<String, Attached>,
}

/// Live requests by build id, and their reply subjects.
#[derive(Default)]
pub(crate) struct LiveRequests {
    inner: Mutex<Inner>,
}

impl LiveRequests {
    /// Whether `subject` serves a live request.
    pub(crate) fn is_attached(&self, subject: &Subject) -> bool {
        lock(&self.inner).subjects.contains_key(subject.as_str())
    }

    /// What `subject`, the reply subject of a build request whose digest
    /// is `digest`, is to the live requests.
    pub(crate) fn subject_use(&self, subject: &Subject, digest: &str) -> SubjectUse {
        let inner = lock(&self.inner);
        let Some(attached) = inner.subjects.get(subject.as_str()) else {
            return SubjectUse::Free;
        };
        match (&attached.answered, inner.requests.get(&attached.build_id)) {
            (Some(answered), Some(replies)) if answered.digest == digest => {
                SubjectUse::Resent(Box::new(Resent {
                    build_id: attached.build_id.clone(),
                    accepted: answered.accepted.clone(),
                    replies: replies.clone(),
                }))
            }
            _ => SubjectUse::Taken,
        }
    }

    /// Records a newly accepted request with its requesters' subjects;
    /// `answered`: the request that brought them (`None` when resumed from
    /// the journal, which does not keep it).
    pub(crate) fn register(&self, build_id: &str, replies: &Replies, answered: Option<Answered>) {
        let mut inner = lock(&self.inner);
        for subject in replies.subjects() {
            inner.subjects.insert(
                subject.to_string(),
                Attached {
                    build_id: build_id.to_owned(),
                    answered: answered.clone(),
                },
            );
        }
        inner.requests.insert(build_id.to_owned(), replies.clone());
    }

    /// Adds `subject` as a requester of the live request `build_id`.
    pub(crate) fn attach(
        &self,
        build_id: &str,
        subject: &Subject,
        answered: Answered,
    ) -> Result<(), AttachError> {
        let mut inner = lock(&self.inner);
        if inner.subjects.contains_key(subject.as_str()) {
            return Err(AttachError::Taken);
        }
        let Some(replies) = inner.requests.get(build_id) else {
            return Err(AttachError::Full); // finished meanwhile: nothing to join
        };
        if replies.subjects().len() >= MAX_REQUESTERS_PER_BUILD {
            return Err(AttachError::Full);
        }
        replies.add(subject.clone());
        inner.subjects.insert(
            subject.to_string(),
            Attached {
                build_id: build_id.to_owned(),
                answered: Some(answered),
            },
        );
        Ok(())
    }

    /// Forgets a request that has sent its terminal event; its subjects
    /// are free again.
    pub(crate) fn remove(&self, build_id: &str) {
        let mut inner = lock(&self.inner);
        if let Some(replies) = inner.requests.remove(build_id) {
            for subject in replies.subjects() {
                inner.subjects.remove(subject.as_str());
            }
        }
    }

    /// Sends `heartbeat` to every live request that sent nothing for
    /// `quiet`.
    pub(crate) fn send_heartbeats(&self, quiet: Duration) {
        let due: Vec<(String, Replies)> = lock(&self.inner)
            .requests
            .iter()
            .filter(|(_, replies)| replies.idle_for() >= quiet)
            .map(|(id, replies)| (id.clone(), replies.clone()))
            .collect();
        for (build_id, replies) in due {
            replies.send(&build_id, Event::Heartbeat);
        }
    }
}
