//! The history database: one SQLite file, two tables (`builds`, and
//! `hosts` for each build's `host_finished`), written by one connection
//! and read by others (WAL, so reading never blocks a write).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use thiserror::Error;

use super::{
    BuildRecord, BuildSummary, HostHistoryEntry, HostRecord, HostState, LatestHost, RecordStatus,
};
use crate::protocol::{ErrorBody, ErrorCode, HostStatus, SkippedHost, rfc3339};

/// The schema this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id TEXT NOT NULL UNIQUE,
    repo TEXT NOT NULL,
    target TEXT NOT NULL,
    git_ref TEXT,
    rev TEXT,
    owner TEXT,
    status TEXT NOT NULL,
    error TEXT,
    skipped TEXT,
    accepted_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    duration_ms INTEGER
);
CREATE INDEX IF NOT EXISTS builds_by_repo ON builds (repo, number);
CREATE INDEX IF NOT EXISTS builds_by_finish ON builds (finished_at);
CREATE TABLE IF NOT EXISTS hosts (
    build_number INTEGER NOT NULL REFERENCES builds (number) ON DELETE CASCADE,
    repo TEXT NOT NULL,
    host TEXT NOT NULL,
    status TEXT NOT NULL,
    duration_ms INTEGER NOT NULL,
    out_path TEXT,
    cached INTEGER NOT NULL,
    machines TEXT NOT NULL,
    closure_size INTEGER,
    closure_size_delta INTEGER,
    changes TEXT,
    error TEXT,
    finished_at INTEGER NOT NULL,
    PRIMARY KEY (build_number, host)
);
CREATE INDEX IF NOT EXISTS hosts_by_name ON hosts (repo, host, build_number);
";

/// Most builds one `GET /api/v1/builds` lists.
pub const MAX_LIST: usize = 500;
/// Builds listed when the query says nothing.
pub const DEFAULT_LIST: usize = 50;

/// Why the history could not be read or written.
#[derive(Debug, Error)]
pub enum HistoryError {
    #[error("history database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error(
        "history database {path} was written by a newer homelab-deploy (schema {found}, this one knows {SCHEMA_VERSION}); leaving it alone"
    )]
    Newer { path: String, found: i64 },
    #[error("history database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("history database: a stored value does not read back: {0}")]
    Json(#[from] serde_json::Error),
}

/// How much history is kept: the newest `builds` finished builds, none
/// older than `age`; `None` on either: no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub builds: Option<usize>,
    pub age: Option<Duration>,
}

/// What `GET /api/v1/builds` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildQuery {
    pub repo: Option<String>,
    /// Builds that built this host.
    pub host: Option<String>,
    pub status: Option<RecordStatus>,
    /// At most this many (capped at [`MAX_LIST`]; default [`DEFAULT_LIST`]).
    pub limit: Option<usize>,
    /// Builds accepted before this one (a page's last build id).
    pub before: Option<String>,
}

/// An accepted build's fixed facts, for its first row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildMeta {
    pub repo: String,
    pub target: String,
    pub git_ref: Option<String>,
    pub owner: Option<String>,
    pub accepted_at: SystemTime,
}

/// A connection to the history database.
pub struct Store {
    connection: Connection,
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
    })
}

fn time_text(millis: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0)))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String, HistoryError> {
    Ok(serde_json::to_string(value)?)
}

fn from_json<T: serde::de::DeserializeOwned>(
    text: Option<String>,
) -> Result<Option<T>, HistoryError> {
    text.map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(HistoryError::from)
}

fn unsigned(value: Option<i64>) -> Option<u64> {
    value.map(|v| u64::try_from(v).unwrap_or(0))
}

fn host_status(text: &str) -> HostStatus {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).unwrap_or(HostStatus::Failed)
}

fn record_status(text: &str) -> RecordStatus {
    RecordStatus::parse(text).unwrap_or(RecordStatus::Failed)
}

