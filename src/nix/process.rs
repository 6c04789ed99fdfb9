//! Running one Nix command as its own process group, with a deadline and
//! cancellation, streaming stderr lines to the caller.
//!
//! Nix forks (builders, git, the evaluator's helpers), so stopping it means
//! stopping its whole process group: SIGTERM first, so Nix can stop its own
//! builders and release locks, then SIGKILL after a grace period.

use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
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
/// Time Nix gets between SIGTERM and SIGKILL. Short enough that a
/// shutdown (SIGTERM to the builder) ends well within systemd's patience.
pub const KILL_GRACE: Duration = Duration::from_secs(8);
/// The same for evaluators. They hold nothing worth a clean exit, and Nix
/// 2.8 can miss SIGTERM while an import-from-derivation build is silent.
pub const EVAL_KILL_GRACE: Duration = Duration::from_secs(2);
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
    /// It printed nothing for longer than allowed and was stopped.
    Silent,
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

/// Watches a running command: its pid once started, then every stderr line
/// (without newline, lossily UTF-8). Any `FnMut(&str)` is an observer that
/// only wants the lines.
pub trait Observer {
    /// The command started as `pid` (also its process group id).
    fn started(&mut self, _pid: u32) {}
    /// One line of the command's stderr.
    fn line(&mut self, line: &str);
}

impl<F: FnMut(&str)> Observer for F {
    fn line(&mut self, line: &str) {
        self(line)
    }
}

/// When a command is stopped.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Stop it at this time ([`Outcome::TimedOut`]); `None`: no deadline.
    pub deadline: Option<Instant>,
    /// Stop it once it printed nothing on stderr for this long
    /// ([`Outcome::Silent`]).
    pub max_silence: Option<Duration>,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Most stdout kept; the rest is dropped.
    pub max_stdout: usize,
}

impl Limits {
    /// Only a deadline, and the default grace.
    pub fn deadline(deadline: Instant) -> Self {
        Self {
            deadline: Some(deadline),
            max_silence: None,
            kill_grace: KILL_GRACE,
            max_stdout: MAX_STDOUT_BYTES,
        }
    }
}

/// Runs `invocation` until it exits, `deadline` passes or `cancel` fires;
/// then SIGTERM, and SIGKILL after [`KILL_GRACE`].
pub async fn run(
    invocation: &Invocation,
    deadline: Instant,
    cancel: &CancellationToken,
    observer: &mut impl Observer,
) -> Result<Outcome, SpawnError> {
    run_limited(invocation, Limits::deadline(deadline), cancel, observer).await
}

/// Counts when the command last printed something.
struct Watched<'a, O> {
    inner: &'a mut O,
    started: Instant,
    last_output_ms: &'a AtomicU64,
}

impl<O: Observer> Observer for Watched<'_, O> {
    fn started(&mut self, pid: u32) {
        self.inner.started(pid);
    }

    fn line(&mut self, line: &str) {
        self.last_output_ms.store(
            u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.inner.line(line);
    }
}

/// [`run`] with all of [`Limits`].
pub async fn run_limited(
    invocation: &Invocation,
    limits: Limits,
    cancel: &CancellationToken,
    observer: &mut impl Observer,
) -> Result<Outcome, SpawnError> {
    let Limits {
        deadline,
        max_silence,
        kill_grace,
        max_stdout,
    } = limits;
    tracing::debug!(argv = %invocation, "running nix");
    let mut child = Command::new(&invocation.program)
        .args(&invocation.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        // systemd's notification socket is the builder's, not Nix's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .spawn()
        .map_err(|source| SpawnError {
            program: invocation.program.clone(),
            source,
        })?;
    let started = Instant::now();
    let last_output_ms = AtomicU64::new(0);
    let mut watched = Watched {
        inner: observer,
        started,
        last_output_ms: &last_output_ms,
    };
    if let Some(pid) = child.id() {
        watched.started(pid);
    }
    let stdout_reader = read_bounded(child.stdout.take(), max_stdout);
    let stderr_reader = read_lines(child.stderr.take(), &mut watched);
    tokio::pin!(stdout_reader, stderr_reader);
    let silent_since = || started + Duration::from_millis(last_output_ms.load(Ordering::Relaxed));

    let mut stdout = None;
    let mut stderr_done = false;
    let mut exit: Option<std::io::Result<ExitStatus>> = None;
    // Until Nix exits this is the caller's deadline; afterwards its pipes
    // get a short while to drain, so a stray grandchild holding them open
    // cannot hang the build.
    let mut drain_until = None;
    let status = loop {
        if stdout.is_some() && stderr_done {
            if let Some(status) = exit.take() {
                break status;
            }
        }
        let silence_limit = max_silence.map(|limit| silent_since() + limit);
        let wake_at = match (drain_until, silence_limit, deadline) {
            (Some(drain), _, _) => Some(drain),
            (None, Some(silence), Some(deadline)) => Some(silence.min(deadline)),
            (None, silence, deadline) => silence.or(deadline),
        };
        // Biased: output that is already waiting is read, and a cancel is
        // seen, before the timer branch judges the silence and the deadline.
        tokio::select! {
            biased;
            bytes = &mut stdout_reader, if stdout.is_none() => stdout = Some(bytes),
            () = &mut stderr_reader, if !stderr_done => stderr_done = true,
            status = child.wait(), if exit.is_none() => {
                exit = Some(status);
                drain_until = Some(Instant::now() + PIPE_DRAIN);
            }
            () = cancel.cancelled(), if exit.is_none() => {
                stop_group(&mut child, kill_grace).await;
                return Ok(Outcome::Cancelled);
            }
            () = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {
                if let Some(status) = exit.take() {
                    break status;
                }
                let now = Instant::now();
                if deadline.is_some_and(|deadline| now >= deadline) {
                    stop_group(&mut child, kill_grace).await;
                    return Ok(Outcome::TimedOut);
                }
                if max_silence.is_some_and(|limit| now >= silent_since() + limit) {
                    stop_group(&mut child, kill_grace).await;
                    return Ok(Outcome::Silent);
                }
                // Output arrived meanwhile: the silence limit moved on.
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
async fn stop_group(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id().and_then(|id| Pid::from_raw(id as i32)) else {
        return; // already reaped
    };
    // The group may already be gone; that is fine.
    let _ = kill_process_group(pid, Signal::TERM);
    if timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(
            pid = pid.as_raw_nonzero().get(),
            "nix ignored SIGTERM; killing its process group"
        );
    }
    let _ = kill_process_group(pid, Signal::KILL);
    let _ = child.wait().await;
}

async fn read_bounded(pipe: Option<impl AsyncRead + Unpin>, max: usize) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

async fn read_lines(pipe: Option<impl AsyncRead + Unpin>, observer: &mut impl Observer) {
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
                observer.line(&String::from_utf8_lossy(&line));
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
            observer.line(&String::from_utf8_lossy(&line));
            line.clear();
        }
    }
}

/// Kills the process group `pid` at once (SIGKILL, no grace): for an
/// evaluator that must not grow any further. Its runner then sees it exit
/// by that signal.
pub fn kill_group_now(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process_group(pid, Signal::KILL);
    }
}

/// Makes `pid` the kernel's first choice when memory runs out
/// (`oom_score_adj` 1000), so an evaluator goes before the builder or the
/// Nix daemon. Raising the score needs no privilege.
pub fn prefer_for_oom_kill(pid: u32) {
    if let Err(err) = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000") {
        tracing::debug!(pid, %err, "cannot raise the evaluator's oom_score_adj");
    }
}

