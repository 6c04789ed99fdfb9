//! Error codes and the `{code, message}` object every failure travels in
//! (docs/protocol.md, "Error codes").

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::text::keep_tail;

/// Longest error message carried in a reply.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

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
    /// Evaluating the host alone needs more memory than the evaluators'
    /// whole budget (`eval_memory_budget`).
    EvalOutOfMemory,
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
            Self::EvalOutOfMemory => "eval_out_of_memory",
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn error_code_names_match_serde() {
        for code in [
            ErrorCode::UnknownRepo,
            ErrorCode::InvalidRequest,
            ErrorCode::QueueFull,
            ErrorCode::FetchFailed,
            ErrorCode::UnknownHost,
            ErrorCode::EvalFailed,
            ErrorCode::EvalOutOfMemory,
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
}
