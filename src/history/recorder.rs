//! Where the builder's events go besides the requesters: the history
//! database ([`Recorder`], one writer thread behind a bounded queue) and
//! the live feed of `/api/v1/events` ([`EventTap`]).

use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::broadcast;

use super::store::{BuildMeta, HistoryError, Keep, Store};
use super::{HostRecord, RecordStatus};
use crate::protocol::{ErrorBody, Event, Reply, SkippedHost};
use crate::redact::redact;
use crate::sync::lock;

/// History writes waiting at most; beyond it they are dropped, logged and
/// counted (a build never waits for its history).
pub const MAX_WRITES_QUEUED: usize = 4096;
/// Events kept for a slow `/api/v1/events` reader; one that falls further
/// behind skips the oldest.
pub const LIVE_EVENTS_BUFFER: usize = 256;

/// One write to the history.
enum Write {
    Open {
        build_id: String,
        meta: Arc<BuildMeta>,
    },
    Started {
        build_id: String,
        rev: Option<String>,
        skipped: Vec<SkippedHost>,
        at: SystemTime,
    },
    Host {
        build_id: String,
        meta: Arc<BuildMeta>,
        record: Box<HostRecord>,
        at: SystemTime,
    },
    Finished {
        build_id: String,
        meta: Arc<BuildMeta>,
        status: RecordStatus,
        rev: Option<String>,
        error: Option<ErrorBody>,
        duration_ms: u64,
        at: SystemTime,
    },
    /// Answered once everything queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Writes the history on its own thread.
pub struct Recorder {
    writes: Mutex<Option<SyncSender<Write>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    on_failure: Arc<dyn Fn() + Send + Sync>,
}

impl Recorder {
    /// Opens the database at `path` and starts its writer. Builds left
    /// running by an earlier run and not in `resuming` are ended first.
    /// `on_failure` is called for every write that failed or was dropped.
    pub fn start(
        path: &Path,
        keep: Keep,
        resuming: &[String],
        on_failure: impl Fn() + Send + Sync + 'static,
    ) -> Result<Self, HistoryError> {
        let store = Store::open(path)?;
        let now = SystemTime::now();
        let ended = store.end_abandoned(resuming, now)?;
        if ended > 0 {
            tracing::warn!(
                ended,
                "history: builds an earlier run left unfinished are ended"
            );
        }
        store.prune(keep, now)?;
        let on_failure: Arc<dyn Fn() + Send + Sync> = Arc::new(on_failure);
        let (writes, queue) = std::sync::mpsc::sync_channel(MAX_WRITES_QUEUED);
        let thread = std::thread::Builder::new()
            .name("history".to_owned())
            .spawn({
                let on_failure = Arc::clone(&on_failure);
                move || write_all(&store, &queue, keep, on_failure.as_ref())
            })
            .map_err(|err| {
                HistoryError::Sql(rusqlite::Error::ToSqlConversionFailure(Box::new(err)))
            })?;
        Ok(Self {
            writes: Mutex::new(Some(writes)),
            thread: Mutex::new(Some(thread)),
            on_failure,
        })
    }

