//! Wire protocol v1: subjects, the request body and every reply event.
//!
//! This module is the single source of the protocol that `docs/protocol.md`
//! describes for people; the builder, the CLI client and the MCP server all
//! speak through these types. Change both together.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// First token of every subject the service uses.
pub const SUBJECT_ROOT: &str = "build";
/// Second token reserved for replies; never a repo name.
pub const RESPONSES_TOKEN: &str = "responses";
/// Prefix of every reply subject (`build.responses.<client>.<unique>`).
pub const RESPONSES_PREFIX: &str = "build.responses.";
/// What the builder subscribes to for build requests.
pub const REQUEST_SUBSCRIPTION: &str = "build.*.*";
/// Where the builder answers with its [`StatusEvent`].
pub const STATUS_SUBJECT: &str = "build.status";
/// Where a build is cancelled ([`CancelRequest`] → [`CancelEvent`]).
pub const CANCEL_SUBJECT: &str = "build.cancel";
/// The target that means every host of the repo.
pub const ALL_TARGET: &str = "all";
/// Largest request body accepted; a valid body is far smaller.
pub const MAX_BODY_BYTES: usize = 4096;
/// Longest git ref accepted in a request.
pub const MAX_REF_BYTES: usize = 200;
/// Longest repo or host name accepted.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest error message carried in a reply.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;
/// Largest `lines` payload of one `log` event.
pub const MAX_LOG_EVENT_BYTES: usize = 16 * 1024;

/// NATS header carrying the signer's NKey public key (`U…`).
pub const KEY_HEADER: &str = "Homelab-Deploy-Key";
/// NATS header carrying the Ed25519 signature of [`signed_message`],
/// base64url without padding.
pub const SIGNATURE_HEADER: &str = "Homelab-Deploy-Signature";
/// Most requesters one build's events go to (coalesced requests included).
pub const MAX_REQUESTERS_PER_BUILD: usize = 64;

/// The bytes a signature covers: `<subject>\n<reply>\n<body>`, where
/// `reply` is the message's reply subject (empty for replies, which have
/// none). Binding the subjects means a signed message cannot be replayed
/// onto another subject.
pub fn signed_message(subject: &str, reply: &str, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(subject.len() + reply.len() + body.len() + 2);
    message.extend_from_slice(subject.as_bytes());
    message.push(b'\n');
    message.extend_from_slice(reply.as_bytes());
    message.push(b'\n');
    message.extend_from_slice(body);
    message
}

/// Which request a reply answers: lowercase hex SHA-256 of
/// `<subject>\n<reply>\n<body>` of the request (the bytes a signature
/// covers, [`signed_message`]). Carried in `accepted` and `rejected`.
pub fn request_digest(subject: &str, reply: &str, body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(signed_message(subject, reply, body));
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    hex
}

/// The subject a build request for `repo`/`target` is published on.
pub fn request_subject(repo: &str, target: &str) -> String {
    format!("{SUBJECT_ROOT}.{repo}.{target}")
}

/// What a subject received on [`REQUEST_SUBSCRIPTION`] means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind<'a> {
    /// `build.<repo>.<target>`: a build request (not yet validated).
    Build { repo: &'a str, target: &'a str },
    /// Anything under `build.responses.`: a reply, never a request.
    Response,
    /// Not a subject of this protocol.
    Other,
}

/// Classifies a subject. Replies are recognised first so that a three-token
/// `build.responses.x` can never be taken for a build of repo `responses`.
pub fn classify_subject(subject: &str) -> SubjectKind<'_> {
    let mut tokens = subject.split('.');
    if tokens.next() != Some(SUBJECT_ROOT) {
        return SubjectKind::Other;
    }
    let Some(repo) = tokens.next() else {
        return SubjectKind::Other;
    };
    if repo == RESPONSES_TOKEN {
        return SubjectKind::Response;
    }
    match (tokens.next(), tokens.next()) {
        (Some(target), None) => SubjectKind::Build { repo, target },
        _ => SubjectKind::Other,
    }
}

/// A build request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRequest {
    pub repo: String,
    pub target: Target,
    pub body: BuildRequest,
}

/// Parses and validates a message received on [`REQUEST_SUBSCRIPTION`].
/// `Ok(None)`: not a request at all (a reply, or not this protocol), to be
/// ignored; `Err`: a request to reject with the error's code.
pub fn parse_build_request(
    subject: &str,
    body: &[u8],
    is_known_repo: impl Fn(&str) -> bool,
    known_repos: impl FnOnce() -> String,
) -> Result<Option<ValidRequest>, RequestError> {
    let (repo, target) = match classify_subject(subject) {
        SubjectKind::Build { repo, target } => (repo, target),
        SubjectKind::Response | SubjectKind::Other => return Ok(None),
    };
    if !is_valid_name(repo) || !is_known_repo(repo) {
        return Err(RequestError::UnknownRepo {
            repo: quote_for_error(repo),
            known: known_repos(),
        });
    }
    let target = Target::parse(target)?;
    let body = BuildRequest::parse(body)?;
    Ok(Some(ValidRequest {
        repo: repo.to_owned(),
        target,
        body,
    }))
}

/// Whether `name` is a valid repo or host name: `[A-Za-z0-9_-]+`, bounded,
/// and not starting with `-` (so it can never read as an option).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The body of a build request: empty, or a JSON object with these fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// Git branch or tag to build instead of the repo's default ref.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Exact commit (40 hex digits) to build; must be reachable from the ref.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<String>,
    /// Stream the build log as `log` events.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logs: bool,
}

impl BuildRequest {
    /// Parses and validates a request body. An empty (or all-whitespace)
    /// body means "the repo's default ref, its current head".
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(RequestError::BodyTooLarge { len: body.len() });
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        let malformed = |err: serde_json::Error| RequestError::MalformedBody(err.to_string());
        // serde would also accept a JSON array for a struct; only an object is valid.
        let value: serde_json::Value = serde_json::from_slice(body).map_err(malformed)?;
        if !value.is_object() {
            return Err(RequestError::MalformedBody("not a JSON object".to_owned()));
        }
        let request: Self = serde_json::from_value(value).map_err(malformed)?;
        request.validate()?;
        Ok(request)
    }

    /// Checks `ref` and `rev`; the same rules apply on the client side.
    pub fn validate(&self) -> Result<(), RequestError> {
        if let Some(git_ref) = &self.git_ref {
            validate_ref(git_ref)?;
        }
        if let Some(rev) = &self.rev {
            validate_rev(rev)?;
        }
        Ok(())
    }
}

