//! The builder's TOML configuration: its shape, defaults and validation.
//!
//! `config.example.toml` shows every key; the key names are a contract with
//! the NixOS module and existing deployments, so keys are added, never renamed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::protocol::{RESPONSES_TOKEN, is_valid_name};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach the NATS server.
    pub nats: NatsConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// How builds run.
    #[serde(default)]
    pub builder: BuilderConfig,
    /// Who may do what beyond building (see docs/security.md).
    #[serde(default)]
    pub auth: AuthConfig,
    /// The web pages and JSON API on the metrics listener.
    #[serde(default)]
    pub web: WebConfig,
    /// Repo name (the second subject token) → flake to build.
    pub repos: BTreeMap<String, RepoConfig>,
}

/// `[web]`. Unset keys take their values from `Default`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the status pages (`/`, `/builds/…`, `/hosts/…`, badges) and
    /// the read-only JSON API (`/api/v1/…`) beside `/metrics`. Off unless
    /// turned on: they show repo and host names, revs and build errors to
    /// whoever reaches the port.
    pub enabled: bool,
    /// The address people reach the pages at, told in `build.status` (and
    /// so by `homelab-deploy status`). Unset: `http://<host name>:<port>/`
    /// when the listener takes every address, else the listener's own.
    pub url: Option<String>,
}

impl WebConfig {
    /// The pages' address: [`WebConfig::url`], or one made from `listen`.
    pub fn public_url(&self, listen: SocketAddr) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let host = if listen.ip().is_unspecified() {
            host_name()
        } else {
            match listen.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            }
        };
        format!("http://{host}:{}/", listen.port())
    }
}

/// `[nats]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL, or a list of them (`nats://host:4222`, `tls://host:4222`).
    pub url: ServerUrls,
    /// File holding an NKey user seed (`SU...`); surrounding whitespace is ignored.
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and seed), the alternative to `nkey_seed_file`.
    pub credentials_file: Option<PathBuf>,
    /// The NATS queue group the builder takes build requests in. Builders
    /// in the same group share the requests of the repos they both serve
    /// (each request goes to one of them). Unset: one group per repo,
    /// `homelab-deploy-<repo>`, so builders configured alike share it.
    #[serde(default)]
    pub queue_group: Option<String>,
    /// CA certificate (PEM) to verify a `tls://` server with, instead of the
    /// system's roots. Setting it requires TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients; needs
    /// `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
}

/// `[auth]`: requests signed with a requester's NKey (see docs/security.md).
/// Unset keys take their values from `Default`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// NKey user public keys (`U…`) that may cancel any build, unsigned
    /// ones included. Everyone else may cancel only the builds they signed.
    pub admins: Vec<String>,
    /// Reject build requests that are not signed (`unauthorized`).
    pub require_signed: bool,
    /// NKey user public keys (`U…`) that may request builds at all; the
    /// `admins` may too. Unset: anyone NATS lets publish on `build.>`. Set,
    /// a request must be signed by one of them (others, and unsigned
    /// requests, get `unauthorized`): NATS accounts can mint keys that its
    /// permissions allow, this list cannot be widened from outside.
    pub requesters: Option<Vec<String>>,
}

impl AuthConfig {
    /// Whether the key that signed a build request (`None`: unsigned) may
    /// request builds.
    pub fn may_request(&self, signer: Option<&str>) -> bool {
        match (&self.requesters, signer) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(requesters), Some(key)) => requesters
                .iter()
                .chain(&self.admins)
                .any(|allowed| allowed == key),
        }
    }
}

/// One server URL or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ServerUrls {
    One(String),
    Many(Vec<String>),
}

impl ServerUrls {
    /// The URLs as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(url) => vec![url.clone()],
            Self::Many(urls) => urls.clone(),
        }
    }
}

/// `[metrics]`. Unset keys take their values from `Default`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address the Prometheus endpoint listens on.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 9973)),
        }
    }
}

