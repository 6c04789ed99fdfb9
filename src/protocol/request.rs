//! The build request: its subject tokens and body, parsed and validated
//! (docs/protocol.md, "Subjects" and "Request body").

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{ErrorBody, ErrorCode, SubjectKind, classify_subject};

/// The target that means every host of the repo.
pub const ALL_TARGET: &str = "all";
/// Largest request body accepted; a valid body is far smaller.
pub const MAX_BODY_BYTES: usize = 4096;
/// Longest git ref accepted in a request.
pub const MAX_REF_BYTES: usize = 200;
/// Longest repo or host name accepted.
pub const MAX_NAME_BYTES: usize = 128;

/// A build request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRequest {
    pub repo: String,
    pub target: Target,
    pub body: BuildRequest,
}

/// Parses and validates a message received on a [`repo_subscription`](super::repo_subscription).
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

#[cfg(test)]
mod properties {
    //! Any subject and body either parse into a valid request or are
    //! rejected with a code; nothing panics, nothing unchecked gets through.
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::CancelRequest;

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
    use super::*;

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
}