impl Store {
    /// Opens (creating it and its schema if need be) the database at
    /// `path` for writing.
    pub fn open(path: &Path) -> Result<Self, HistoryError> {
        let opened = |source| HistoryError::Open {
            path: path.display().to_string(),
            source,
        };
        let connection = Connection::open(path).map_err(opened)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(opened)?;
        let found: i64 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(opened)?;
        if found > SCHEMA_VERSION {
            return Err(HistoryError::Newer {
                path: path.display().to_string(),
                found,
            });
        }
        Self::configure(&connection).map_err(opened)?;
        connection.execute_batch(SCHEMA).map_err(opened)?;
        connection
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(opened)?;
        Ok(Self { connection })
    }

    /// Opens the database at `path` for reading only (it must exist).
    pub fn open_read_only(path: &Path) -> Result<Self, HistoryError> {
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| HistoryError::Open {
            path: path.display().to_string(),
            source,
        })?;
        Self::configure(&connection)?;
        Ok(Self { connection })
    }

    fn configure(connection: &Connection) -> rusqlite::Result<()> {
        // A writer holding the lock a moment (a checkpoint) makes a reader
        // wait rather than fail.
        connection.busy_timeout(Duration::from_secs(5))?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.pragma_update(None, "synchronous", "NORMAL")
    }

    /// Records an accepted build, unless it is recorded already (a
    /// resumed build keeps its first record).
    pub fn open_build(&self, build_id: &str, meta: &BuildMeta) -> Result<(), HistoryError> {
        self.connection.execute(
            "INSERT OR IGNORE INTO builds (build_id, repo, target, git_ref, owner, status, accepted_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)",
            params![
                build_id,
                meta.repo,
                meta.target,
                meta.git_ref,
                meta.owner,
                millis(meta.accepted_at)
            ],
        )?;
        Ok(())
    }

    /// Records `started`: the pinned rev and the skipped hosts.
    pub fn started(
        &self,
        build_id: &str,
        rev: Option<&str>,
        skipped: &[SkippedHost],
        at: SystemTime,
    ) -> Result<(), HistoryError> {
        let skipped = (!skipped.is_empty())
            .then(|| to_json(&skipped))
            .transpose()?;
        self.connection.execute(
            "UPDATE builds SET rev = ?2, skipped = ?3, started_at = COALESCE(started_at, ?4)
             WHERE build_id = ?1",
            params![build_id, rev, skipped, millis(at)],
        )?;
        Ok(())
    }

    /// Records a host's `host_finished`.
    pub fn host_finished(
        &self,
        build_id: &str,
        repo: &str,
        record: &HostRecord,
        at: SystemTime,
    ) -> Result<(), HistoryError> {
        self.connection.execute(
            "INSERT OR REPLACE INTO hosts (build_number, repo, host, status, duration_ms, out_path,
                 cached, machines, closure_size, closure_size_delta, changes, error, finished_at)
             SELECT number, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13
             FROM builds WHERE build_id = ?1",
            params![
                build_id,
                repo,
                record.host,
                record.status.as_str(),
                i64::try_from(record.duration_ms).unwrap_or(i64::MAX),
                record.out_path,
                record.cached,
                to_json(&record.machines)?,
                record
                    .closure_size
                    .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
                record.closure_size_delta,
                record.changes.as_ref().map(to_json).transpose()?,
                record.error.as_ref().map(to_json).transpose()?,
                millis(at),
            ],
        )?;
        Ok(())
    }

    /// Records `finished` and prunes what `keep` no longer keeps; returns
    /// how many builds were pruned.
    #[allow(clippy::too_many_arguments)]
    pub fn finished(
        &self,
        build_id: &str,
        status: RecordStatus,
        rev: Option<&str>,
        error: Option<&ErrorBody>,
        duration_ms: u64,
        at: SystemTime,
        keep: Keep,
    ) -> Result<usize, HistoryError> {
        self.connection.execute(
            "UPDATE builds SET status = ?2, rev = COALESCE(?3, rev), error = ?4,
                 duration_ms = ?5, finished_at = ?6
             WHERE build_id = ?1",
            params![
                build_id,
                status.as_str(),
                rev,
                error.map(to_json).transpose()?,
                i64::try_from(duration_ms).unwrap_or(i64::MAX),
                millis(at)
            ],
        )?;
        self.prune(keep, at)
    }

    /// Deletes finished builds beyond `keep`, as of `now`.
    pub fn prune(&self, keep: Keep, now: SystemTime) -> Result<usize, HistoryError> {
        let mut pruned = 0;
        if let Some(age) = keep.age {
            let cutoff = now.checked_sub(age).map_or(0, millis);
            pruned += self.connection.execute(
                "DELETE FROM builds WHERE finished_at IS NOT NULL AND finished_at < ?1",
                params![cutoff],
            )?;
        }
        if let Some(builds) = keep.builds {
            pruned += self.connection.execute(
                "DELETE FROM builds WHERE finished_at IS NOT NULL AND number NOT IN (
                     SELECT number FROM builds WHERE finished_at IS NOT NULL
                     ORDER BY number DESC LIMIT ?1)",
                params![i64::try_from(builds).unwrap_or(i64::MAX)],
            )?;
        }
        Ok(pruned)
    }

    /// Ends the records of builds left running by an earlier run of the
    /// builder, except those it resumes (`resuming`): they were lost
    /// (a crash without a journal). Returns how many.
    pub fn end_abandoned(
        &self,
        resuming: &[String],
        at: SystemTime,
    ) -> Result<usize, HistoryError> {
        let error = to_json(&ErrorBody::new(
            ErrorCode::ShuttingDown,
            "the builder stopped before it finished this build, and did not resume it",
        ))?;
        let running: Vec<String> = {
            let mut statement = self
                .connection
                .prepare("SELECT build_id FROM builds WHERE status = 'running'")?;
            let ids = statement.query_map([], |row| row.get(0))?;
            ids.collect::<Result<_, _>>()?
        };
        let mut ended = 0;
        for build_id in running.iter().filter(|id| !resuming.contains(id)) {
            ended += self.connection.execute(
                "UPDATE builds SET status = 'cancelled', error = ?2, finished_at = ?3
                 WHERE build_id = ?1",
                params![build_id, error, millis(at)],
            )?;
        }
        Ok(ended)
    }

    /// Builds, newest first, as `query` asks.
    pub fn builds(&self, query: &BuildQuery) -> Result<Vec<BuildSummary>, HistoryError> {
        let limit = query.limit.unwrap_or(DEFAULT_LIST).min(MAX_LIST);
        let before = match &query.before {
            Some(build_id) => match self.number_of(build_id)? {
                Some(number) => number,
                None => return Ok(Vec::new()),
            },
            None => i64::MAX,
        };
        let mut statement = self.connection.prepare_cached(
            "SELECT number, build_id, repo, target, git_ref, rev, status, accepted_at,
                    finished_at, duration_ms
             FROM builds
             WHERE number < ?1
               AND (?2 IS NULL OR repo = ?2)
               AND (?3 IS NULL OR status = ?3)
               AND (?4 IS NULL OR EXISTS (
                    SELECT 1 FROM hosts WHERE build_number = number AND host = ?4))
             ORDER BY number DESC LIMIT ?5",
        )?;
        let rows = statement.query_map(
            params![
                before,
                query.repo,
                query.status.map(RecordStatus::as_str),
                query.host,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    BuildSummary {
                        build_id: row.get(1)?,
                        repo: row.get(2)?,
                        target: row.get(3)?,
                        git_ref: row.get(4)?,
                        rev: row.get(5)?,
                        status: record_status(&row.get::<_, String>(6)?),
                        accepted_at: time_text(row.get(7)?),
                        finished_at: row.get::<_, Option<i64>>(8)?.map(time_text),
                        duration_ms: unsigned(row.get(9)?),
                        hosts: Vec::new(),
                    },
                ))
            },
        )?;
        let mut builds = Vec::new();
        for row in rows {
            let (number, mut build) = row?;
            build.hosts = self.host_states(number)?;
            builds.push(build);
        }
        Ok(builds)
    }

    fn number_of(&self, build_id: &str) -> Result<Option<i64>, HistoryError> {
        Ok(self
            .connection
            .query_row(
                "SELECT number FROM builds WHERE build_id = ?1",
                params![build_id],
                |row| row.get(0),
            )
            .optional()?)
    }

    fn host_states(&self, number: i64) -> Result<Vec<HostState>, HistoryError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT host, status FROM hosts WHERE build_number = ?1 ORDER BY finished_at, rowid",
        )?;
        let rows = statement.query_map(params![number], |row| {
            Ok(HostState {
                host: row.get(0)?,
                status: host_status(&row.get::<_, String>(1)?),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One build with every host, if recorded.
    pub fn build(&self, build_id: &str) -> Result<Option<BuildRecord>, HistoryError> {
        let found = self
            .connection
            .query_row(
                "SELECT number, build_id, repo, target, git_ref, rev, owner, status, error,
                        accepted_at, started_at, finished_at, duration_ms, skipped
                 FROM builds WHERE build_id = ?1",
                params![build_id],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Option<String>>(8)?,
                        row.get::<_, Option<String>>(13)?,
                        BuildRecord {
                            build_id: row.get(1)?,
                            repo: row.get(2)?,
                            target: row.get(3)?,
                            git_ref: row.get(4)?,
                            rev: row.get(5)?,
                            owner: row.get(6)?,
                            status: record_status(&row.get::<_, String>(7)?),
                            error: None,
                            accepted_at: time_text(row.get(9)?),
                            started_at: row.get::<_, Option<i64>>(10)?.map(time_text),
                            finished_at: row.get::<_, Option<i64>>(11)?.map(time_text),
                            duration_ms: unsigned(row.get(12)?),
                            hosts: Vec::new(),
                            skipped: Vec::new(),
                        },
                    ))
                },
            )
            .optional()?;
        let Some((number, error, skipped, mut record)) = found else {
            return Ok(None);
        };
        record.error = from_json(error)?;
        record.skipped = from_json(skipped)?.unwrap_or_default();
        let mut statement = self.connection.prepare_cached(
            "SELECT host, status, duration_ms, out_path, cached, machines, closure_size,
                    closure_size_delta, changes, error, finished_at
             FROM hosts WHERE build_number = ?1 ORDER BY finished_at, rowid",
        )?;
        let rows = statement.query_map(params![number], RawHost::read)?;
        for raw in rows {
            record.hosts.push(raw?.into_record()?);
        }
        Ok(Some(record))
    }

    /// A host's builds, newest first, at most `limit`.
    pub fn host_history(
        &self,
        repo: &str,
        host: &str,
        limit: usize,
    ) -> Result<Vec<HostHistoryEntry>, HistoryError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT b.build_id, b.rev, h.status, h.finished_at, h.duration_ms, h.out_path,
                    h.closure_size, h.changes, h.error
             FROM hosts h JOIN builds b ON b.number = h.build_number
             WHERE h.repo = ?1 AND h.host = ?2
             ORDER BY h.build_number DESC LIMIT ?3",
        )?;
        let rows = statement.query_map(
            params![repo, host, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| {
                Ok((
                    HostHistoryEntry {
                        build_id: row.get(0)?,
                        rev: row.get(1)?,
                        status: host_status(&row.get::<_, String>(2)?),
                        finished_at: time_text(row.get(3)?),
                        duration_ms: unsigned(row.get(4)?).unwrap_or(0),
                        out_path: row.get(5)?,
                        closure_size: unsigned(row.get(6)?),
                        changes: None,
                        error: None,
                    },
                    row.get::<_, Option<String>>(7)?,
                    row.get::<_, Option<String>>(8)?,
                ))
            },
        )?;
        let mut entries = Vec::new();
        for row in rows {
            let (mut entry, changes, error) = row?;
            entry.changes = from_json(changes)?;
            entry.error = from_json(error)?;
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Every host's newest recorded result, by repo and host name.
    pub fn latest_hosts(&self) -> Result<Vec<LatestHost>, HistoryError> {
        let mut statement = self.connection.prepare_cached(
            "SELECT h.repo, h.host, h.status, h.finished_at, b.rev, b.build_id, h.closure_size,
                    h.changes
             FROM hosts h JOIN builds b ON b.number = h.build_number
             WHERE h.build_number = (
                 SELECT max(build_number) FROM hosts l WHERE l.repo = h.repo AND l.host = h.host)
             ORDER BY h.repo, h.host",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                LatestHost {
                    repo: row.get(0)?,
                    host: row.get(1)?,
                    status: host_status(&row.get::<_, String>(2)?),
                    finished_at: time_text(row.get(3)?),
                    rev: row.get(4)?,
                    build_id: Some(row.get(5)?),
                    closure_size: unsigned(row.get(6)?),
                    changed_packages: None,
                },
                row.get::<_, Option<String>>(7)?,
            ))
        })?;
        let mut latest = Vec::new();
        for row in rows {
            let (mut host, changes) = row?;
            let changes: Option<crate::protocol::Changes> = from_json(changes)?;
            host.changed_packages = changes.map(|c| c.changed_packages());
            latest.push(host);
        }
        Ok(latest)
    }
}