    fn queue(&self, write: Write) {
        let sent = match lock(&self.writes).as_ref() {
            Some(writes) => writes.try_send(write),
            None => return,
        };
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::warn!(
                    limit = MAX_WRITES_QUEUED,
                    "history: too many writes waiting; one dropped"
                );
                (self.on_failure)();
            }
            Err(TrySendError::Disconnected(_)) => (self.on_failure)(),
        }
    }

    /// Waits (at most `limit`) until everything queued so far is written.
    pub fn flush(&self, limit: Duration) -> bool {
        let (done, wait) = std::sync::mpsc::channel();
        self.queue(Write::Flush(done));
        wait.recv_timeout(limit).is_ok()
    }

    /// Writes what is queued and stops the writer, waiting at most `limit`.
    pub fn close(&self, limit: Duration) {
        let flushed = self.flush(limit);
        lock(&self.writes).take();
        let thread = lock(&self.thread).take();
        if let (true, Some(thread)) = (flushed, thread) {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

fn write_all(
    store: &Store,
    queue: &Receiver<Write>,
    keep: Keep,
    on_failure: &(dyn Fn() + Send + Sync),
) {
    for write in queue {
        let written = match write {
            Write::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Write::Open { build_id, meta } => store.open_build(&build_id, &meta),
            Write::Started {
                build_id,
                rev,
                skipped,
                at,
            } => store.started(&build_id, rev.as_deref(), &skipped, at),
            Write::Host {
                build_id,
                meta,
                record,
                at,
            } => store
                .open_build(&build_id, &meta)
                .and_then(|()| store.host_finished(&build_id, &meta.repo, &record, at)),
            Write::Finished {
                build_id,
                meta,
                status,
                rev,
                error,
                duration_ms,
                at,
            } => store.open_build(&build_id, &meta).and_then(|()| {
                store
                    .finished(
                        &build_id,
                        status,
                        rev.as_deref(),
                        error.as_ref(),
                        duration_ms,
                        at,
                        keep,
                    )
                    .map(|pruned| {
                        if pruned > 0 {
                            tracing::debug!(pruned, "history: pruned builds beyond history_keep");
                        }
                    })
            }),
        };
        if let Err(err) = written {
            tracing::error!(%err, "history: cannot record an event");
            on_failure();
        }
    }
}

/// Sees every event of every accepted build on its way to the requesters:
/// feeds `/api/v1/events` and, with a [`Recorder`], the history.
pub struct EventTap {
    recorder: Option<Recorder>,
    live: broadcast::Sender<Bytes>,
}

impl std::fmt::Debug for EventTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventTap")
            .field("recording", &self.recorder.is_some())
            .finish_non_exhaustive()
    }
}

impl EventTap {
    /// A tap recording into `recorder`, if any.
    pub fn new(recorder: Option<Recorder>) -> Arc<Self> {
        let (live, _) = broadcast::channel(LIVE_EVENTS_BUFFER);
        Arc::new(Self { recorder, live })
    }

    /// Every event from now on, as the masked JSON of its reply.
    pub fn subscribe(&self) -> broadcast::Receiver<Bytes> {
        self.live.subscribe()
    }

    /// The history's writer, if history is kept.
    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    /// Takes one event of the build `meta` describes. Log lines and
    /// refusals are left out: they are no build's history, and a flood of
    /// refused requests must not push builds out of it.
    pub fn observe(&self, meta: &Arc<BuildMeta>, reply: &Reply) {
        let unwatched = self.recorder.is_none() && self.live.receiver_count() == 0;
        if unwatched || matches!(reply.event, Event::Log { .. } | Event::Rejected { .. }) {
            return;
        }
        let Ok(json) = serde_json::to_string(reply) else {
            return;
        };
        // Masked like every reply; what is recorded is what was sent.
        let masked = redact(&json);
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(Bytes::from(masked.clone().into_owned()));
        }
        let Some(recorder) = &self.recorder else {
            return;
        };
        let reply: Reply = match masked {
            std::borrow::Cow::Borrowed(_) => reply.clone(),
            std::borrow::Cow::Owned(text) => match serde_json::from_str(&text) {
                Ok(reply) => reply,
                Err(_) => return,
            },
        };
        if let Some(write) = write_for(meta, reply, SystemTime::now()) {
            recorder.queue(write);
        }
    }
}