/// Checks a git ref against a strict allowlist.
///
/// The ref ends up in a flake URL query (`?ref=...`), so beyond git's own
/// rules (no `..`, no leading `-`, ...) anything that could change the URL's
/// meaning (`&`, `#`, `?`, `%`, `=`) is refused outright.
pub fn validate_ref(git_ref: &str) -> Result<(), RequestError> {
    let unsafe_ref = |reason: &'static str| RequestError::UnsafeRef {
        git_ref: quote_for_error(git_ref),
        reason,
    };
    if git_ref.is_empty() {
        return Err(unsafe_ref("it is empty"));
    }
    if git_ref.len() > MAX_REF_BYTES {
        return Err(unsafe_ref("it is longer than 200 bytes"));
    }
    if git_ref.starts_with('-') {
        return Err(unsafe_ref("it starts with '-'"));
    }
    if git_ref.contains("..") {
        return Err(unsafe_ref("it contains '..'"));
    }
    if git_ref.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(unsafe_ref("it contains whitespace or control characters"));
    }
    if !git_ref
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    {
        return Err(unsafe_ref(
            "only letters, digits and '-', '_', '.', '/' are allowed",
        ));
    }
    if git_ref.starts_with('/')
        || git_ref.ends_with('/')
        || git_ref.contains("//")
        || git_ref.ends_with('.')
        || git_ref.ends_with(".lock")
        || git_ref.split('/').any(|part| part.starts_with('.'))
    {
        return Err(unsafe_ref("it is not a valid git ref name"));
    }
    Ok(())
}

/// Checks a commit id: exactly 40 hexadecimal digits.
pub fn validate_rev(rev: &str) -> Result<(), RequestError> {
    if rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(RequestError::InvalidRev {
            rev: quote_for_error(rev),
        })
    }
}

/// What the target token of a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every host of the repo, minus the repo's `exclude` list.
    All,
    /// One host (an attribute of `nixosConfigurations`).
    Host(String),
}

impl Target {
    /// Parses the target token of a request subject.
    pub fn parse(token: &str) -> Result<Self, RequestError> {
        if token == ALL_TARGET {
            Ok(Self::All)
        } else if is_valid_name(token) {
            Ok(Self::Host(token.to_owned()))
        } else {
            Err(RequestError::InvalidTarget {
                target: quote_for_error(token),
            })
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str(ALL_TARGET),
            Self::Host(host) => f.write_str(host),
        }
    }
}

/// Why a request was refused on receipt.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RequestError {
    #[error("unknown repo {repo}; this builder builds: {known}")]
    UnknownRepo { repo: String, known: String },
    #[error("invalid target {target}: use a host name ([A-Za-z0-9_-]+) or 'all'")]
    InvalidTarget { target: String },
    #[error("request body is {len} bytes; the limit is {MAX_BODY_BYTES}")]
    BodyTooLarge { len: usize },
    #[error(
        "malformed request body: {0}; expected empty or a JSON object with optional \"ref\", \"rev\" and \"logs\""
    )]
    MalformedBody(String),
    #[error("unsafe ref {git_ref}: {reason}")]
    UnsafeRef {
        git_ref: String,
        reason: &'static str,
    },
    #[error("invalid rev {rev}: expected a 40-digit hexadecimal commit id")]
    InvalidRev { rev: String },
    #[error("reply subject {subject} is not under build.responses.; replies could not reach you")]
    BadReplySubject { subject: String },
    #[error("invalid build id {build_id}: expected the hex id from the build's events")]
    InvalidBuildId { build_id: String },
}

impl RequestError {
    /// The protocol error code this rejection is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownRepo { .. } => ErrorCode::UnknownRepo,
            Self::InvalidTarget { .. }
            | Self::BodyTooLarge { .. }
            | Self::MalformedBody(_)
            | Self::UnsafeRef { .. }
            | Self::InvalidRev { .. }
            | Self::BadReplySubject { .. }
            | Self::InvalidBuildId { .. } => ErrorCode::InvalidRequest,
        }
    }

    /// This error as it travels in a reply.
    pub fn to_error_body(&self) -> ErrorBody {
        ErrorBody::new(self.code(), self.to_string())
    }
}

/// Quotes untrusted input for an error message: escaped and cut short, so a
/// hostile 64 KiB target does not come back 64 KiB long.
pub fn quote_for_error(input: &str) -> String {
    const KEEP: usize = 64;
    if input.len() <= KEEP {
        format!("{input:?}")
    } else {
        let mut end = KEEP;
        while !input.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}... ({} bytes)", &input[..end], input.len())
    }
}

