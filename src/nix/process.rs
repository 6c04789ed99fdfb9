//! Running one Nix command as its own process group, with a deadline and
//! cancellation, streaming stderr lines to the caller.
//!
//! Nix forks (builders, git, the evaluator's helpers), so stopping it means
//! stopping its whole process group: SIGTERM first, so Nix can stop its own
//! builders and release locks, then SIGKILL after a grace period.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::argv::Invocation;

/// Most stdout kept from one command; Nix prints a path or a small JSON
/// document there, anything beyond is dropped.
pub const MAX_STDOUT_BYTES: usize = 4 << 20;
/// Longest stderr line handed to the caller; the rest of the line is dropped.
pub const MAX_STDERR_LINE_BYTES: usize = 64 << 10;
/// Time Nix gets between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(10);
/// Time the output pipes get to close after the process exited; a grandchild
/// that kept them open is not waited for.
const PIPE_DRAIN: Duration = Duration::from_secs(5);

/// How a command ended.
#[derive(Debug)]
pub enum Outcome {
    /// It exited by itself.
    Exited { status: ExitStatus, stdout: Vec<u8> },
    /// It ran past its deadline and was stopped.
    TimedOut,
    /// It was cancelled and stopped.
    Cancelled,
}

/// The command could not be run at all.
#[derive(Debug, Error)]
#[error("cannot start `{program}`: {source}")]
pub struct SpawnError {
    program: String,
    #[source]
    source: std::io::Error,
}

/// Runs `invocation` until it exits, `deadline` passes or `cancel` fires.
/// Every stderr line (without newline, lossily UTF-8) goes to `on_stderr`.
pub async fn run(
    invocation: &Invocation,
    deadline: Instant,
    cancel: &CancellationToken,
    mut on_stderr: impl FnMut(&str),
) -> Result<Outcome, SpawnError> {
    tracing::debug!(argv = %invocation, "running nix");
    let mut child = Command::new(&invocation.program)
        .args(&invocation.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SpawnError {
            program: invocation.program.clone(),
            source,
        })?;
    let stdout_reader = read_bounded(child.stdout.take());
    let stderr_reader = read_lines(child.stderr.take(), &mut on_stderr);
    tokio::pin!(stdout_reader, stderr_reader);

    let mut stdout = None;
    let mut stderr_done = false;
    let mut exit: Option<std::io::Result<ExitStatus>> = None;
    // Until Nix exits this is the caller's deadline; afterwards its pipes
    // get a short while to drain, so a stray grandchild holding them open
    // cannot hang the build.
    let mut wake_at = deadline;
    let status = loop {
        if stdout.is_some() && stderr_done {
            if let Some(status) = exit.take() {
                break status;
            }
        }
        tokio::select! {
            bytes = &mut stdout_reader, if stdout.is_none() => stdout = Some(bytes),
            () = &mut stderr_reader, if !stderr_done => stderr_done = true,
            status = child.wait(), if exit.is_none() => {
                exit = Some(status);
                wake_at = Instant::now() + PIPE_DRAIN;
            }
            () = tokio::time::sleep_until(wake_at) => {
                if let Some(status) = exit.take() {
                    break status;
                }
                stop_group(&mut child).await;
                return Ok(Outcome::TimedOut);
            }
            () = cancel.cancelled(), if exit.is_none() => {
                stop_group(&mut child).await;
                return Ok(Outcome::Cancelled);
            }
        }
    };
    let status = status.map_err(|source| SpawnError {
        program: invocation.program.clone(),
        source,
    })?;
    Ok(Outcome::Exited {
        status,
        stdout: stdout.unwrap_or_default(),
    })
}

/// Stops the whole process group: SIGTERM, a grace period, then SIGKILL.
async fn stop_group(child: &mut Child) {
    let Some(pid) = child.id().and_then(|id| Pid::from_raw(id as i32)) else {
        return; // already reaped
    };
    // The group may already be gone; that is fine.
    let _ = kill_process_group(pid, Signal::TERM);
    if timeout(KILL_GRACE, child.wait()).await.is_err() {
        tracing::warn!(
            pid = pid.as_raw_nonzero().get(),
            "nix ignored SIGTERM; killing its process group"
        );
    }
    let _ = kill_process_group(pid, Signal::KILL);
    let _ = child.wait().await;
}

async fn read_bounded(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_STDOUT_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

async fn read_lines(pipe: Option<impl AsyncRead + Unpin>, on_line: &mut impl FnMut(&str)) {
    let Some(pipe) = pipe else {
        return;
    };
    let mut reader = BufReader::with_capacity(64 << 10, pipe);
    let mut line = Vec::new();
    loop {
        let buffer = match reader.fill_buf().await {
            Ok(buffer) => buffer,
            Err(_) => return,
        };
        if buffer.is_empty() {
            if !line.is_empty() {
                on_line(&String::from_utf8_lossy(&line));
            }
            return;
        }
        let (taken, complete) = match buffer.iter().position(|&b| b == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (buffer.len(), false),
        };
        let content = if complete {
            &buffer[..taken - 1]
        } else {
            &buffer[..taken]
        };
        let room = MAX_STDERR_LINE_BYTES.saturating_sub(line.len());
        line.extend_from_slice(&content[..content.len().min(room)]);
        reader.consume(taken);
        if complete {
            on_line(&String::from_utf8_lossy(&line));
            line.clear();
        }
    }
}
