//! Watching one host while it waits for its evaluation and builds: the
//! `progress` and `log` events a requester sees.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::monitor::Monitor;
use super::request::Job;
use crate::nix::log::{LOCALHOST, LogEvent, LogParser, clean_line};
use crate::protocol::{Event, MAX_LOG_EVENT_BYTES};
use crate::sync::lock;

/// Lines of build output kept waiting for the next `log` event; beyond this
/// lines are dropped (and counted), so a flood of output cannot grow memory.
const LOG_BUFFER_BYTES: usize = 256 * 1024;
/// How often buffered log lines are sent, and how many events at most each
/// time: a few messages a second.
const LOG_FLUSH_EVERY: Duration = Duration::from_millis(500);
const LOG_EVENTS_PER_FLUSH: usize = 2;
/// Progress is sent at most this often when Nix's counts change.
const PROGRESS_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// Watches one host while it waits for its evaluation and builds: sends
/// `progress` when Nix's counts change (at most once a second) and at least
/// every `progress_interval`, and batches `log` lines when asked for.
pub(crate) struct HostWatch<'a> {
    job: &'a Job,
    /// Keeps the host's progress for `build.status`.
    monitor: &'a Monitor,
    host: &'a str,
    interval: Duration,
    state: Mutex<WatchState>,
}

#[derive(Default, Clone, PartialEq, Eq)]
struct Progress {
    done: u64,
    expected: u64,
    building: Option<String>,
    machine: Option<String>,
    waiting_for_memory: bool,
}

impl WatchState {
    /// Buffers a line, or counts it as skipped when the buffer is full.
    fn push(&mut self, line: String) {
        if self.log_bytes + line.len() > LOG_BUFFER_BYTES {
            self.dropped += 1;
            return;
        }
        self.note_skipped();
        self.log_bytes += line.len();
        self.log.push_back(line);
    }

    /// Says how many lines were skipped, where they were.
    fn note_skipped(&mut self) {
        if self.dropped > 0 {
            let note = format!("[homelab-deploy: {} lines skipped]", self.dropped);
            self.dropped = 0;
            self.log_bytes += note.len();
            self.log.push_back(note);
        }
    }
}

#[derive(Default)]
struct WatchState {
    now: Progress,
    log: VecDeque<String>,
    log_bytes: usize,
    dropped: u64,
    /// Derivations started on each machine, over all of the host's Nix
    /// commands.
    machines: BTreeMap<String, u64>,
}

impl<'a> HostWatch<'a> {
    /// A watch for `host` of `job`, reporting at least every `interval`
    /// to its requesters and to `monitor`.
    pub(crate) fn new(
        job: &'a Job,
        monitor: &'a Monitor,
        host: &'a str,
        interval: Duration,
    ) -> Self {
        Self {
            job,
            monitor,
            host,
            interval,
            state: Mutex::new(WatchState::default()),
        }
    }

    /// Takes note of one event from the host's `nix build`, as `parser`
    /// read it.
    pub(crate) fn observe(&self, event: &LogEvent, parser: &LogParser) {
        let mut state = lock(&self.state);
        match event {
            LogEvent::Progress { done, expected, .. } => {
                state.now.done = *done;
                state.now.expected = *expected;
            }
            LogEvent::BuildStarted { machine, .. } => {
                *state.machines.entry(machine.clone()).or_default() += 1;
            }
            _ => {}
        }
        let (building, machine) = (parser.building(), parser.machine());
        if state.now.building.as_deref() != building || state.now.machine.as_deref() != machine {
            state.now.building = building.map(str::to_owned);
            state.now.machine = machine.map(str::to_owned);
        }
        if !self.job.logs {
            return;
        }
        match event {
            LogEvent::BuildLine(line) => state.push(line.clone()),
            LogEvent::BuildStarted { drv_path, machine } if machine != LOCALHOST => {
                state.push(format!("building '{drv_path}' on '{machine}'"))
            }
            LogEvent::BuildStarted { drv_path, .. } => state.push(format!("building '{drv_path}'")),
            // Nix's messages span lines (an error quotes the build log):
            // each is cut like a build line, so every line fits an event.
            LogEvent::Message { level, text } if *level <= 1 => {
                for line in text.lines() {
                    state.push(clean_line(line));
                }
            }
            _ => {}
        }
    }

    /// Derivations built so far for the host on each machine.
    pub(crate) fn machines(&self) -> BTreeMap<String, u64> {
        lock(&self.state).machines.clone()
    }

    /// Runs `work` while reporting on it.
    pub(crate) async fn drive<T>(&self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = Progress::default();
        let mut progress_at = Instant::now();
        let mut log_at = Instant::now();
        loop {
            tokio::select! {
                result = &mut work => {
                    self.flush_log(usize::MAX);
                    return result;
                }
                _ = ticker.tick() => {
                    if self.job.logs && log_at.elapsed() >= LOG_FLUSH_EVERY {
                        log_at = Instant::now();
                        self.flush_log(LOG_EVENTS_PER_FLUSH);
                    }
                    let mut now = lock(&self.state).now.clone();
                    now.waiting_for_memory = self.monitor.is_waiting_for_memory(self.host);
                    let since = progress_at.elapsed();
                    if (now != sent && since >= PROGRESS_AT_MOST_EVERY) || since >= self.interval {
                        progress_at = Instant::now();
                        sent = now.clone();
                        self.send_progress(now);
                    }
                }
            }
        }
    }

    fn send_progress(&self, progress: Progress) {
        self.monitor
            .host_progress(self.host, progress.done, progress.expected);
        self.job.replies.send(
            &self.job.build_id,
            Event::Progress {
                host: self.host.to_owned(),
                done: progress.done,
                expected: progress.expected,
                building: progress.building,
                machine: progress.machine,
                waiting_for_memory: progress.waiting_for_memory,
            },
        );
    }

    /// Sends buffered lines as up to `max_events` events of at most
    /// [`MAX_LOG_EVENT_BYTES`] each.
    fn flush_log(&self, max_events: usize) {
        for _ in 0..max_events {
            let lines = {
                let mut state = lock(&self.state);
                // Lines skipped since the last one buffered come after all
                // that is buffered now.
                state.note_skipped();
                let mut lines = Vec::new();
                // Room for the event's other fields.
                let mut budget = MAX_LOG_EVENT_BYTES - 256 - self.host.len();
                while let Some(line) = state.log.front() {
                    let cost = json_string_len(line) + 1;
                    if cost > budget {
                        if lines.is_empty() {
                            // Cannot happen with lines cut by clean_line;
                            // never let one line block the stream.
                            let line = state.log.pop_front().unwrap_or_default();
                            state.log_bytes -= line.len();
                            lines.push(clean_line(&line));
                        }
                        break;
                    }
                    budget -= cost;
                    state.log_bytes -= line.len();
                    lines.extend(state.log.pop_front());
                }
                lines
            };
            if lines.is_empty() {
                return;
            }
            self.job.replies.send(
                &self.job.build_id,
                Event::Log {
                    host: self.host.to_owned(),
                    lines,
                },
            );
        }
    }
}

/// Bytes `text` takes as a JSON string (quotes and escapes included).
fn json_string_len(text: &str) -> usize {
    2 + text
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\t' | '\r' => 2,
            c if c.is_control() => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lengths_count_escapes() {
        assert_eq!(json_string_len("abc"), 5);
        assert_eq!(json_string_len("a\"b"), 6);
        assert_eq!(json_string_len("é"), 4);
        assert_eq!(
            json_string_len("x\ty"),
            serde_json::to_string("x\ty").unwrap().len()
        );
    }
}