/// Machine-readable reason carried in every `error` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request named a repo the builder is not configured for.
    UnknownRepo,
    /// The target or the body was not valid.
    InvalidRequest,
    /// `queue_limit` requests are already waiting.
    QueueFull,
    /// The flake could not be fetched or its ref/rev resolved.
    FetchFailed,
    /// The target host is not an attribute of `nixosConfigurations`.
    UnknownHost,
    /// Nix could not evaluate the flake or the host.
    EvalFailed,
    /// The host's build failed.
    BuildFailed,
    /// The host's build ran past `host_timeout` and was killed.
    Timeout,
    /// The build was cancelled.
    Cancelled,
    /// The builder is stopping and takes no new requests.
    ShuttingDown,
    /// The request's signature is invalid, or the builder requires one.
    Unauthorized,
    /// The signer may not do this (e.g. cancel another's build).
    Forbidden,
    /// The builder itself failed; see the message.
    Internal,
    /// Target `all` resolved to no host at all (an empty
    /// `nixosConfigurations`, or an `exclude` that covers every host).
    NoHosts,
    /// Hosts of `all` that cannot be built were left out (their names are
    /// not `[A-Za-z0-9_-]+`); they are listed in `skipped`.
    HostsSkipped,
    /// A code from a newer builder that this client does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownRepo => "unknown_repo",
            Self::InvalidRequest => "invalid_request",
            Self::QueueFull => "queue_full",
            Self::FetchFailed => "fetch_failed",
            Self::UnknownHost => "unknown_host",
            Self::EvalFailed => "eval_failed",
            Self::BuildFailed => "build_failed",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::ShuttingDown => "shutting_down",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::Internal => "internal",
            Self::NoHosts => "no_hosts",
            Self::HostsSkipped => "hosts_skipped",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{code, message}`: why something failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail, at most [`MAX_ERROR_MESSAGE_BYTES`], no ANSI codes.
    pub message: String,
}

impl ErrorBody {
    /// An error body, its message cut to the protocol's limit (keeping the end,
    /// where Nix puts the interesting part). Credentials are masked before
    /// the cut: a cut inside one would leave a piece no mask recognises.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: keep_tail(
                crate::redact::redact_owned(message.into()),
                MAX_ERROR_MESSAGE_BYTES,
            ),
        }
    }
}

/// Cuts `text` to its last `max` bytes on a character boundary. Text that
/// may carry a credential is masked first ([`crate::redact::redact_owned`]).
pub fn keep_tail(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Room kept for a `finished` event's fields other than its host lines
/// when it is shortened, beyond its exact size.
const SHORTENED_SLACK: usize = 64;
/// What is kept of a `finished` error message that must be shortened.
const SHORTENED_ERROR_BYTES: usize = 512;

impl Reply {
    /// This reply as JSON, at most `max` bytes where that is possible: a
    /// `finished` event too large for the server's `max_payload` gives up
    /// host lines from the end (counted in `omitted_hosts`) and most of its
    /// error message rather than being dropped. Other events are left as
    /// they are (they are small, or expendable).
    pub fn to_json_within(&self, max: usize) -> serde_json::Result<Vec<u8>> {
        let whole = serde_json::to_vec(self)?;
        let Event::Finished {
            hosts,
            error,
            omitted_hosts,
            ..
        } = &self.event
        else {
            return Ok(whole);
        };
        if whole.len() <= max {
            return Ok(whole);
        }
        let shortened = |kept: Vec<HostSummary>| {
            let mut short = self.clone();
            if let Event::Finished {
                hosts: short_hosts,
                error: short_error,
                omitted_hosts: omitted,
                ..
            } = &mut short.event
            {
                *short_error = error.as_ref().map(|error| {
                    ErrorBody::new(
                        error.code,
                        keep_tail(
                            crate::redact::redact_owned(error.message.clone()),
                            SHORTENED_ERROR_BYTES,
                        ),
                    )
                });
                *omitted = omitted_hosts + hosts.len() - kept.len();
                *short_hosts = kept;
            }
            short
        };
        let mut size = serde_json::to_vec(&shortened(Vec::new()))?.len() + SHORTENED_SLACK;
        let mut kept = Vec::new();
        for host in hosts {
            size += serde_json::to_vec(host)?.len() + 1;
            if size > max {
                break;
            }
            kept.push(host.clone());
        }
        serde_json::to_vec(&shortened(kept))
    }
}

/// Outcome of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    Success,
    Failed,
    Timeout,
    Cancelled,
}

impl HostStatus {
    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome of a whole request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Every host succeeded.
    Success,
    /// At least one host, or the request itself, failed.
    Failed,
    /// The request was cancelled.
    Cancelled,
}

impl BuildStatus {
    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One host's line in the `finished` summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSummary {
    pub host: String,
    pub status: HostStatus,
    pub duration_ms: u64,
    pub out_path: Option<String>,
    /// The output was already in the store; nothing was built.
    #[serde(default)]
    pub cached: bool,
    /// How many packages changed against the default ref's result
    /// (`packages` plus `more` of the host's [`Changes`]); absent when there
    /// was nothing to compare with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_packages: Option<usize>,
    /// The closure's size change in bytes against the same result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_delta: Option<i64>,
}

/// Most [`ChangedPackage`] entries one [`Changes`] lists; `more` counts the rest.
pub const MAX_CHANGED_PACKAGES: usize = 100;

/// What a host's new result changes against its current result on the
/// repo's default ref: packages whose versions differ, and the closure size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// The result compared with.
    pub against: Against,
    /// Packages added, removed or at other versions, largest size change
    /// first (then by name); at most [`MAX_CHANGED_PACKAGES`].
    pub packages: Vec<ChangedPackage>,
    /// Packages left out of `packages` (the smallest changes).
    #[serde(default)]
    pub more: usize,
    /// Packages whose versions did not change but whose store paths did
    /// (rebuilt because a dependency changed), summarised.
    #[serde(default)]
    pub rebuilt: Rebuilt,
    /// The new closure's size in bytes (the sum of its paths' NAR sizes).
    pub closure_size: u64,
    /// `closure_size` minus the compared closure's size, in bytes.
    pub closure_size_delta: i64,
}

impl Changes {
    /// Every package that changed version, listed or not.
    pub fn changed_packages(&self) -> usize {
        self.packages.len() + self.more
    }
}

/// The result a [`Changes`] compares with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Against {
    /// Its store path.
    pub out_path: String,
    /// The commit it was built from, when known.
    pub rev: Option<String>,
}

/// One package (a name as Nix splits store path names) whose versions
/// differ between the two closures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedPackage {
    /// The name, e.g. `openssl`.
    pub name: String,
    /// Its versions in the compared closure, sorted; empty: added. A path
    /// without a version counts as version `""`.
    pub before: Vec<String>,
    /// Its versions in the new closure, sorted; empty: removed.
    pub after: Vec<String>,
    /// Its paths' total size change in bytes.
    pub size_delta: i64,
}

/// Packages at the same versions whose store paths changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebuilt {
    /// How many package names.
    pub packages: usize,
    /// Their paths' total size change in bytes.
    pub size_delta: i64,
}

/// A host of `all` that was not built, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedHost {
    /// The attribute name as the flake has it.
    pub host: String,
    pub reason: String,
}

/// Every reply: a build id plus one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Assigned by the builder to every request, rejected ones too.
    pub build_id: String,
    /// The event's place among its build's events: rising by one with each
    /// event the builder sends for the build (to any of its requesters),
    /// from `accepted` on; a resumed build continues above every number
    /// sent before the restart. A requester takes an event only if its
    /// `seq` is above the last one it took, so a replayed event is never
    /// taken twice. Absent from builders that do not number events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(flatten)]
    pub event: Event,
}

impl Reply {
    /// A reply without a sequence number.
    pub fn new(build_id: impl Into<String>, event: Event) -> Self {
        Self {
            build_id: build_id.into(),
            seq: None,
            event,
        }
    }

    /// Whether this is the last event a requester will get for the request.
    pub fn is_terminal(&self) -> bool {
        self.event.is_terminal()
    }
}

/// The events of a build, in the order they are sent (see docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Sent at once on receipt.
    Accepted {
        /// Which request this answers: [`request_digest`] of the request
        /// as the builder received it. A requester compares it with the
        /// digest of what it sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_digest: Option<String>,
        repo: String,
        target: String,
        /// The ref that will be fetched: the request's, else the repo's
        /// default; `null` means the remote's default branch.
        #[serde(rename = "ref")]
        git_ref: Option<String>,
        /// How many requests are ahead of this one (0: it starts now).
        queue_position: usize,
        /// The builder sends some event at least this often (milliseconds)
        /// until the terminal one: a client that hears nothing for much
        /// longer may take the builder for dead. 0 from builders that do
        /// not say.
        #[serde(default)]
        heartbeat_ms: u64,
    },
    /// A sign of life while nothing else is sent (waiting in the queue,
    /// fetching, evaluating).
    Heartbeat,
    /// The flake is fetched and pinned; the hosts are resolved.
    Started {
        repo: String,
        target: String,
        /// The commit every host of this request is built from (`null` only
        /// for flake types without one).
        rev: Option<String>,
        hosts: Vec<String>,
        /// Hosts of `all` that will not be built, and why; any makes the
        /// request `failed`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipped: Vec<SkippedHost>,
    },
    /// A host begins (evaluation, then build).
    HostStarted {
        host: String,
        /// Position of the host, counting from 1.
        index: usize,
        total: usize,
    },
    /// A sign of life while a host builds, with Nix's derivation counts.
    Progress {
        host: String,
        /// Derivations built so far for this host.
        done: u64,
        /// Derivations Nix expects to build for this host (0 until known).
        expected: u64,
        /// Name of the derivation building now, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        building: Option<String>,
        /// Where that derivation builds: a remote builder's URI
        /// (credentials masked) or `localhost`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        machine: Option<String>,
    },
    /// Lines of build output, for requests that asked for `logs`.
    Log { host: String, lines: Vec<String> },
    /// A host is done.
    HostFinished {
        host: String,
        status: HostStatus,
        duration_ms: u64,
        /// The built store path, on success.
        out_path: Option<String>,
        /// The output was already in the store; nothing was built.
        #[serde(default)]
        cached: bool,
        /// Why, when not successful.
        error: Option<ErrorBody>,
        /// On success, what changed against the host's current result on
        /// the repo's default ref; `null` when there is nothing to compare
        /// with (or the builder does not compare).
        #[serde(default)]
        changes: Option<Changes>,
        /// Derivations built for this host on each machine: a remote
        /// builder's URI (credentials masked) or `localhost`; empty when
        /// nothing was built.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        machines: BTreeMap<String, u64>,
    },
    /// Terminal: the request is done.
    Finished {
        repo: String,
        target: String,
        rev: Option<String>,
        status: BuildStatus,
        duration_ms: u64,
        succeeded: usize,
        failed: usize,
        hosts: Vec<HostSummary>,
        /// Hosts of `all` that were not built, and why (as in `started`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipped: Vec<SkippedHost>,
        /// Why the request failed before any host built, why hosts were
        /// skipped, or why it was cancelled.
        error: Option<ErrorBody>,
        /// Hosts left out of `hosts` so the event fits the server's
        /// `max_payload` (they still count in `succeeded`/`failed`).
        #[serde(default, skip_serializing_if = "is_zero")]
        omitted_hosts: usize,
    },
    /// Terminal: the request was refused on receipt.
    Rejected {
        /// As in `accepted`: which request this answers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_digest: Option<String>,
        error: ErrorBody,
    },
    /// The builder is stopping (a restart, a deploy of its own host). With
    /// `resume: true` it has the request on disk and picks it up again when
    /// it is back, sending `resumed`; nothing ends here.
    Interrupted { resume: bool },
    /// The builder is back and goes on with the request: the same build id,
    /// the same pinned rev; hosts in `done` finished before and are not
    /// built again.
    Resumed {
        /// Hosts already finished, with their results in `finished`.
        done: Vec<String>,
        /// As in `accepted`: the builder's heartbeat from now on.
        #[serde(default)]
        heartbeat_ms: u64,
    },
    /// An event type from a newer builder; clients skip it.
    #[serde(other)]
    Unknown,
}

impl Event {
    /// Whether this event ends the request.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Finished { .. } | Self::Rejected { .. })
    }

    /// The wire name of the event.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::Heartbeat => "heartbeat",
            Self::Started { .. } => "started",
            Self::HostStarted { .. } => "host_started",
            Self::Progress { .. } => "progress",
            Self::Log { .. } => "log",
            Self::HostFinished { .. } => "host_finished",
            Self::Finished { .. } => "finished",
            Self::Rejected { .. } => "rejected",
            Self::Interrupted { .. } => "interrupted",
            Self::Resumed { .. } => "resumed",
            Self::Unknown => "unknown",
        }
    }
}

/// The body of a `build.cancel` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The build to cancel, as sent in its events.
    pub build_id: String,
}

impl CancelRequest {
    /// Parses a cancel body; the id must look like one the builder assigns.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(RequestError::BodyTooLarge { len: body.len() });
        }
        let malformed = |err: String| {
            RequestError::MalformedBody(format!("{err}; expected {{\"build_id\": \"...\"}}"))
        };
        // serde would also accept a JSON array for a struct; only an object is valid.
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|err| malformed(err.to_string()))?;
        if !value.is_object() {
            return Err(malformed("not a JSON object".to_owned()));
        }
        let request: Self =
            serde_json::from_value(value).map_err(|err| malformed(err.to_string()))?;
        request.validate()?;
        Ok(request)
    }

    /// Build ids are 1–64 hex digits.
    pub fn validate(&self) -> Result<(), RequestError> {
        let id = &self.build_id;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RequestError::InvalidBuildId {
                build_id: quote_for_error(id),
            });
        }
        Ok(())
    }
}

/// The reply to a `build.cancel` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CancelEvent {
    /// Whether the build was found, and where.
    Cancel(CancelOutcome),
}

/// What a cancel request found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub build_id: String,
    /// Whether a running or waiting build with this id was cancelled.
    pub found: bool,
    /// Where it was: `running` or `queued`; `finishing` (with `found:
    /// false`) when the build had already built its last host and ends with
    /// its own result; `null` when not found.
    pub state: Option<CancelledState>,
    /// Why the request itself was invalid, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Where a cancelled build was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelledState {
    Running,
    Queued,
    /// Too late: every host was done; the build was not cancelled.
    Finishing,
    /// A state from a newer builder.
    #[serde(other)]
    Unknown,
}

