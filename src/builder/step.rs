//! One Nix command as a step of the builder's work: its stdout, or a
//! [`StepFailure`] that says how it failed and what Nix said. Every caller
//! (the runner's fetch, listing and builds, the evaluator, the machine
//! checks, the GC roots) turns that into its own words; none reads a
//! process outcome by itself.

use std::process::ExitStatus;

use tokio_util::sync::CancellationToken;

use crate::nix::argv::Invocation;
use crate::nix::log::{ErrorTail, LogEvent, LogParser};
use crate::nix::process::{self, Limits, Outcome, SpawnError};

/// How a Nix step failed. `error` is the error Nix printed before it
/// ended (its last messages, summarised), empty when it printed none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepFailure {
    /// Nix could not be started.
    Spawn(String),
    /// Nix exited unsuccessfully.
    Exited { status: ExitStatus, error: String },
    /// Nix ran past its deadline and was stopped.
    TimedOut { error: String },
    /// Nix printed nothing for longer than allowed and was stopped.
    Silent { error: String },
    /// The step was cancelled.
    Cancelled,
}

impl StepFailure {
    /// Nix's own error for an unsuccessful exit, else a sentence saying
    /// it printed none (`while` says what it was doing, e.g. " while
    /// evaluating ns1"; may be empty).
    pub(crate) fn exit_message(status: ExitStatus, error: &str, doing: &str) -> String {
        if error.is_empty() {
            format!("nix exited with {status}{doing} and printed no error")
        } else {
            error.to_owned()
        }
    }
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Spawn(why) => f.write_str(why),
            Self::Exited { status, error } => f.write_str(&Self::exit_message(*status, error, "")),
            Self::TimedOut { error } if error.is_empty() => f.write_str("nix ran out of time"),
            Self::Silent { error } if error.is_empty() => {
                f.write_str("nix printed nothing for too long")
            }
            Self::TimedOut { error } | Self::Silent { error } => f.write_str(error),
            Self::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Reads how a command ended: its stdout if it succeeded, else how it
/// failed, with `tail`'s summary of what it printed.
pub(crate) fn explain(
    outcome: Result<Outcome, SpawnError>,
    tail: &ErrorTail,
) -> Result<Vec<u8>, StepFailure> {
    match outcome {
        Err(err) => Err(StepFailure::Spawn(err.to_string())),
        Ok(Outcome::Exited { status, stdout }) if status.success() => Ok(stdout),
        Ok(Outcome::Exited { status, .. }) => Err(StepFailure::Exited {
            status,
            error: tail.summary(),
        }),
        Ok(Outcome::TimedOut) => Err(StepFailure::TimedOut {
            error: tail.summary(),
        }),
        Ok(Outcome::Silent) => Err(StepFailure::Silent {
            error: tail.summary(),
        }),
        Ok(Outcome::Cancelled) => Err(StepFailure::Cancelled),
    }
}

/// Runs `invocation` within `limits` until `stop`, handing every parsed
/// stderr line to `observe`, and explains how it ended.
pub(crate) async fn run_step(
    invocation: &Invocation,
    limits: Limits,
    stop: &CancellationToken,
    observe: &mut (dyn FnMut(&LogEvent, &LogParser) + Send),
) -> Result<Vec<u8>, StepFailure> {
    let mut parser = LogParser::new();
    let mut tail = ErrorTail::default();
    let outcome = process::run_limited(invocation, limits, stop, &mut |line: &str| {
        let event = parser.parse(line);
        observe(&event, &parser);
        tail.observe(&event);
    })
    .await;
    explain(outcome, &tail)
}

/// [`run_step`] for a command whose stderr only matters when it fails.
pub(crate) async fn run_quiet(
    invocation: &Invocation,
    limits: Limits,
    stop: &CancellationToken,
) -> Result<Vec<u8>, StepFailure> {
    run_step(invocation, limits, stop, &mut |_, _| {}).await
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn tail_of(lines: &[&str]) -> ErrorTail {
        let mut parser = LogParser::new();
        let mut tail = ErrorTail::default();
        for line in lines {
            tail.observe(&parser.parse(line));
        }
        tail
    }

    #[test]
    fn success_gives_stdout_and_every_failure_keeps_what_nix_said() {
        let said = tail_of(&["error: attribute 'ns9' missing"]);
        let exited = |code| Outcome::Exited {
            status: ExitStatus::from_raw(code << 8),
            stdout: b"out".to_vec(),
        };
        assert_eq!(explain(Ok(exited(0)), &said), Ok(b"out".to_vec()));
        let Err(StepFailure::Exited { status, error }) = explain(Ok(exited(1)), &said) else {
            panic!("not an exit failure");
        };
        assert_eq!(status.code(), Some(1));
        assert!(error.contains("attribute 'ns9' missing"), "{error}");
        let Err(StepFailure::TimedOut { error }) = explain(Ok(Outcome::TimedOut), &said) else {
            panic!("not a timeout");
        };
        assert!(error.contains("ns9"), "{error}");
        assert!(matches!(
            explain(Ok(Outcome::Silent), &ErrorTail::default()),
            Err(StepFailure::Silent { error }) if error.is_empty()
        ));
        assert_eq!(
            explain(Ok(Outcome::Cancelled), &said),
            Err(StepFailure::Cancelled)
        );
    }

    #[test]
    fn an_exit_without_an_error_says_so_and_what_nix_was_doing() {
        let status = ExitStatus::from_raw(1 << 8);
        assert_eq!(
            StepFailure::exit_message(status, "", " while evaluating ns1"),
            "nix exited with exit status: 1 while evaluating ns1 and printed no error"
        );
        assert_eq!(
            StepFailure::exit_message(status, "error: boom", " while evaluating ns1"),
            "error: boom"
        );
    }
}
