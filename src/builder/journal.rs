//! The journal of accepted requests: what a restart needs to pick them up
//! again, under the same build ids, at the same pinned rev, without
//! building again the hosts that already finished.
//!
//! One JSON record per line, appended and fsynced before the event it
//! stands for is sent (`accepted` is sent only once the request is on
//! disk). When a request ends it is dropped by rewriting the file with the
//! live requests only (write, fsync, rename), so the file stays as small as
//! the queue. An append that fails part-way (a full disk) is cut back, so
//! the next record starts on a line of its own. A line that does not parse
//! — a torn last write after a crash, or damage — is reported and skipped;
//! it never stops the builder.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::request::{Job, Resume};
use crate::atomic_file;
use crate::protocol::{HostSummary, SkippedHost};
use crate::sync::lock;

/// Why the journal could not be written.
#[derive(Debug, Error)]
#[error("journal {path}: {source}")]
pub(crate) struct JournalError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub(crate) enum Record {
    /// A request was accepted (before `accepted` is sent).
    Accepted(AcceptedRequest),
    /// Another requester joined it (coalesced).
    Joined { build_id: String, reply: String },
    /// It started: the flake is pinned at `rev`, the hosts are resolved.
    Started {
        build_id: String,
        rev: Option<String>,
        hosts: Vec<String>,
        #[serde(default)]
        skipped: Vec<SkippedHost>,
    },
    /// One of its hosts finished.
    Host {
        build_id: String,
        summary: HostSummary,
    },
    /// Its terminal event was sent: it is over.
    Ended { build_id: String },
}

impl Record {
    fn build_id(&self) -> &str {
        match self {
            Self::Accepted(request) => &request.build_id,
            Self::Joined { build_id, .. }
            | Self::Started { build_id, .. }
            | Self::Host { build_id, .. }
            | Self::Ended { build_id } => build_id,
        }
    }
}

/// Everything about an accepted request that its run needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AcceptedRequest {
    pub(crate) build_id: String,
    pub(crate) repo: String,
    pub(crate) target: String,
    #[serde(rename = "ref")]
    pub(crate) git_ref: Option<String>,
    pub(crate) rev: Option<String>,
    pub(crate) logs: bool,
    pub(crate) owner: Option<String>,
    /// Reply subjects of its requesters.
    pub(crate) replies: Vec<String>,
    /// Unix time it arrived, in seconds.
    pub(crate) received_at: u64,
}

impl AcceptedRequest {
    /// The record of `job`, as accepted.
    pub(crate) fn of(job: &Job) -> Self {
        Self {
            build_id: job.build_id.clone(),
            repo: job.repo.clone(),
            target: job.target.to_string(),
            git_ref: job.git_ref.clone(),
            rev: job.rev.clone(),
            logs: job.logs,
            owner: job.owner.clone(),
            replies: job
                .replies
                .subjects()
                .iter()
                .map(ToString::to_string)
                .collect(),
            received_at: job
                .received_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        }
    }

    /// When it arrived.
    pub(crate) fn received_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.received_at)
    }
}

/// A request found in the journal at start, to be run again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unfinished {
    pub(crate) request: AcceptedRequest,
    /// Set once it had started: the rev it was pinned at, its hosts and the
    /// hosts it skipped.
    pub(crate) started: Option<(Option<String>, Vec<String>, Vec<SkippedHost>)>,
    /// Hosts that had finished, in order.
    pub(crate) done: Vec<HostSummary>,
}

impl Unfinished {
    /// The rev to build at: the one it was pinned at, else the requested.
    pub(crate) fn rev(&self) -> Option<String> {
        match &self.started {
            Some((Some(rev), _, _)) => Some(rev.clone()),
            _ => self.request.rev.clone(),
        }
    }

    /// What its run needs to know of what happened before.
    pub(crate) fn resume(&self) -> Resume {
        Resume {
            rev: self.rev(),
            started: self
                .started
                .as_ref()
                .map(|(_, hosts, skipped)| (hosts.clone(), skipped.clone())),
            done: self.done.clone(),
        }
    }
}