/// The reply to a `build.status` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StatusEvent {
    /// What the builder is doing and how every host last went.
    Status(BuilderStatus),
}

/// The builder's state, as `build.status` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuilderStatus {
    /// The builder's version.
    pub version: String,
    /// The configured repos (names and default refs; never URLs, which may
    /// carry credentials).
    pub repos: Vec<RepoInfo>,
    /// The build running now.
    pub running: Option<RunningBuild>,
    /// Requests waiting, in the order they will run.
    pub queue: Vec<QueuedBuild>,
    /// The last result of every host built since the builder's state began.
    pub last_results: Vec<LastResult>,
    /// The remote builders of the builder's Nix (its `builders` setting)
    /// and their last check; empty without any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<MachineStatus>,
    /// Entries left out of `last_results` (the oldest) so the answer fits
    /// the server's `max_payload`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted_results: usize,
}

impl StatusEvent {
    /// This answer as JSON, at most `max` bytes where that is possible:
    /// when the whole status is too large for the server's `max_payload`,
    /// the oldest `last_results` are left out (counted in
    /// `omitted_results`) rather than nobody getting a status at all.
    pub fn to_json_within(&self, max: usize) -> serde_json::Result<Vec<u8>> {
        let whole = serde_json::to_vec(self)?;
        let Self::Status(status) = self;
        if whole.len() <= max {
            return Ok(whole);
        }
        let mut without = status.clone();
        without.last_results.clear();
        without.omitted_results = status.omitted_results + status.last_results.len();
        let mut size = serde_json::to_vec(&Self::Status(without))?.len() + SHORTENED_SLACK;
        // The newest first, as long as they fit; then back in their order.
        let mut newest: Vec<usize> = (0..status.last_results.len()).collect();
        newest.sort_by(|&a, &b| {
            status.last_results[b]
                .finished_at
                .cmp(&status.last_results[a].finished_at)
        });
        let mut kept = Vec::new();
        for index in newest {
            size += serde_json::to_vec(&status.last_results[index])?.len() + 1;
            if size > max {
                break;
            }
            kept.push(index);
        }
        kept.sort_unstable();
        let mut short = status.clone();
        short.last_results = kept
            .iter()
            .map(|&index| status.last_results[index].clone())
            .collect();
        short.omitted_results = status.omitted_results + status.last_results.len() - kept.len();
        serde_json::to_vec(&Self::Status(short))
    }
}