/// This machine's host name (`localhost` when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Whether `name` may name a builder: 1 to 64 letters, digits, `.`, `_`
/// and `-` (a host name, short or qualified).
fn is_valid_builder_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `[builder]`. Unset keys take their values from `Default`, the one
/// place the defaults are written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuilderConfig {
    /// Requests that may wait behind the running one; more are rejected
    /// with `queue_full`.
    pub queue_limit: usize,
    /// Requests of one owner (the key that signed them; unsigned requests
    /// count as one owner) that may wait at once; more are rejected with
    /// `queue_full`. Waiting requests are served round robin between
    /// owners.
    pub queue_per_owner: usize,
    /// Wall-clock limit for a host's evaluation and, separately, its build,
    /// e.g. `"2h"`; listing a flake's hosts gets one too.
    #[serde(with = "humantime_serde")]
    pub host_timeout: Duration,
    /// Wall-clock limit for fetching and pinning a flake (`nix flake
    /// metadata`), e.g. `"10m"`: a hung fetch does not hold the queue for
    /// a whole `host_timeout`.
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// How often a building host reports progress when Nix itself is quiet.
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// A host build that prints nothing for this long is killed and
    /// reported as `timeout`, e.g. `"1h"`. Unset: no limit.
    #[serde(with = "humantime_serde")]
    pub max_silent_time: Option<Duration>,
    /// Where derivations and outputs are rooted so the garbage collector
    /// keeps them: the default ref's results as `<dir>/<repo>/<host>`, other
    /// refs' under `<dir>/<repo>/.refs/`, requests' own under
    /// `<dir>/.requests/` (see `builder::roots`). Without it nothing is
    /// rooted and builds use `--no-link`.
    pub gc_roots_dir: Option<PathBuf>,
    /// Generations of each host's root kept for the repo's default ref (the
    /// newest included); older ones are removed so the collector can
    /// reclaim them. Builds of other refs never remove these.
    pub keep_roots: usize,
    /// How long the roots (and the results in `build.status`) of a ref
    /// other than the default, or of an explicit `rev`, are kept after its
    /// last build, e.g. `"7d"`.
    #[serde(with = "humantime_serde")]
    pub side_roots_ttl: Duration,
    /// Side lineages (other refs and explicit revs) whose roots are kept
    /// per repo at most; a new one past it evicts the oldest by last build,
    /// before their `side_roots_ttl`.
    pub side_roots_max: usize,
    /// Nix evaluator processes that evaluate a request's hosts ahead of the
    /// builds, in parallel. Default: half the CPUs, at least 1.
    pub eval_workers: usize,
    /// Resident memory after which an evaluator process is replaced by a
    /// fresh one (checked after each host), e.g. `"2GiB"`. Lower means less
    /// memory and more re-evaluation of what hosts share; see docs/performance.md.
    pub eval_max_memory: ByteSize,
    /// Memory all evaluator processes may hold together, e.g. `"6GiB"`,
    /// or a share of the machine's memory, e.g. `"40%"` (the default,
    /// which leaves the rest to builds, the Nix daemon and the cache).
    /// Evaluations wait for room rather than pass it; a host that alone
    /// needs more fails with `eval_out_of_memory`.
    pub eval_memory_budget: MemoryShare,
    /// What a host's evaluation is expected to need before one of its
    /// repo's evaluations was ever measured, e.g. `"2GiB"`. Measured peaks
    /// replace it (kept in `state_file`).
    pub eval_memory_estimate: ByteSize,
    /// File that keeps every host's last result across restarts (so the
    /// last-success metric and `build.status` survive them). Optional.
    pub state_file: Option<PathBuf>,
    /// The journal of accepted requests (in the builder's state directory):
    /// requests running or waiting when the builder stops or crashes are
    /// picked up again when it starts. Unset: nothing is journaled, and a
    /// stop cancels them.
    pub journal_file: Option<PathBuf>,
    /// With a journal, stopping pauses requests (`interrupted`) for the next
    /// start to resume; `false` cancels them as without one (also
    /// `builder --no-resume`).
    pub resume: bool,
    /// The builder's name, in `accepted` and in its status (several
    /// builders may share a NATS server). Unset: the host name.
    pub name: Option<String>,
    /// SQLite database of every accepted request's outcome and every host's
    /// result (for the web pages and the API). Unset: no history.
    pub history_db: Option<PathBuf>,
    /// How much history is kept; pruned as each build is recorded.
    pub history_keep: HistoryKeep,
    /// Hosts of a request built at once. 1 (the default) builds them one
    /// after the other; more pays off only when Nix has remote builders
    /// (its `builders` setting) to take the derivations. Evaluation stays
    /// on this machine either way (see `eval_workers`).
    pub parallel_hosts: usize,
}

impl Default for BuilderConfig {
    fn default() -> Self {
        const MINUTE: u64 = 60;
        const HOUR: u64 = 60 * MINUTE;
        Self {
            queue_limit: 16,
            queue_per_owner: 4,
            host_timeout: Duration::from_secs(2 * HOUR),
            fetch_timeout: Duration::from_secs(10 * MINUTE),
            progress_interval: Duration::from_secs(30),
            max_silent_time: None,
            gc_roots_dir: None,
            keep_roots: 3,
            side_roots_ttl: Duration::from_secs(7 * 24 * HOUR),
            side_roots_max: 32,
            eval_workers: std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            eval_max_memory: ByteSize(2 << 30),
            eval_memory_budget: MemoryShare::OfMachine(40),
            eval_memory_estimate: ByteSize(2 << 30),
            state_file: None,
            journal_file: None,
            resume: true,
            name: None,
            history_db: None,
            history_keep: HistoryKeep::default(),
            parallel_hosts: 1,
        }
    }
}

/// `history_keep = { builds = 1000, age = "90d" }`: the newest `builds`
/// finished builds, none older than `age`. A key left out of a table that
/// is given sets no limit of its kind; without the table both defaults
/// hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryKeep {
    #[serde(default)]
    pub builds: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub age: Option<Duration>,
}