/// Resident memory of a process in bytes, from `/proc/<pid>/status`.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Invocation {
        Invocation {
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    fn soon(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[tokio::test]
    async fn stdout_and_stderr_lines_are_collected() {
        let mut lines = Vec::new();
        let outcome = run(
            &sh("echo out; echo one >&2; printf 'two' >&2"),
            soon(10),
            &CancellationToken::new(),
            &mut |line: &str| lines.push(line.to_owned()),
        )
        .await
        .unwrap();
        let Outcome::Exited { status, stdout } = outcome else {
            panic!("{outcome:?}");
        };
        assert!(status.success());
        assert_eq!(stdout, b"out\n");
        assert_eq!(lines, ["one", "two"]);
    }

    #[tokio::test]
    async fn the_deadline_stops_the_whole_process_group() {
        let marker = format!("homelab-deploy-test-{}", std::process::id());
        let script = format!("sleep 30 & sleep 30; echo {marker}");
        let outcome = run(
            &sh(&script),
            soon(1),
            &CancellationToken::new(),
            &mut |_: &str| {},
        )
        .await
        .unwrap();
        assert!(matches!(outcome, Outcome::TimedOut), "{outcome:?}");
    }

    #[tokio::test]
    async fn silence_stops_the_command_but_output_keeps_it_alive() {
        let limits = |silence: u64| Limits {
            deadline: Some(soon(30)),
            max_silence: Some(Duration::from_millis(silence)),
            kill_grace: KILL_GRACE,
            max_stdout: MAX_STDOUT_BYTES,
        };
        let cancel = CancellationToken::new();
        let outcome = run_limited(
            &sh("echo hi >&2; sleep 30"),
            limits(500),
            &cancel,
            &mut |_: &str| {},
        )
        .await
        .unwrap();
        assert!(matches!(outcome, Outcome::Silent), "{outcome:?}");
        // Talking every 100 ms for 2 s never hits a 1 s silence limit.
        let chatty = "i=0; while [ $i -lt 20 ]; do echo tick >&2; sleep 0.1; i=$((i+1)); done";
        let outcome = run_limited(&sh(chatty), limits(1000), &cancel, &mut |_: &str| {})
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Exited { .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn cancellation_stops_the_command() {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        let mut observer = |line: &str| {
            if line == "ready" {
                trigger.cancel();
            }
        };
        let outcome = run(
            &sh("echo ready >&2; sleep 30"),
            soon(60),
            &cancel,
            &mut observer,
        )
        .await
        .unwrap();
        assert!(matches!(outcome, Outcome::Cancelled), "{outcome:?}");
    }

    #[tokio::test]
    async fn overlong_stderr_lines_are_cut() {
        let mut longest = 0;
        let script = "head -c 300000 /dev/zero | tr '\\0' x >&2";
        run(
            &sh(script),
            soon(10),
            &CancellationToken::new(),
            &mut |line: &str| longest = longest.max(line.len()),
        )
        .await
        .unwrap();
        assert_eq!(longest, MAX_STDERR_LINE_BYTES);
    }

    #[tokio::test]
    async fn observers_learn_the_pid() {
        struct Pid(Option<u32>);
        impl Observer for Pid {
            fn started(&mut self, pid: u32) {
                self.0 = Some(pid);
            }
            fn line(&mut self, _: &str) {}
        }
        let mut observer = Pid(None);
        run(
            &sh("true"),
            soon(10),
            &CancellationToken::new(),
            &mut observer,
        )
        .await
        .unwrap();
        assert!(observer.0.is_some());
        assert!(resident_bytes(std::process::id()).unwrap() > 0);
    }
}