/// A `hosts` row as read, before its JSON columns are decoded.
struct RawHost {
    host: String,
    status: String,
    duration_ms: Option<i64>,
    out_path: Option<String>,
    cached: bool,
    machines: String,
    closure_size: Option<i64>,
    closure_size_delta: Option<i64>,
    changes: Option<String>,
    error: Option<String>,
    finished_at: i64,
}

impl RawHost {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            host: row.get(0)?,
            status: row.get(1)?,
            duration_ms: row.get(2)?,
            out_path: row.get(3)?,
            cached: row.get(4)?,
            machines: row.get(5)?,
            closure_size: row.get(6)?,
            closure_size_delta: row.get(7)?,
            changes: row.get(8)?,
            error: row.get(9)?,
            finished_at: row.get(10)?,
        })
    }

    fn into_record(self) -> Result<HostRecord, HistoryError> {
        Ok(HostRecord {
            host: self.host,
            status: host_status(&self.status),
            duration_ms: unsigned(self.duration_ms).unwrap_or(0),
            out_path: self.out_path,
            cached: self.cached,
            machines: serde_json::from_str(&self.machines)?,
            closure_size: unsigned(self.closure_size),
            closure_size_delta: self.closure_size_delta,
            changes: from_json(self.changes)?,
            error: from_json(self.error)?,
            finished_at: time_text(self.finished_at),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::protocol::{Against, ChangedPackage, Changes, Rebuilt};

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn meta(repo: &str, seconds: u64) -> BuildMeta {
        BuildMeta {
            repo: repo.into(),
            target: "all".into(),
            git_ref: Some("master".into()),
            owner: Some("UOWNER".into()),
            accepted_at: at(seconds),
        }
    }

    fn host(name: &str, status: HostStatus, size: Option<u64>) -> HostRecord {
        HostRecord {
            host: name.into(),
            status,
            duration_ms: 1500,
            out_path: Some(format!("/nix/store/aaaa-{name}")),
            cached: false,
            machines: BTreeMap::from([("localhost".to_owned(), 2)]),
            closure_size: size,
            closure_size_delta: size.map(|_| 4096),
            changes: size.map(|size| Changes {
                against: Against {
                    out_path: "/nix/store/bbbb-old".into(),
                    rev: Some("1111".into()),
                },
                packages: vec![ChangedPackage {
                    name: "openssl".into(),
                    before: vec!["3.0.1".into()],
                    after: vec!["3.0.2".into()],
                    size_delta: 4096,
                }],
                more: 2,
                rebuilt: Rebuilt::default(),
                closure_size: size,
                closure_size_delta: 4096,
            }),
            error: (status != HostStatus::Success)
                .then(|| ErrorBody::new(ErrorCode::BuildFailed, "builder for x failed")),
            finished_at: rfc3339(at(0)),
        }
    }

    /// Records a whole build: accepted at `seconds`, finished a minute later.
    fn record(store: &Store, id: &str, repo: &str, seconds: u64, hosts: &[HostRecord], keep: Keep) {
        store.open_build(id, &meta(repo, seconds)).unwrap();
        store
            .started(id, Some("abcd"), &[], at(seconds + 1))
            .unwrap();
        for h in hosts {
            store.host_finished(id, repo, h, at(seconds + 30)).unwrap();
        }
        let status = if hosts.iter().all(|h| h.status == HostStatus::Success) {
            RecordStatus::Success
        } else {
            RecordStatus::Failed
        };
        store
            .finished(
                id,
                status,
                Some("abcd"),
                None,
                60_000,
                at(seconds + 60),
                keep,
            )
            .unwrap();
    }

    const KEEP_ALL: Keep = Keep {
        builds: None,
        age: None,
    };

    #[test]
    fn a_build_reads_back_as_it_was_recorded_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.sqlite");
        let hosts = [
            host("ns1", HostStatus::Success, Some(1 << 30)),
            host("ns2", HostStatus::Failed, None),
        ];
        record(
            &Store::open(&path).unwrap(),
            "b1",
            "servers",
            0,
            &hosts,
            KEEP_ALL,
        );

        let store = Store::open_read_only(&path).unwrap();
        let build = store.build("b1").unwrap().unwrap();
        assert_eq!(build.status, RecordStatus::Failed);
        assert_eq!(build.owner.as_deref(), Some("UOWNER"));
        assert_eq!(build.git_ref.as_deref(), Some("master"));
        assert_eq!(build.rev.as_deref(), Some("abcd"));
        assert_eq!(build.duration_ms, Some(60_000));
        assert_eq!(build.accepted_at, rfc3339(at(0)));
        assert_eq!(build.finished_at, Some(rfc3339(at(60))));
        let names: Vec<_> = build.hosts.iter().map(|h| h.host.as_str()).collect();
        assert_eq!(names, ["ns1", "ns2"]);
        let mut expected = hosts[0].clone();
        expected.finished_at = rfc3339(at(30));
        assert_eq!(build.hosts[0], expected);
        assert_eq!(
            build.hosts[1].error.as_ref().unwrap().code,
            ErrorCode::BuildFailed
        );
        assert!(store.build("b2").unwrap().is_none());
    }

    #[test]
    fn a_resumed_build_stays_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("h.sqlite")).unwrap();
        store.open_build("b1", &meta("servers", 0)).unwrap();
        store
            .host_finished(
                "b1",
                "servers",
                &host("ns1", HostStatus::Success, None),
                at(5),
            )
            .unwrap();
        // The builder restarted and resumed it.
        store.open_build("b1", &meta("servers", 99)).unwrap();
        store
            .host_finished(
                "b1",
                "servers",
                &host("ns2", HostStatus::Success, None),
                at(9),
            )
            .unwrap();
        store
            .finished(
                "b1",
                RecordStatus::Success,
                None,
                None,
                9000,
                at(10),
                KEEP_ALL,
            )
            .unwrap();
        let builds = store.builds(&BuildQuery::default()).unwrap();
        assert_eq!(builds.len(), 1);
        assert_eq!(builds[0].accepted_at, rfc3339(at(0)));
        assert_eq!(builds[0].hosts.len(), 2);
    }

    #[test]
    fn history_keeps_the_newest_builds_and_none_too_old() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("h.sqlite")).unwrap();
        let keep = Keep {
            builds: Some(3),
            age: None,
        };
        let ok = [host("ns1", HostStatus::Success, Some(10))];
        for n in 0..5u64 {
            record(&store, &format!("b{n}"), "servers", n * 100, &ok, keep);
        }
        // One still running does not count and is never pruned.
        store.open_build("running", &meta("servers", 1)).unwrap();
        let ids = |store: &Store| -> Vec<String> {
            let builds = store.builds(&BuildQuery::default()).unwrap();
            builds.into_iter().map(|b| b.build_id).collect()
        };
        assert_eq!(ids(&store), ["running", "b4", "b3", "b2"]);
        // Hosts go with their build.
        assert_eq!(store.host_history("servers", "ns1", 100).unwrap().len(), 3);

        let by_age = Keep {
            builds: None,
            age: Some(Duration::from_secs(150)),
        };
        // b2 finished at 260, b3 at 360, b4 at 460: as of 500, b2 is too old.
        assert_eq!(store.prune(by_age, at(500)).unwrap(), 1);
        assert_eq!(ids(&store), ["running", "b4", "b3"]);
    }

    #[test]
    fn builds_are_listed_newest_first_with_filters_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("h.sqlite")).unwrap();
        let ok = |name| host(name, HostStatus::Success, Some(10));
        record(
            &store,
            "a1",
            "servers",
            0,
            &[ok("ns1"), ok("ns2")],
            KEEP_ALL,
        );
        record(&store, "a2", "desktop", 100, &[ok("pc")], KEEP_ALL);
        let failed = [host("ns2", HostStatus::Failed, None)];
        record(&store, "a3", "servers", 200, &failed, KEEP_ALL);
        let list = |query: BuildQuery| -> Vec<String> {
            let builds = store.builds(&query).unwrap();
            builds.into_iter().map(|b| b.build_id).collect()
        };
        assert_eq!(list(BuildQuery::default()), ["a3", "a2", "a1"]);
        let servers = BuildQuery {
            repo: Some("servers".into()),
            ..BuildQuery::default()
        };
        assert_eq!(list(servers), ["a3", "a1"]);
        let ns1 = BuildQuery {
            host: Some("ns1".into()),
            ..BuildQuery::default()
        };
        assert_eq!(list(ns1), ["a1"]);
        let failures = BuildQuery {
            status: Some(RecordStatus::Failed),
            ..BuildQuery::default()
        };
        assert_eq!(list(failures), ["a3"]);
        let page = BuildQuery {
            limit: Some(1),
            before: Some("a3".into()),
            ..BuildQuery::default()
        };
        assert_eq!(list(page), ["a2"]);
        let unknown = BuildQuery {
            before: Some("nope".into()),
            ..BuildQuery::default()
        };
        assert!(list(unknown).is_empty());
        let summary = &store.builds(&BuildQuery::default()).unwrap()[2];
        assert_eq!(
            summary.hosts,
            [
                HostState {
                    host: "ns1".into(),
                    status: HostStatus::Success
                },
                HostState {
                    host: "ns2".into(),
                    status: HostStatus::Success
                }
            ]
        );
    }

    #[test]
    fn a_hosts_history_and_latest_result_come_from_its_newest_builds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("h.sqlite")).unwrap();
        record(
            &store,
            "c1",
            "servers",
            0,
            &[host("ns1", HostStatus::Success, Some(100))],
            KEEP_ALL,
        );
        record(
            &store,
            "c2",
            "servers",
            100,
            &[host("ns1", HostStatus::Success, Some(200))],
            KEEP_ALL,
        );
        record(
            &store,
            "c3",
            "servers",
            200,
            &[host("ns1", HostStatus::Failed, None)],
            KEEP_ALL,
        );
        let history = store.host_history("servers", "ns1", 100).unwrap();
        let ids: Vec<_> = history.iter().map(|e| e.build_id.as_str()).collect();
        assert_eq!(ids, ["c3", "c2", "c1"]);
        let sizes: Vec<_> = history.iter().map(|e| e.closure_size).collect();
        assert_eq!(sizes, [None, Some(200), Some(100)]);
        assert_eq!(
            history[1].changes.as_ref().unwrap().packages[0].name,
            "openssl"
        );
        assert_eq!(store.host_history("servers", "ns1", 1).unwrap().len(), 1);
        assert!(store.host_history("desktop", "ns1", 10).unwrap().is_empty());

        let latest = store.latest_hosts().unwrap();
        assert_eq!(latest.len(), 1);
        assert_eq!(latest[0].build_id.as_deref(), Some("c3"));
        assert_eq!(latest[0].status, HostStatus::Failed);
    }

    #[test]
    fn builds_an_earlier_run_left_running_are_ended_unless_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("h.sqlite")).unwrap();
        store.open_build("lost", &meta("servers", 0)).unwrap();
        store.open_build("resumed", &meta("servers", 1)).unwrap();
        assert_eq!(store.end_abandoned(&["resumed".into()], at(9)).unwrap(), 1);
        let lost = store.build("lost").unwrap().unwrap();
        assert_eq!(lost.status, RecordStatus::Cancelled);
        assert_eq!(lost.error.unwrap().code, ErrorCode::ShuttingDown);
        assert_eq!(
            store.build("resumed").unwrap().unwrap().status,
            RecordStatus::Running
        );
    }

    #[test]
    fn a_database_from_a_newer_version_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.sqlite");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = Store::open(&path).err().unwrap();
        assert!(matches!(err, HistoryError::Newer { .. }), "{err}");
    }
}