impl Default for HistoryKeep {
    fn default() -> Self {
        Self {
            builds: Some(1000),
            age: Some(Duration::from_secs(90 * 24 * 60 * 60)),
        }
    }
}

impl From<HistoryKeep> for crate::history::Keep {
    fn from(keep: HistoryKeep) -> Self {
        Self {
            builds: keep.builds,
            age: keep.age,
        }
    }
}

impl BuilderConfig {
    /// Durations are added to clocks at run time: past these bounds they
    /// are mistakes (and would overflow), so they are refused up front.
    fn check_bounds(&self) -> Result<(), ConfigError> {
        const DAY: u64 = 24 * 60 * 60;
        let timeouts: [(&'static str, Option<Duration>); 4] = [
            ("host_timeout", Some(self.host_timeout)),
            ("fetch_timeout", Some(self.fetch_timeout)),
            ("progress_interval", Some(self.progress_interval)),
            ("max_silent_time", self.max_silent_time),
        ];
        let bounds = timeouts
            .into_iter()
            .map(|(key, value)| (key, value, Duration::from_secs(7 * DAY), "7d"))
            .chain([(
                "side_roots_ttl",
                Some(self.side_roots_ttl),
                Duration::from_secs(3660 * DAY),
                "10years",
            )]);
        for (key, value, limit, limit_text) in bounds {
            if let Some(value) = value.filter(|v| *v > limit) {
                return Err(ConfigError::TooLong {
                    key,
                    value: humantime::format_duration(value).to_string(),
                    limit: limit_text,
                });
            }
        }
        Ok(())
    }

    /// The builder's name: `name`, or the host name.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(host_name)
    }

    /// The journal, the state file and the history database each own
    /// their file: one path for two would make each overwrite the other.
    fn check_files(&self) -> Result<(), ConfigError> {
        let files = [
            ("journal_file", &self.journal_file),
            ("state_file", &self.state_file),
            ("history_db", &self.history_db),
        ];
        let files: Vec<(&'static str, &PathBuf)> = files
            .into_iter()
            .filter_map(|(key, path)| Some((key, path.as_ref()?)))
            .collect();
        for (i, (first, a)) in files.iter().enumerate() {
            for (second, b) in &files[i + 1..] {
                let same =
                    a == b || matches!((canonical(a), canonical(b)), (Some(x), Some(y)) if x == y);
                if same {
                    return Err(ConfigError::SameFile {
                        first,
                        second,
                        path: (*a).clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// `path` with links and `..` resolved as far as it exists: the file
/// itself, or else its directory (the file is created at the first start).
fn canonical(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path).ok().or_else(|| {
        let dir = std::fs::canonicalize(crate::atomic_file::directory_of(path)).ok()?;
        Some(dir.join(path.file_name()?))
    })
}

/// A size in bytes, written as a number of bytes or with a unit:
/// `"512MiB"`, `"2GiB"`, `"1.5G"` (K/M/G/T are powers of 1024 as well).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"2GiB"`, `"512 MiB"`, `"1.5G"`, `"4096"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size such as \"2GiB\""))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            other => return Err(format!("unknown size unit {other:?} in {text:?}")),
        };
        let bytes = number * multiplier as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{text:?} is larger than any memory"));
        }
        // In range, checked just above; a fraction of a byte is dropped.
        #[allow(clippy::cast_possible_truncation)]
        Ok(Self(bytes as u64))
    }
}

/// A size as the config file writes it: a number of bytes, or text.
#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match SizeValue::deserialize(deserializer)? {
            SizeValue::Bytes(bytes) => Ok(Self(bytes)),
            SizeValue::Text(text) => Self::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = self.0;
        match [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
            .into_iter()
            .find(|(shift, _)| bytes >= 1 << shift && bytes % (1 << shift) == 0)
        {
            Some((shift, unit)) => write!(f, "{}{unit}", bytes >> shift),
            None => write!(f, "{bytes}B"),
        }
    }
}

/// An amount of memory: bytes, or a percentage of the machine's memory
/// (`"40%"`), worked out when the builder starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryShare {
    Bytes(ByteSize),
    /// Percent of the machine's memory, 1 to 100.
    OfMachine(u8),
}

impl MemoryShare {
    /// Parses `"40%"` or a size such as `"6GiB"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim().strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<u8>() {
                Ok(percent @ 1..=100) => Ok(Self::OfMachine(percent)),
                _ => Err(format!("{text:?} is not a share of memory from 1% to 100%")),
            },
            None => ByteSize::parse(text).map(Self::Bytes),
        }
    }

    /// The bytes this is on a machine with `machine` bytes of memory.
    pub fn bytes(self, machine: u64) -> u64 {
        match self {
            Self::Bytes(size) => size.0,
            Self::OfMachine(percent) => machine / 100 * u64::from(percent),
        }
    }
}