/// The journal if there is one: records go nowhere without.
#[derive(Clone, Default)]
pub(crate) struct Journaling(Option<Arc<Journal>>);

impl Journaling {
    /// Records into `journal`.
    pub(crate) fn to(journal: Arc<Journal>) -> Self {
        Self(Some(journal))
    }

    /// Appends `record` durably; `Ok` without a journal.
    pub(crate) fn record(&self, record: Record) -> Result<(), JournalError> {
        match &self.0 {
            Some(journal) => journal.append(record),
            None => Ok(()),
        }
    }

    /// [`Self::record`] for what can go on without it (a restart then
    /// redoes a little more): a failure is logged.
    pub(crate) fn note(&self, record: Record) {
        if let Err(err) = self.record(record) {
            tracing::error!(%err, "cannot write to the journal; a restart may redo work");
        }
    }

    /// The journal's size in bytes (0 without one).
    pub(crate) fn bytes(&self) -> u64 {
        self.0.as_ref().map_or(0, |journal| journal.bytes())
    }
}

/// What was read back at start.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// Unfinished requests, in the order they were accepted.
    pub(crate) requests: Vec<Unfinished>,
    /// Lines that could not be read.
    pub(crate) skipped: usize,
}

/// The journal file, appended to under a lock.
pub(crate) struct Journal {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    /// The records of live requests, for compaction.
    live: Vec<Record>,
    bytes: u64,
}