/// A remote builder and how its last check went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// Its store URI, credentials masked.
    pub machine: String,
    /// Whether the last check reached it; `null` before the first check.
    pub up: Option<bool>,
    /// When it was last checked (RFC 3339).
    pub checked_at: Option<String>,
    /// Why the last check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A configured repo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoInfo {
    pub name: String,
    /// The default ref; `null` means the remote's default branch.
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
}

/// The build running now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningBuild {
    pub build_id: String,
    pub repo: String,
    pub target: String,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The NKey public key that signed the request (`null`: unsigned).
    #[serde(default)]
    pub owner: Option<String>,
    /// Picked up again from the journal after the builder restarted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
    /// The host building now (`null` while the flake is fetched).
    pub host: Option<String>,
    /// Its position, counting from 1, and the number of hosts.
    pub index: Option<usize>,
    pub total: Option<usize>,
    /// When the build started (RFC 3339, UTC).
    pub started_at: String,
}

/// A request waiting for its turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedBuild {
    pub build_id: String,
    pub repo: String,
    pub target: String,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The NKey public key that signed the request (`null`: unsigned).
    #[serde(default)]
    pub owner: Option<String>,
    /// Picked up again from the journal after the builder restarted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resumed: bool,
    /// When the request arrived (RFC 3339, UTC).
    pub queued_at: String,
}