/// What the history records of `reply`, if anything.
fn write_for(meta: &Arc<BuildMeta>, reply: Reply, at: SystemTime) -> Option<Write> {
    let build_id = reply.build_id;
    let meta = Arc::clone(meta);
    Some(match reply.event {
        Event::Accepted { .. } | Event::Resumed { .. } => Write::Open { build_id, meta },
        Event::Started { rev, skipped, .. } => Write::Started {
            build_id,
            rev,
            skipped,
            at,
        },
        Event::HostFinished {
            host,
            status,
            duration_ms,
            out_path,
            cached,
            error,
            changes,
            machines,
            closure_size,
        } => Write::Host {
            build_id,
            meta,
            record: Box::new(HostRecord {
                host,
                status,
                duration_ms,
                out_path,
                cached,
                machines,
                closure_size: changes.as_ref().map(|c| c.closure_size).or(closure_size),
                closure_size_delta: changes.as_ref().map(|c| c.closure_size_delta),
                changes,
                error,
                finished_at: crate::protocol::rfc3339(at),
            }),
            at,
        },
        Event::Finished {
            status,
            rev,
            error,
            duration_ms,
            ..
        } => Write::Finished {
            build_id,
            meta,
            status: status.into(),
            rev,
            error,
            duration_ms,
            at,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::protocol::{BuildStatus, ErrorCode, HostStatus};

    const TOKEN_URL: &str = "https://oauth2:glpat-SECRET@git.example/r.git";

    fn meta() -> Arc<BuildMeta> {
        Arc::new(BuildMeta {
            repo: "servers".into(),
            target: "all".into(),
            git_ref: None,
            owner: None,
            accepted_at: SystemTime::now(),
        })
    }

    fn events() -> Vec<Event> {
        vec![
            Event::Accepted {
                builder: None,
                request_digest: None,
                repo: "servers".into(),
                target: "all".into(),
                git_ref: None,
                queue_position: 0,
                heartbeat_ms: 0,
            },
            Event::Started {
                repo: "servers".into(),
                target: "all".into(),
                rev: Some("abcd".into()),
                hosts: vec!["ns1".into()],
                skipped: Vec::new(),
            },
            Event::Log {
                host: "ns1".into(),
                lines: vec![format!("fetching {TOKEN_URL}")],
            },
            Event::HostFinished {
                host: "ns1".into(),
                status: HostStatus::Failed,
                duration_ms: 10,
                out_path: None,
                cached: false,
                error: Some(ErrorBody::new(
                    ErrorCode::FetchFailed,
                    format!("cannot fetch {TOKEN_URL}"),
                )),
                changes: None,
                machines: BTreeMap::new(),
                closure_size: None,
            },
            Event::Finished {
                repo: "servers".into(),
                target: "all".into(),
                rev: Some("abcd".into()),
                status: BuildStatus::Failed,
                duration_ms: 20,
                succeeded: 0,
                failed: 1,
                hosts: Vec::new(),
                skipped: Vec::new(),
                error: None,
                omitted_hosts: 0,
            },
        ]
    }

    #[test]
    fn events_are_recorded_and_streamed_masked_without_log_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let keep = Keep {
            builds: None,
            age: None,
        };
        let recorder = Recorder::start(&path, keep, &[], || {}).unwrap();
        let tap = EventTap::new(Some(recorder));
        let mut live = tap.subscribe();
        let meta = meta();
        for (seq, event) in events().into_iter().enumerate() {
            let mut reply = Reply::new("b1", event);
            reply.seq = Some(seq as u64);
            tap.observe(&meta, &reply);
        }
        let rejected = Reply::new(
            "b2",
            Event::Rejected {
                request_digest: None,
                error: ErrorBody::new(ErrorCode::InvalidRequest, "no"),
            },
        );
        tap.observe(&meta, &rejected);
        assert!(tap.recorder().unwrap().flush(Duration::from_secs(10)));

        let mut streamed = Vec::new();
        while let Ok(event) = live.try_recv() {
            streamed.push(String::from_utf8(event.to_vec()).unwrap());
        }
        let names: Vec<String> = streamed
            .iter()
            .map(|json| {
                serde_json::from_str::<serde_json::Value>(json).unwrap()["event"].to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "\"accepted\"",
                "\"started\"",
                "\"host_finished\"",
                "\"finished\""
            ]
        );
        assert!(
            streamed.iter().all(|json| !json.contains("SECRET")),
            "{streamed:?}"
        );

        let store = Store::open_read_only(&path).unwrap();
        let build = store.build("b1").unwrap().unwrap();
        assert_eq!(build.status, RecordStatus::Failed);
        assert_eq!(build.rev.as_deref(), Some("abcd"));
        let message = &build.hosts[0].error.as_ref().unwrap().message;
        assert!(
            message.contains("cannot fetch") && !message.contains("SECRET"),
            "{message}"
        );
        assert!(store.build("b2").unwrap().is_none());
    }

    #[test]
    fn writes_that_cannot_be_made_are_counted_and_the_build_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&failures);
        let keep = Keep {
            builds: None,
            age: None,
        };
        let recorder = Recorder::start(&path, keep, &[], move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .unwrap();
        // The database goes away under the writer (a full disk, say).
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TABLE hosts; DROP TABLE builds;")
            .unwrap();
        let tap = EventTap::new(Some(recorder));
        for event in events() {
            tap.observe(&meta(), &Reply::new("b1", event));
        }
        assert!(tap.recorder().unwrap().flush(Duration::from_secs(10)));
        assert!(failures.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    }
}