impl<'de> Deserialize<'de> for MemoryShare {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match SizeValue::deserialize(deserializer)? {
            SizeValue::Bytes(bytes) => Ok(Self::Bytes(ByteSize(bytes))),
            SizeValue::Text(text) => Self::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for MemoryShare {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Bytes(size) => size.serialize(serializer),
            Self::OfMachine(percent) => serializer.collect_str(&format_args!("{percent}%")),
        }
    }
}

/// `[repos.<name>]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Flake URL without a ref or rev, e.g. `git+https://host/owner/repo.git`.
    pub url: String,
    /// Branch or tag built when a request names none; without it, the
    /// remote's default branch.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// Hosts that target `all` skips (they can still be built by name).
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// Everything that can be wrong with a configuration file.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("[nats] url is empty: give a server URL such as \"nats://nats.example:4222\"")]
    NoNatsUrl,
    #[error("[nats] url {url:?} is not a NATS server URL (nats://, tls://, ws:// or wss://)")]
    BadNatsUrl { url: String },
    #[error("[nats] sets both nkey_seed_file and credentials_file: keep one of them")]
    ConflictingNatsAuth,
    #[error("[nats] tls_cert_file and tls_key_file go together: set both or neither")]
    IncompleteClientCert,
    #[error("no [repos.<name>] tables: configure at least one flake to build")]
    NoRepos,
    #[error("repo name {name:?} is not allowed: use letters, digits, '-' and '_' only")]
    BadRepoName { name: String },
    #[error("repo name \"responses\" is reserved for reply subjects (build.responses.>)")]
    ReservedRepoName,
    #[error("[repos.{repo}] url {url:?}: {reason}")]
    BadRepoUrl {
        repo: String,
        url: String,
        reason: &'static str,
    },
    #[error("[repos.{repo}] ref: {reason}")]
    BadRepoRef { repo: String, reason: String },
    #[error(
        "[repos.{repo}] exclude: {host:?} is not a host name (empty, control characters or over 128 bytes)"
    )]
    BadExclude { repo: String, host: String },
    #[error("{key} = {value:?}: use 1 to 64 letters, digits, '.', '_' and '-'")]
    BadName { key: &'static str, value: String },
    #[error("[builder] {key} must be greater than zero")]
    Zero { key: &'static str },
    #[error("[builder] {key} = {value:?} is longer than the limit of {limit:?}")]
    TooLong {
        key: &'static str,
        value: String,
        limit: &'static str,
    },
    #[error(
        "[builder] {first} and {second} are the same file ({path}): give each a path of its own"
    )]
    SameFile {
        first: &'static str,
        second: &'static str,
        path: PathBuf,
    },
    #[error("[auth] admins: {0}")]
    BadAdminKey(#[from] crate::signing::BadPublicKey),
    #[error("[auth] requesters: {0}")]
    BadRequesterKey(crate::signing::BadPublicKey),
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let urls = self.nats.url.to_vec();
        if urls.is_empty() {
            return Err(ConfigError::NoNatsUrl);
        }
        for url in urls {
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|scheme| url.starts_with(scheme));
            if !scheme_ok || url.chars().any(char::is_whitespace) {
                return Err(ConfigError::BadNatsUrl { url });
            }
        }
        if self.nats.nkey_seed_file.is_some() && self.nats.credentials_file.is_some() {
            return Err(ConfigError::ConflictingNatsAuth);
        }
        if self.nats.tls_cert_file.is_some() != self.nats.tls_key_file.is_some() {
            return Err(ConfigError::IncompleteClientCert);
        }
        if self.builder.queue_limit == 0 {
            return Err(ConfigError::Zero { key: "queue_limit" });
        }
        if let Some(name) = &self.builder.name {
            if !is_valid_builder_name(name) {
                return Err(ConfigError::BadName {
                    key: "[builder] name",
                    value: name.clone(),
                });
            }
        }
        if let Some(group) = &self.nats.queue_group {
            if !is_valid_builder_name(group) {
                return Err(ConfigError::BadName {
                    key: "[nats] queue_group",
                    value: group.clone(),
                });
            }
        }
        if self.builder.history_keep.builds == Some(0) {
            return Err(ConfigError::Zero {
                key: "history_keep.builds",
            });
        }
        if self.builder.queue_per_owner == 0 {
            return Err(ConfigError::Zero {
                key: "queue_per_owner",
            });
        }
        if self.builder.host_timeout.is_zero() {
            return Err(ConfigError::Zero {
                key: "host_timeout",
            });
        }
        if self.builder.max_silent_time.is_some_and(|t| t.is_zero()) {
            return Err(ConfigError::Zero {
                key: "max_silent_time",
            });
        }
        if self.builder.keep_roots == 0 {
            return Err(ConfigError::Zero { key: "keep_roots" });
        }
        if self.builder.eval_workers == 0 {
            return Err(ConfigError::Zero {
                key: "eval_workers",
            });
        }
        if self.builder.parallel_hosts == 0 {
            return Err(ConfigError::Zero {
                key: "parallel_hosts",
            });
        }
        if self.builder.eval_memory_budget == MemoryShare::Bytes(ByteSize(0)) {
            return Err(ConfigError::Zero {
                key: "eval_memory_budget",
            });
        }
        if self.builder.eval_memory_estimate.0 == 0 {
            return Err(ConfigError::Zero {
                key: "eval_memory_estimate",
            });
        }
        if self.builder.eval_max_memory.0 == 0 {
            return Err(ConfigError::Zero {
                key: "eval_max_memory",
            });
        }
        if self.builder.progress_interval.is_zero() {
            return Err(ConfigError::Zero {
                key: "progress_interval",
            });
        }
        if self.builder.fetch_timeout.is_zero() {
            return Err(ConfigError::Zero {
                key: "fetch_timeout",
            });
        }
        if self.builder.side_roots_ttl.is_zero() {
            return Err(ConfigError::Zero {
                key: "side_roots_ttl",
            });
        }
        if self.builder.side_roots_max == 0 {
            return Err(ConfigError::Zero {
                key: "side_roots_max",
            });
        }
        self.builder.check_bounds()?;
        self.builder.check_files()?;
        for admin in &self.auth.admins {
            crate::signing::parse_user_key(admin)?;
        }
        for requester in self.auth.requesters.iter().flatten() {
            crate::signing::parse_user_key(requester).map_err(ConfigError::BadRequesterKey)?;
        }
        if self.repos.is_empty() {
            return Err(ConfigError::NoRepos);
        }
        for (name, repo) in &self.repos {
            if name == RESPONSES_TOKEN {
                return Err(ConfigError::ReservedRepoName);
            }
            if !is_valid_name(name) {
                return Err(ConfigError::BadRepoName { name: name.clone() });
            }
            repo.validate(name)?;
        }
        Ok(())
    }
}