impl Journal {
    /// Opens (creating) the journal at `path` and reads back what it holds.
    pub(crate) fn open(path: &Path) -> Result<(Self, Recovered), JournalError> {
        let failed = |source| JournalError {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(atomic_file::directory_of(path)).map_err(failed)?;
        let (records, skipped) = match File::open(path) {
            Ok(file) => read_records(BufReader::new(file)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
            Err(err) => return Err(failed(err)),
        };
        let recovered = Recovered {
            requests: unfinished(&records),
            skipped,
        };
        let live: Vec<Record> = records
            .into_iter()
            .filter(|record| {
                recovered
                    .requests
                    .iter()
                    .any(|r| r.request.build_id == record.build_id())
            })
            .collect();
        // Start from the live records alone: skipped lines and ended
        // requests are gone from here on.
        let bytes = rewrite(path, &live).map_err(failed)?;
        let file = append_handle(path).map_err(failed)?;
        Ok((
            Self {
                path: path.to_owned(),
                inner: Mutex::new(Inner { file, live, bytes }),
            },
            recovered,
        ))
    }

    /// Appends `record` durably (written and fsynced when this returns).
    /// An `ended` record then compacts the journal.
    pub(crate) fn append(&self, record: Record) -> Result<(), JournalError> {
        let failed = |source| JournalError {
            path: self.path.clone(),
            source,
        };
        let mut inner = lock(&self.inner);
        let mut line = serde_json::to_vec(&record).map_err(|err| failed(err.into()))?;
        line.push(b'\n');
        let bytes = inner.bytes;
        // An `ended` line too is appended first: its `finished` may be on
        // the wire already, and a kill from here on must find the request
        // ended (one write, where the compaction below takes a file of
        // its own, an fsync and a rename).
        append_line(&mut inner.file, bytes, &line).map_err(failed)?;
        inner.bytes += line.len() as u64;
        if let Record::Ended { build_id } = &record {
            inner.live.retain(|r| r.build_id() != build_id);
            inner.bytes = rewrite(&self.path, &inner.live).map_err(failed)?;
            inner.file = append_handle(&self.path).map_err(failed)?;
            return Ok(());
        }
        inner.live.push(record);
        Ok(())
    }

    /// The journal's size in bytes.
    pub(crate) fn bytes(&self) -> u64 {
        lock(&self.inner).bytes
    }
}

fn append_handle(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().append(true).create(true).open(path)
}

/// What [`append_line`] needs of the journal file (a test puts faults in).
trait AppendFile: Write {
    fn len(&self) -> std::io::Result<u64>;
    fn cut_to(&mut self, len: u64) -> std::io::Result<()>;
    fn sync(&mut self) -> std::io::Result<()>;
}

impl AppendFile for File {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn cut_to(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_data()
    }
}

/// Appends `line` to `file`, whose whole records end at `len`, and syncs
/// it. A write that fails part-way (a full disk) is cut back to `len`, so
/// the next record starts on a line of its own instead of being glued to
/// half of this one; a cut that failed then is made before the next write.
fn append_line(file: &mut impl AppendFile, len: u64, line: &[u8]) -> std::io::Result<()> {
    if file.len()? > len {
        file.cut_to(len)?;
    }
    let written = file.write_all(line).and_then(|()| file.sync());
    if written.is_err() {
        if let Err(err) = file.cut_to(len) {
            tracing::warn!(%err, "cannot cut a failed journal write back; the next write tries again");
        }
    }
    written
}

/// Replaces the file at `path` with `records` (see [`atomic_file::replace`]).
/// Returns the new size.
fn rewrite(path: &Path, records: &[Record]) -> std::io::Result<u64> {
    let mut bytes = Vec::new();
    for record in records {
        serde_json::to_writer(&mut bytes, record)?;
        bytes.push(b'\n');
    }
    atomic_file::replace(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Every record that parses, and the number of lines that do not.
fn read_records(reader: impl BufRead) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut skipped = 0;
    for line in reader.split(b'\n') {
        let Ok(line) = line else {
            skipped += 1;
            break;
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(record) => records.push(record),
            Err(_) => skipped += 1,
        }
    }
    (records, skipped)
}

/// The requests `records` leave unfinished, in the order they were accepted.
fn unfinished(records: &[Record]) -> Vec<Unfinished> {
    let mut requests: Vec<Unfinished> = Vec::new();
    for record in records {
        let find = |requests: &mut Vec<Unfinished>, id: &str| {
            requests.iter().position(|r| r.request.build_id == id)
        };
        match record {
            Record::Accepted(request) => {
                if find(&mut requests, &request.build_id).is_none() {
                    requests.push(Unfinished {
                        request: request.clone(),
                        started: None,
                        done: Vec::new(),
                    });
                }
            }
            Record::Joined { build_id, reply } => {
                if let Some(i) = find(&mut requests, build_id) {
                    let replies = &mut requests[i].request.replies;
                    if !replies.contains(reply) {
                        replies.push(reply.clone());
                    }
                }
            }
            Record::Started {
                build_id,
                rev,
                hosts,
                skipped,
            } => {
                if let Some(i) = find(&mut requests, build_id) {
                    requests[i].started = Some((rev.clone(), hosts.clone(), skipped.clone()));
                }
            }
            Record::Host { build_id, summary } => {
                if let Some(i) = find(&mut requests, build_id) {
                    let done = &mut requests[i].done;
                    done.retain(|h| h.host != summary.host);
                    done.push(summary.clone());
                }
            }
            Record::Ended { build_id } => {
                requests.retain(|r| r.request.build_id != *build_id);
            }
        }
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The build ids of the requests read back, in order.
    fn build_ids(recovered: &Recovered) -> Vec<&str> {
        recovered
            .requests
            .iter()
            .map(|r| r.request.build_id.as_str())
            .collect()
    }
    use crate::protocol::HostStatus;

    fn accepted(id: &str) -> Record {
        Record::Accepted(AcceptedRequest {
            build_id: id.to_owned(),
            repo: "homelab".to_owned(),
            target: "all".to_owned(),
            git_ref: None,
            rev: None,
            logs: false,
            owner: None,
            replies: vec![format!("build.responses.t.{id}")],
            received_at: 1,
        })
    }

    fn host(id: &str, name: &str) -> Record {
        Record::Host {
            build_id: id.to_owned(),
            summary: HostSummary {
                host: name.to_owned(),
                status: HostStatus::Success,
                duration_ms: 1,
                out_path: Some(format!("/nix/store/x-{name}")),
                cached: false,
                changed_packages: None,
                size_delta: None,
            },
        }
    }

    #[test]
    fn unfinished_requests_come_back_in_order_with_their_progress() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        {
            let (journal, recovered) = Journal::open(&path).unwrap();
            assert!(recovered.requests.is_empty());
            for record in [
                accepted("a"),
                accepted("b"),
                Record::Joined {
                    build_id: "b".into(),
                    reply: "build.responses.u.1".into(),
                },
                accepted("c"),
                Record::Started {
                    build_id: "a".into(),
                    rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
                    hosts: vec!["ns1".into(), "ns2".into()],
                    skipped: Vec::new(),
                },
                host("a", "ns1"),
                Record::Ended {
                    build_id: "c".into(),
                },
            ] {
                journal.append(record).unwrap();
            }
        }
        let (journal, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered.skipped, 0);
        let ids = build_ids(&recovered);
        assert_eq!(ids, ["a", "b"]);
        let a = &recovered.requests[0];
        assert_eq!(
            a.rev().as_deref(),
            Some("609da7ab2bec60c568928f7e8d760a36e14805b0")
        );
        assert_eq!(
            a.resume().started.map(|(hosts, _)| hosts),
            Some(vec!["ns1".to_owned(), "ns2".to_owned()])
        );
        assert_eq!(a.done.len(), 1);
        assert_eq!(
            recovered.requests[1].request.replies,
            ["build.responses.t.b", "build.responses.u.1"]
        );
        // Ending both leaves an empty file.
        journal
            .append(Record::Ended {
                build_id: "a".into(),
            })
            .unwrap();
        journal
            .append(Record::Ended {
                build_id: "b".into(),
            })
            .unwrap();
        assert_eq!(journal.bytes(), 0);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    /// A journal file whose writes stop after `room` more bytes, as on a
    /// full disk.
    struct FullDisk {
        file: File,
        room: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            let n = self.file.write(&buf[..buf.len().min(self.room)])?;
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }

    impl AppendFile for FullDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn cut_to(&mut self, len: u64) -> std::io::Result<()> {
            self.file.cut_to(len)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            self.file.sync()
        }
    }

    #[test]
    fn a_write_cut_short_by_a_full_disk_leaves_no_half_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (journal, _) = Journal::open(&path).unwrap();
        journal.append(accepted("a")).unwrap();
        let before = std::fs::read(&path).unwrap();

        let mut line = serde_json::to_vec(&accepted("b")).unwrap();
        line.push(b'\n');
        let mut full = FullDisk {
            file: append_handle(&path).unwrap(),
            room: line.len() / 2,
        };
        assert!(append_line(&mut full, before.len() as u64, &line).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);

        // The next record starts on a line of its own.
        journal.append(accepted("c")).unwrap();
        let (_, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered.skipped, 0);
        let ids = build_ids(&recovered);
        assert_eq!(ids, ["a", "c"]);
    }

    #[test]
    fn a_half_line_left_by_a_failed_cut_goes_before_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut line = serde_json::to_vec(&accepted("a")).unwrap();
        line.push(b'\n');
        std::fs::write(&path, &line[..line.len() / 2]).unwrap();
        let mut file = append_handle(&path).unwrap();
        append_line(&mut file, 0, &line).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), line);
    }

    #[test]
    fn a_torn_or_damaged_line_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut text = String::new();
        for record in [accepted("a"), accepted("b")] {
            text.push_str(&serde_json::to_string(&record).unwrap());
            text.push('\n');
        }
        text.push_str("garbage in the middle\n");
        text.push_str(&serde_json::to_string(&host("a", "ns1")).unwrap());
        text.push('\n');
        // A write cut short by a crash.
        let torn = serde_json::to_string(&accepted("c")).unwrap();
        text.push_str(&torn[..torn.len() / 2]);
        std::fs::write(&path, text).unwrap();

        let (journal, recovered) = Journal::open(&path).unwrap();
        assert_eq!(recovered.skipped, 2);
        let ids = build_ids(&recovered);
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(recovered.requests[0].done.len(), 1);
        // The damage is gone from the file; appends go on cleanly.
        journal.append(accepted("d")).unwrap();
        let (_, again) = Journal::open(&path).unwrap();
        assert_eq!(again.skipped, 0);
        assert_eq!(again.requests.len(), 3);
    }
}