/// How a host's last build went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastResult {
    pub repo: String,
    pub host: String,
    pub status: HostStatus,
    pub rev: Option<String>,
    pub out_path: Option<String>,
    /// When the host finished (RFC 3339, UTC).
    pub finished_at: String,
    /// The ref it was built from, for a build of a ref other than the
    /// repo's default (absent for the default ref's results).
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Built from a `rev` the request named (absent when not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

/// Formats a time as RFC 3339 in UTC, to the second.
pub fn rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Generates a build id: 16 random lowercase hex digits.
pub fn new_build_id() -> String {
    random_hex::<8>()
}

/// `N` random bytes as lowercase hex.
pub fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    // The OS random source failing is not something to recover from; fall
    // back to the clock so ids stay distinct rather than aborting a request.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let clock = nanos.to_le_bytes();
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = clock[i % clock.len()];
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod properties {
    //! Any subject and body either parse into a valid request or are
    //! rejected with a code; nothing panics, nothing unchecked gets through.
    use proptest::prelude::*;

    use super::*;

    fn check(subject: &str, body: &[u8]) {
        match parse_build_request(subject, body, |r| r == "homelab", || "homelab".into()) {
            Ok(None) => assert!(!matches!(
                classify_subject(subject),
                SubjectKind::Build { .. }
            )),
            Ok(Some(request)) => {
                assert_eq!(request.repo, "homelab");
                if let Target::Host(host) = &request.target {
                    assert!(is_valid_name(host), "{host:?}");
                }
                if let Some(git_ref) = &request.body.git_ref {
                    assert!(validate_ref(git_ref).is_ok(), "{git_ref:?}");
                    assert!(!git_ref.starts_with('-') && !git_ref.contains(".."));
                }
                if let Some(rev) = &request.body.rev {
                    assert!(validate_rev(rev).is_ok(), "{rev:?}");
                }
                assert!(body.len() <= MAX_BODY_BYTES);
            }
            Err(err) => {
                assert!(matches!(
                    err.code(),
                    ErrorCode::UnknownRepo | ErrorCode::InvalidRequest
                ));
                assert!(err.to_string().len() < 1024, "error messages stay short");
            }
        }
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("homelab".to_owned()),
            Just("all".to_owned()),
            Just("responses".to_owned()),
            "[A-Za-z0-9_-]{1,12}",
            "\\PC{0,16}",
            ".{0,300}",
        ]
    }

    fn git_ref() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9._/-]{0,40}",
            Just("--upload-pack=x".to_owned()),
            Just("a..b".to_owned()),
            ".{0,50}",
            "[a-z]{1,3}[&#?%= ][a-z]{1,3}",
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..600),
            (
                proptest::option::of(git_ref()),
                proptest::option::of("[0-9a-fA-Fg]{38,42}"),
                any::<bool>()
            )
                .prop_map(|(git_ref, rev, logs)| {
                    let mut object = serde_json::Map::new();
                    if let Some(r) = git_ref {
                        object.insert("ref".into(), r.into());
                    }
                    if let Some(r) = rev {
                        object.insert("rev".into(), r.into());
                    }
                    if logs {
                        object.insert("logs".into(), true.into());
                    }
                    serde_json::to_vec(&object).unwrap_or_default()
                }),
            (".{0,10}", any::<i64>()).prop_map(|(key, value)| {
                format!("{{\"{}\": {value}}}", key.replace(['"', '\\'], "")).into_bytes()
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn structured_subjects_and_bodies(repo in token(), target in token(), body in body()) {
            check(&format!("build.{repo}.{target}"), &body);
        }

        #[test]
        fn arbitrary_subjects(subject in ".{0,200}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
            check(&subject, &body);
        }

        #[test]
        fn cancel_bodies(body in body()) {
            match CancelRequest::parse(&body) {
                Ok(request) => prop_assert!(request.build_id.bytes().all(|b| b.is_ascii_hexdigit())),
                Err(err) => prop_assert_eq!(err.code(), ErrorCode::InvalidRequest),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cancel_bodies_are_json_objects_only() {
        let id = "0123456789abcdef";
        assert_eq!(
            CancelRequest::parse(format!(r#"{{"build_id":"{id}"}}"#).as_bytes())
                .map(|r| r.build_id),
            Ok(id.to_owned())
        );
        for body in [
            format!(r#"["{id}"]"#),
            format!(r#""{id}""#),
            "null".to_owned(),
        ] {
            assert!(
                matches!(
                    CancelRequest::parse(body.as_bytes()),
                    Err(RequestError::MalformedBody(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn a_finished_too_large_is_shortened_to_fit() {
        let host = |i: usize| HostSummary {
            host: format!("host-{i:03}"),
            status: HostStatus::Failed,
            duration_ms: 1,
            out_path: None,
            cached: false,
            changed_packages: None,
            size_delta: None,
        };
        let reply = Reply {
            build_id: "b".into(),
            seq: None,
            event: Event::Finished {
                repo: "r".into(),
                target: "all".into(),
                rev: None,
                status: BuildStatus::Failed,
                duration_ms: 5,
                succeeded: 0,
                failed: 200,
                hosts: (0..200).map(host).collect(),
                error: Some(ErrorBody::new(ErrorCode::Internal, "x".repeat(4000))),
                skipped: Vec::new(),
                omitted_hosts: 0,
            },
        };
        let whole = reply.to_json_within(usize::MAX).unwrap();
        assert_eq!(whole, serde_json::to_vec(&reply).unwrap());
        let short = reply.to_json_within(2048).unwrap();
        assert!(short.len() <= 2048, "{}", short.len());
        let Event::Finished {
            hosts,
            omitted_hosts,
            error,
            failed,
            ..
        } = serde_json::from_slice::<Reply>(&short).unwrap().event
        else {
            panic!("not finished");
        };
        assert!(!hosts.is_empty());
        assert_eq!(hosts.len() + omitted_hosts, 200);
        assert_eq!(hosts[0].host, "host-000", "the first hosts are kept");
        assert_eq!(failed, 200);
        assert_eq!(error.unwrap().message.len(), 512);
        // Other events are left alone.
        let log = Reply {
            build_id: "b".into(),
            seq: None,
            event: Event::Log {
                host: "h".into(),
                lines: vec!["x".repeat(5000)],
            },
        };
        assert!(log.to_json_within(100).unwrap().len() > 5000);
    }

    #[test]
    fn signed_bytes_bind_subject_reply_and_body() {
        assert_eq!(
            signed_message("build.x.y", "build.responses.a", b"{}"),
            b"build.x.y\nbuild.responses.a\n{}"
        );
        assert_eq!(signed_message("s", "", b""), b"s\n\n");
    }

    use super::*;

    #[test]
    fn classify_accepts_exactly_three_tokens() {
        assert_eq!(
            classify_subject("build.nixos-servers.ns1"),
            SubjectKind::Build {
                repo: "nixos-servers",
                target: "ns1"
            }
        );
        assert_eq!(classify_subject("build.nixos-servers"), SubjectKind::Other);
        assert_eq!(classify_subject("build.a.b.c"), SubjectKind::Other);
        assert_eq!(classify_subject("deploy.a.b"), SubjectKind::Other);
        assert_eq!(classify_subject("build"), SubjectKind::Other);
    }

    #[test]
    fn classify_never_treats_responses_as_a_build() {
        assert_eq!(classify_subject("build.responses.x"), SubjectKind::Response);
        assert_eq!(
            classify_subject("build.responses.client.1"),
            SubjectKind::Response
        );
    }

    #[test]
    fn names_allow_only_the_documented_charset() {
        for good in ["ns1", "nixos-servers", "host_2", "A-b_9"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in [
            "", "a.b", "a b", "$(id)", "--option", "ns1#foo", "../x", "é", "\"q\"",
        ] {
            assert!(!is_valid_name(bad), "{bad}");
        }
        assert!(!is_valid_name(&"a".repeat(MAX_NAME_BYTES + 1)));
    }

    #[test]
    fn target_all_and_hosts() {
        assert_eq!(Target::parse("all"), Ok(Target::All));
        assert_eq!(Target::parse("ns1"), Ok(Target::Host("ns1".into())));
        let err = Target::parse("$(id)").unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidRequest);
    }

    #[test]
    fn empty_body_means_defaults() {
        assert_eq!(BuildRequest::parse(b"").unwrap(), BuildRequest::default());
        assert_eq!(
            BuildRequest::parse(b" \n").unwrap(),
            BuildRequest::default()
        );
        assert_eq!(BuildRequest::parse(b"{}").unwrap(), BuildRequest::default());
    }

    #[test]
    fn body_with_ref_and_rev() {
        let rev = "0123456789abcdef0123456789abcdef01234567";
        let body = format!(r#"{{"ref":"flake-update/2026-11-28","rev":"{rev}","logs":true}}"#);
        let request = BuildRequest::parse(body.as_bytes()).unwrap();
        assert_eq!(request.git_ref.as_deref(), Some("flake-update/2026-11-28"));
        assert_eq!(request.rev.as_deref(), Some(rev));
        assert!(request.logs);
        // `logs: false` is the default and is left out when sending.
        let quiet = BuildRequest::default();
        assert_eq!(serde_json::to_string(&quiet).unwrap(), "{}");
    }

    #[test]
    fn body_rejects_unknown_fields_and_malformed_json() {
        for body in [
            &br#"{"ref":"master","extra":1}"#[..],
            b"{",
            b"[]",
            b"\"master\"",
            b"null",
            br#"{"ref":1}"#,
        ] {
            let err = BuildRequest::parse(body).unwrap_err();
            assert_eq!(
                err.code(),
                ErrorCode::InvalidRequest,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn body_size_is_bounded() {
        let body = format!(r#"{{"ref":"{}"}}"#, "a".repeat(MAX_BODY_BYTES));
        assert!(matches!(
            BuildRequest::parse(body.as_bytes()),
            Err(RequestError::BodyTooLarge { .. })
        ));
    }

    #[test]
    fn unsafe_refs_are_rejected() {
        let long = "a".repeat(201);
        for bad in [
            "",
            "-x",
            "--upload-pack=evil",
            "a..b",
            "a b",
            "a\tb",
            "a\u{7}b",
            long.as_str(),
            "master&rev=abc",
            "x#y",
            "x?y",
            "a%20b",
            "$(id)",
            "/abs",
            "trailing/",
            "a//b",
            "dot.",
            "x.lock",
            "a/.hidden",
            "ünï",
        ] {
            assert!(validate_ref(bad).is_err(), "{bad:?} should be rejected");
        }
        for good in [
            "master",
            "flake-update/2026-11-28",
            "v1.2.3",
            "refs/heads/main",
            &"a".repeat(200),
        ] {
            assert!(validate_ref(good).is_ok(), "{good:?} should be accepted");
        }
    }

    #[test]
    fn rev_must_be_40_hex() {
        assert!(validate_rev("0123456789abcdef0123456789abcdef01234567").is_ok());
        assert!(validate_rev("0123456789ABCDEF0123456789ABCDEF01234567").is_ok());
        assert!(validate_rev("0123456789abcdef").is_err());
        assert!(validate_rev("g123456789abcdef0123456789abcdef01234567").is_err());
        assert!(validate_rev("").is_err());
    }

    #[test]
    fn error_quotes_are_short_and_escaped() {
        let quoted = quote_for_error(&"x".repeat(65536));
        assert!(quoted.len() < 120, "{quoted}");
        assert!(quoted.contains("65536 bytes"));
        assert_eq!(quote_for_error("a\"b"), r#""a\"b""#);
        // Cutting must respect character boundaries.
        let quoted = quote_for_error(&"é".repeat(100));
        assert!(quoted.contains("200 bytes"));
    }

    #[test]
    fn error_messages_keep_their_tail() {
        let message = format!("{}END", "x".repeat(10_000));
        let body = ErrorBody::new(ErrorCode::BuildFailed, message);
        assert_eq!(body.message.len(), MAX_ERROR_MESSAGE_BYTES);
        assert!(body.message.ends_with("END"));
        assert_eq!(keep_tail("ééé".into(), 3), "é");
    }

    #[test]
    fn error_messages_are_masked_before_they_are_cut() {
        // The cut falls inside the token: cut first, the piece left would
        // no longer look like a URL's userinfo and would go out unmasked.
        let url = "git+https://oauth2:ghp_SECRETSECRETSECRET@git.example/r.git";
        let token_middle = url.find("SECRETSECRET").unwrap() + 6;
        let filler = "x".repeat(MAX_ERROR_MESSAGE_BYTES - (url.len() - token_middle));
        let body = ErrorBody::new(ErrorCode::FetchFailed, format!("{url}{filler}"));
        assert!(!body.message.contains("SECRET"), "{}", body.message);
        assert!(body.message.len() <= MAX_ERROR_MESSAGE_BYTES);
    }

    #[test]
    fn replies_serialize_flat_with_event_tag() {
        let reply = Reply {
            build_id: "abc".into(),
            seq: None,
            event: Event::Accepted {
                request_digest: None,
                repo: "r".into(),
                target: "all".into(),
                git_ref: None,
                queue_position: 1,
                heartbeat_ms: 0,
            },
        };
        let json: serde_json::Value = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "build_id": "abc", "event": "accepted", "repo": "r",
                "target": "all", "ref": null, "queue_position": 1, "heartbeat_ms": 0
            })
        );
        let back: Reply = serde_json::from_value(json).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn clients_tolerate_newer_events_fields_and_codes() {
        let reply: Reply =
            serde_json::from_str(r#"{"event":"brand_new","build_id":"x","whatever":[1,2]}"#)
                .unwrap();
        assert_eq!(reply.event, Event::Unknown);
        assert!(!reply.is_terminal());

        let reply: Reply = serde_json::from_str(
            r#"{"event":"rejected","build_id":"x","error":{"code":"new_code","message":"m"}}"#,
        )
        .unwrap();
        assert!(reply.is_terminal());
        let Event::Rejected { error, .. } = reply.event else {
            panic!("not rejected");
        };
        assert_eq!(error.code, ErrorCode::Unknown);

        let reply: Reply = serde_json::from_str(
            r#"{"event":"progress","build_id":"x","host":"h","done":1,"expected":2,"new":true}"#,
        )
        .unwrap();
        assert!(matches!(reply.event, Event::Progress { done: 1, .. }));
    }

    #[test]
    fn error_code_names_match_serde() {
        for code in [
            ErrorCode::UnknownRepo,
            ErrorCode::InvalidRequest,
            ErrorCode::QueueFull,
            ErrorCode::FetchFailed,
            ErrorCode::UnknownHost,
            ErrorCode::EvalFailed,
            ErrorCode::BuildFailed,
            ErrorCode::Timeout,
            ErrorCode::Cancelled,
            ErrorCode::ShuttingDown,
            ErrorCode::Internal,
            ErrorCode::NoHosts,
            ErrorCode::HostsSkipped,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }

    #[test]
    fn machines_are_additive() {
        // An older builder's events have no machines: they read as none.
        let reply: Reply = serde_json::from_str(
            r#"{"event":"host_finished","build_id":"1","host":"a","status":"success","duration_ms":1,"out_path":"/nix/store/x","cached":false,"error":null}"#,
        )
        .unwrap();
        assert!(
            matches!(&reply.event, Event::HostFinished { machines, .. } if machines.is_empty())
        );
        let event = Event::HostFinished {
            host: "a".into(),
            status: HostStatus::Success,
            duration_ms: 1,
            out_path: None,
            cached: true,
            error: None,
            changes: None,
            machines: BTreeMap::new(),
        };
        assert!(!serde_json::to_string(&event).unwrap().contains("machines"));
        let event = Event::Progress {
            host: "a".into(),
            done: 0,
            expected: 1,
            building: Some("x".into()),
            machine: Some("localhost".into()),
        };
        let json = serde_json::to_string(&event).unwrap();
        assert!(json.contains(r#""machine":"localhost""#), "{json}");
    }

    #[test]
    fn skipped_hosts_and_late_cancels_are_additive() {
        // An older builder's `started` has no `skipped`: it reads as none.
        let reply: Reply = serde_json::from_str(
            r#"{"event":"started","build_id":"1","repo":"r","target":"all","rev":null,"hosts":["a"]}"#,
        )
        .unwrap();
        assert!(matches!(reply.event, Event::Started { ref skipped, .. } if skipped.is_empty()));
        let outcome: CancelOutcome =
            serde_json::from_str(r#"{"build_id":"1","found":false,"state":"finishing"}"#).unwrap();
        assert_eq!(outcome.state, Some(CancelledState::Finishing));
        let outcome: CancelOutcome =
            serde_json::from_str(r#"{"build_id":"1","found":false,"state":"later"}"#).unwrap();
        assert_eq!(outcome.state, Some(CancelledState::Unknown));
    }

    #[test]
    fn cancel_requests_take_a_hex_build_id() {
        assert_eq!(
            CancelRequest::parse(br#"{"build_id":"9c21779d2dc86b9c"}"#).unwrap(),
            CancelRequest {
                build_id: "9c21779d2dc86b9c".into()
            }
        );
        for bad in [
            &b""[..],
            b"{}",
            br#"{"build_id":""}"#,
            br#"{"build_id":"$(id)"}"#,
            br#"{"build_id":"abc","x":1}"#,
        ] {
            let err = CancelRequest::parse(bad).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidRequest);
        }
        let reply = CancelEvent::Cancel(CancelOutcome {
            build_id: "ab".into(),
            found: true,
            state: Some(CancelledState::Running),
            error: None,
        });
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event": "cancel", "build_id": "ab", "found": true, "state": "running"})
        );
    }

    #[test]
    fn status_replies_are_tagged_status() {
        let status = StatusEvent::Status(BuilderStatus {
            version: "1.0.0".into(),
            repos: vec![RepoInfo {
                name: "nixos".into(),
                git_ref: None,
            }],
            running: None,
            queue: vec![],
            last_results: vec![],
            machines: vec![],
            omitted_results: 0,
        });
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["event"], "status");
        assert_eq!(json["repos"][0]["ref"], serde_json::Value::Null);
        assert_eq!(serde_json::from_value::<StatusEvent>(json).unwrap(), status);
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn a_status_too_large_for_nats_keeps_its_newest_results() {
        let result = |i: usize| LastResult {
            repo: "nixos-servers".into(),
            host: format!("host-{i:04}"),
            status: HostStatus::Success,
            rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
            out_path: Some(format!("/nix/store/{i:032}-nixos-system-host-{i:04}")),
            finished_at: format!("2026-12-07T02:{:02}:{:02}Z", i / 60, i % 60),
            git_ref: None,
            pinned: false,
        };
        let status = StatusEvent::Status(BuilderStatus {
            version: "1.0.0".into(),
            repos: vec![],
            running: None,
            queue: vec![],
            last_results: (0..2000).map(result).collect(),
            machines: vec![],
            omitted_results: 0,
        });
        let max = 64 * 1024;
        assert!(serde_json::to_vec(&status).unwrap().len() > max);
        let short = status.to_json_within(max).unwrap();
        assert!(short.len() <= max, "{}", short.len());
        let StatusEvent::Status(back) = serde_json::from_slice(&short).unwrap();
        assert!(!back.last_results.is_empty());
        assert_eq!(back.last_results.len() + back.omitted_results, 2000);
        // The newest are kept, in their order.
        assert_eq!(back.last_results.last().unwrap().host, "host-1999");
        assert!(back.last_results.windows(2).all(|w| w[0].host < w[1].host));
        // One that fits is left whole.
        let small = StatusEvent::Status(BuilderStatus {
            last_results: (0..3).map(result).collect(),
            ..back
        });
        let whole = serde_json::to_vec(&small).unwrap();
        assert_eq!(small.to_json_within(max).unwrap(), whole);
    }

    #[test]
    fn build_ids_are_distinct_hex() {
        let a = new_build_id();
        let b = new_build_id();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