impl RepoConfig {
    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let bad_url = |reason| ConfigError::BadRepoUrl {
            repo: name.to_owned(),
            url: self.url.clone(),
            reason,
        };
        if self.url.is_empty() {
            return Err(bad_url("it is empty"));
        }
        if self
            .url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad_url("it contains whitespace"));
        }
        if self.url.starts_with('-') {
            return Err(bad_url("it starts with '-'"));
        }
        if !self.url.contains(':') {
            return Err(bad_url(
                "it is not a flake URL (expected e.g. git+https://host/repo.git)",
            ));
        }
        if self.url.contains('#') {
            return Err(bad_url(
                "remove the '#...' part; the builder selects nixosConfigurations itself",
            ));
        }
        if let Some((_, query)) = self.url.split_once('?') {
            if query
                .split('&')
                .any(|param| param.starts_with("ref=") || param.starts_with("rev="))
            {
                return Err(bad_url(
                    "put the branch in the repo's `ref` key, not in the URL",
                ));
            }
        }
        if let Some(git_ref) = &self.git_ref {
            crate::protocol::validate_ref(git_ref).map_err(|err| ConfigError::BadRepoRef {
                repo: name.to_owned(),
                reason: err.to_string(),
            })?;
        }
        for host in &self.exclude {
            // Any attribute name may be excluded, the ones `all` could not
            // build included; only what cannot be a name is refused.
            if host.is_empty()
                || host.len() > crate::protocol::MAX_NAME_BYTES
                || host.chars().any(char::is_control)
            {
                return Err(ConfigError::BadExclude {
                    repo: name.to_owned(),
                    host: host.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config.example.toml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
[nats]
url = "nats://127.0.0.1:4222"
[repos.demo]
url = "git+file:///srv/demo"
"#;

    #[test]
    fn the_evaluators_budget_is_a_size_or_a_share_of_the_machine() {
        assert_eq!(MemoryShare::parse("40%"), Ok(MemoryShare::OfMachine(40)));
        assert_eq!(
            MemoryShare::parse("6GiB"),
            Ok(MemoryShare::Bytes(ByteSize(6 << 30)))
        );
        for bad in ["0%", "101%", "-5%", "half"] {
            assert!(MemoryShare::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            MemoryShare::OfMachine(40).bytes(16 << 30),
            (16 << 30) / 100 * 40
        );
        assert_eq!(MemoryShare::Bytes(ByteSize(7)).bytes(16 << 30), 7);
        let config = parse(&format!(
            "{MINIMAL}[builder]\neval_memory_budget = \"25%\"\neval_memory_estimate = \"1GiB\"\n"
        ))
        .unwrap();
        assert_eq!(
            config.builder.eval_memory_budget,
            MemoryShare::OfMachine(25)
        );
        assert_eq!(config.builder.eval_memory_estimate, ByteSize(1 << 30));
        let zero = parse(&format!("{MINIMAL}[builder]\neval_memory_budget = \"0\"\n"));
        assert!(zero.is_err());
        assert_eq!(
            serde_json::to_value(MemoryShare::OfMachine(40)).unwrap(),
            "40%"
        );
    }

    #[test]
    fn listed_requesters_and_admins_may_request_and_nobody_else() {
        let open = AuthConfig::default();
        assert!(open.may_request(None) && open.may_request(Some("UANY")));
        let listed = AuthConfig {
            admins: vec!["UADMIN".into()],
            requesters: Some(vec!["UCI".into()]),
            ..AuthConfig::default()
        };
        assert!(listed.may_request(Some("UCI")));
        assert!(listed.may_request(Some("UADMIN")));
        assert!(!listed.may_request(Some("UMINTED")));
        assert!(!listed.may_request(None), "unsigned requests name no key");
    }

    #[test]
    fn the_example_config_is_valid() {
        let config = parse(EXAMPLE).unwrap();
        assert_eq!(config.builder.queue_limit, 16);
        assert_eq!(config.builder.eval_workers, 4);
        assert_eq!(config.builder.host_timeout, Duration::from_secs(7200));
        assert_eq!(config.metrics.listen.port(), 9973);
        assert_eq!(
            config.repos["nixos-servers"].exclude,
            vec!["template".to_string()]
        );
        assert_eq!(
            config.repos["nixos-servers"].git_ref.as_deref(),
            Some("master")
        );
    }

    #[test]
    fn defaults_fill_optional_sections() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.builder.queue_limit, 16);
        assert_eq!(config.builder.progress_interval, Duration::from_secs(30));
        assert_eq!(config.metrics.listen.to_string(), "0.0.0.0:9973");
        assert!(config.builder.gc_roots_dir.is_none());
        assert!(config.repos["demo"].git_ref.is_none());
    }

    #[test]
    fn left_out_keys_take_the_default_values() {
        fn json(value: &impl Serialize) -> serde_json::Value {
            serde_json::to_value(value).unwrap()
        }
        for text in [
            MINIMAL.to_owned(),
            MINIMAL.replace("[repos.demo]", "[metrics]\n[builder]\n[auth]\n[repos.demo]"),
        ] {
            let config = parse(&text).unwrap();
            assert_eq!(json(&config.metrics), json(&MetricsConfig::default()));
            assert_eq!(json(&config.builder), json(&BuilderConfig::default()));
            assert_eq!(json(&config.auth), json(&AuthConfig::default()));
        }
    }

    #[test]
    fn url_may_be_a_list() {
        let text = MINIMAL.replace(
            r#"url = "nats://127.0.0.1:4222""#,
            r#"url = ["nats://a:4222", "tls://b:4222"]"#,
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.nats.url.to_vec().len(), 2);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let text = format!("{MINIMAL}\nqueue_lmit = 3\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("queue_lmit"), "{err}");
        let text = MINIMAL.replace("[repos.demo]", "[builder]\nqueue_lmit = 3\n[repos.demo]");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("queue_lmit"), "{err}");
    }

    #[test]
    fn bad_durations_are_reported() {
        let text = MINIMAL.replace(
            "[repos.demo]",
            "[builder]\nhost_timeout = \"soon\"\n[repos.demo]",
        );
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn eval_settings_have_defaults_and_accept_sizes() {
        let config = parse(MINIMAL).unwrap();
        assert!(config.builder.eval_workers >= 1);
        assert_eq!(config.builder.eval_max_memory, ByteSize(2 << 30));
        let text = MINIMAL.replace(
            "[repos.demo]",
            "[builder]\neval_workers = 3\neval_max_memory = \"512MiB\"\n[repos.demo]",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.builder.eval_workers, 3);
        assert_eq!(config.builder.eval_max_memory, ByteSize(512 << 20));
        let text = MINIMAL.replace(
            "[repos.demo]",
            "[builder]\neval_max_memory = \"lots\"\n[repos.demo]",
        );
        assert!(matches!(parse(&text), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(ByteSize::parse("4096"), Ok(ByteSize(4096)));
        assert_eq!(ByteSize::parse("2GiB"), Ok(ByteSize(2 << 30)));
        assert_eq!(ByteSize::parse("1.5G"), Ok(ByteSize(3 << 29)));
        assert_eq!(ByteSize::parse("512 MiB"), Ok(ByteSize(512 << 20)));
        assert_eq!(ByteSize::parse("64k"), Ok(ByteSize(64 << 10)));
        assert!(ByteSize::parse("2 parsecs").is_err());
        assert!(ByteSize::parse("").is_err());
        assert_eq!(ByteSize(2 << 30).to_string(), "2GiB");
        assert_eq!(ByteSize(512 << 20).to_string(), "512MiB");
    }

    #[test]
    fn responses_is_reserved() {
        let text = MINIMAL.replace("[repos.demo]", "[repos.responses]");
        assert!(matches!(parse(&text), Err(ConfigError::ReservedRepoName)));
    }

    #[test]
    fn repo_names_are_checked() {
        let text = MINIMAL.replace("[repos.demo]", "[repos.\"a.b\"]");
        assert!(matches!(parse(&text), Err(ConfigError::BadRepoName { .. })));
    }

    #[test]
    fn repo_urls_are_checked() {
        for url in [
            "",
            "no-scheme",
            "git+file:///x#nixosConfigurations",
            "git+file:///x?ref=main",
            "git+file:///x?dir=a&rev=abc",
            "-x:y",
            "git+file:///a b",
        ] {
            let text = MINIMAL.replace("git+file:///srv/demo", url);
            assert!(
                matches!(parse(&text), Err(ConfigError::BadRepoUrl { .. })),
                "{url}"
            );
        }
        let text = MINIMAL.replace("git+file:///srv/demo", "git+file:///srv/demo?dir=sub");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn refs_and_excludes_are_checked() {
        let text = format!("{MINIMAL}ref = \"a..b\"\n");
        assert!(matches!(parse(&text), Err(ConfigError::BadRepoRef { .. })));
        let text = format!("{MINIMAL}exclude = [\"ok\", \"\"]\n");
        assert!(matches!(parse(&text), Err(ConfigError::BadExclude { .. })));
        // A host `all` cannot build may be excluded.
        let text = format!("{MINIMAL}exclude = [\"nix-cache02.home\"]\n");
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn both_auth_files_conflict() {
        let text = MINIMAL.replace(
            "[repos.demo]",
            "nkey_seed_file = \"/a\"\ncredentials_file = \"/b\"\n[repos.demo]",
        );
        assert!(matches!(
            parse(&text),
            Err(ConfigError::ConflictingNatsAuth)
        ));
    }

    #[test]
    fn nats_urls_are_checked() {
        let text = MINIMAL.replace("nats://127.0.0.1:4222", "http://x");
        assert!(matches!(parse(&text), Err(ConfigError::BadNatsUrl { .. })));
        let text = MINIMAL.replace("\"nats://127.0.0.1:4222\"", "[]");
        assert!(matches!(parse(&text), Err(ConfigError::NoNatsUrl)));
    }

    #[test]
    fn zero_limits_are_errors() {
        let text = MINIMAL.replace("[repos.demo]", "[builder]\nqueue_limit = 0\n[repos.demo]");
        assert!(matches!(parse(&text), Err(ConfigError::Zero { .. })));
    }

    #[test]
    fn tls_client_certificates_need_both_files() {
        let text = MINIMAL.replace("[repos.demo]", "tls_cert_file = \"/c.pem\"\n[repos.demo]");
        assert!(matches!(
            parse(&text),
            Err(ConfigError::IncompleteClientCert)
        ));
        let text = MINIMAL.replace(
            "[repos.demo]",
            "tls_ca_file = \"/ca.pem\"\ntls_cert_file = \"/c.pem\"\ntls_key_file = \"/k.pem\"\n[repos.demo]",
        );
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn max_silent_time_is_optional() {
        assert_eq!(parse(MINIMAL).unwrap().builder.max_silent_time, None);
        let text = MINIMAL.replace(
            "[repos.demo]",
            "[builder]\nmax_silent_time = \"45m\"\n[repos.demo]",
        );
        assert_eq!(
            parse(&text).unwrap().builder.max_silent_time,
            Some(Duration::from_secs(45 * 60))
        );
    }

    #[test]
    fn durations_past_any_sensible_bound_are_refused() {
        for (key, value) in [
            ("host_timeout", "300000000000y"),
            ("fetch_timeout", "8d"),
            ("progress_interval", "30d"),
            ("max_silent_time", "1y"),
            ("side_roots_ttl", "300000000000y"),
        ] {
            let text = MINIMAL.replace(
                "[repos.demo]",
                &format!("[builder]\n{key} = \"{value}\"\n[repos.demo]"),
            );
            let err = parse(&text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::TooLong { key: k, .. } if *k == key),
                "{key}: {err}"
            );
        }
        let text = MINIMAL.replace(
            "[repos.demo]",
            "[builder]\nhost_timeout = \"7d\"\nside_roots_ttl = \"365d\"\n[repos.demo]",
        );
        assert!(parse(&text).is_ok());
    }

    #[test]
    fn fetching_and_side_roots_have_their_own_limits() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.builder.fetch_timeout, Duration::from_secs(600));
        assert_eq!(
            config.builder.side_roots_ttl,
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(config.builder.side_roots_max, 32);
        let text = MINIMAL.replace(
            "[repos.demo]",
            "[builder]\nside_roots_max = 0\n[repos.demo]",
        );
        assert!(matches!(
            parse(&text),
            Err(ConfigError::Zero {
                key: "side_roots_max"
            })
        ));
        let text = MINIMAL.replace(
            "[repos.demo]",
            "[builder]\nfetch_timeout = \"0s\"\n[repos.demo]",
        );
        assert!(matches!(parse(&text), Err(ConfigError::Zero { .. })));
    }

    #[test]
    fn the_journal_and_the_state_file_must_differ() {
        let files = |journal: &str, state: &str| {
            MINIMAL.replace(
                "[repos.demo]",
                &format!(
                    "[builder]\njournal_file = \"{journal}\"\nstate_file = \"{state}\"\n[repos.demo]"
                ),
            )
        };
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().display();
        for (journal, state) in [
            (format!("{dir}/state.json"), format!("{dir}/state.json")),
            ("state.json".to_owned(), "state.json".to_owned()),
        ] {
            let err = parse(&files(&journal, &state)).unwrap_err();
            assert!(
                matches!(err, ConfigError::SameFile { .. }),
                "{journal}: {err}"
            );
            assert!(err.to_string().contains("journal_file"), "{err}");
        }
        // The same file by another way, as far as the path exists.
        std::fs::create_dir(format!("{dir}/sub")).unwrap();
        let err = parse(&files(
            &format!("{dir}/state.json"),
            &format!("{dir}/sub/../state.json"),
        ));
        assert!(matches!(err, Err(ConfigError::SameFile { .. })));
        let ok = files(&format!("{dir}/journal"), &format!("{dir}/state.json"));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn history_and_web_are_off_until_configured() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.builder.history_db, None);
        assert!(!config.web.enabled);
        assert_eq!(
            config.builder.history_keep,
            HistoryKeep {
                builds: Some(1000),
                age: Some(Duration::from_secs(90 * 86_400)),
            }
        );
        let text = format!(
            "{MINIMAL}[web]\nenabled = true\nurl = \"https://builds.home/\"\n\
             [builder]\nhistory_db = \"/var/lib/h.sqlite\"\nhistory_keep = {{ builds = 50 }}\n"
        );
        let config = parse(&text).unwrap();
        assert!(config.web.enabled);
        assert_eq!(
            config.web.public_url(config.metrics.listen),
            "https://builds.home/"
        );
        // A key left out of the table sets no limit of its kind.
        assert_eq!(
            config.builder.history_keep,
            HistoryKeep {
                builds: Some(50),
                age: None,
            }
        );
        let by_age = text.replace("builds = 50", "age = \"30d\"");
        assert_eq!(
            parse(&by_age).unwrap().builder.history_keep,
            HistoryKeep {
                builds: None,
                age: Some(Duration::from_secs(30 * 86_400)),
            }
        );
        let none = text.replace("builds = 50", "builds = 0");
        assert!(matches!(parse(&none), Err(ConfigError::Zero { .. })));
        let unknown = text.replace("builds = 50", "count = 5");
        assert!(parse(&unknown).is_err());
        let clash = text.replace(
            "history_db = \"/var/lib/h.sqlite\"",
            "history_db = \"/var/lib/s.json\"\nstate_file = \"/var/lib/s.json\"",
        );
        let err = parse(&clash).unwrap_err();
        assert!(err.to_string().contains("history_db"), "{err}");
    }

    #[test]
    fn a_builder_has_a_name_and_a_queue_group_only_of_safe_characters() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.builder.name, None);
        assert!(!config.builder.display_name().is_empty());
        assert_eq!(config.nats.queue_group, None);
        let named = MINIMAL.replace(
            "[repos.demo]",
            "queue_group = \"builders-x86\"\n[builder]\nname = \"nix-cache02.home\"\n[repos.demo]",
        );
        let config = parse(&named).unwrap();
        assert_eq!(config.builder.display_name(), "nix-cache02.home");
        assert_eq!(config.nats.queue_group.as_deref(), Some("builders-x86"));
        // As written in TOML.
        let long = format!("\"{}\"", "x".repeat(65));
        for bad in ["\"\"", "\"two words\"", "\"a\\u001b[31m\"", long.as_str()] {
            let text = MINIMAL.replace(
                "[repos.demo]",
                &format!("[builder]\nname = {bad}\n[repos.demo]"),
            );
            let err = parse(&text).unwrap_err();
            assert!(matches!(err, ConfigError::BadName { .. }), "{bad}: {err}");
            let text = MINIMAL.replace(
                "[repos.demo]",
                &format!("queue_group = {bad}\n[repos.demo]"),
            );
            assert!(parse(&text).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_pages_address_is_made_from_the_listener_when_not_given() {
        let web = WebConfig {
            enabled: true,
            url: None,
        };
        let listen: SocketAddr = "127.0.0.1:9973".parse().unwrap();
        assert_eq!(web.public_url(listen), "http://127.0.0.1:9973/");
        let any: SocketAddr = "0.0.0.0:9973".parse().unwrap();
        let url = web.public_url(any);
        assert!(
            url.starts_with("http://") && url.ends_with(":9973/"),
            "{url}"
        );
        assert!(!url.contains("0.0.0.0"), "{url}");
    }

    #[test]
    fn no_repos_is_an_error() {
        let text = "[nats]\nurl = \"nats://x:1\"\n[repos]\n";
        assert!(matches!(parse(text), Err(ConfigError::NoRepos)));
    }
}
