//! Reading Nix's `--log-format internal-json` stream.
//!
//! Each stderr line is either `@nix {json}` or plain text. The format grew
//! over the years (2.8 has no `parent` on activities, newer releases add
//! fields, activity and result types); unknown types and fields are ignored,
//! never errors.

use std::collections::{BTreeMap, VecDeque};

use serde::Deserialize;

use crate::protocol::MAX_ERROR_MESSAGE_BYTES;
use crate::redact::redact;
use crate::text::keep_tail;

/// Activity type of the "building N derivations" umbrella activity.
const ACT_BUILDS: u64 = 104;
/// Activity type of one derivation build.
const ACT_BUILD: u64 = 105;
/// Result type of a line of a builder's output.
const RES_BUILD_LOG_LINE: u64 = 101;
/// Result type of a progress update `[done, expected, running, failed]`.
const RES_PROGRESS: u64 = 105;
/// Result type of a post-build-hook output line.
const RES_POST_BUILD_LOG_LINE: u64 = 107;
/// Verbosity of errors.
const LEVEL_ERROR: u64 = 0;

/// What a build on the machine running Nix is counted under.
pub const LOCALHOST: &str = "localhost";

/// Longest single line kept from a builder's log.
pub const MAX_LINE_BYTES: usize = 1024;

/// What one stderr line of Nix means to the builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// A line a derivation's builder printed.
    BuildLine(String),
    /// Derivation counts of the running command.
    Progress {
        done: u64,
        expected: u64,
        running: u64,
        failed: u64,
    },
    /// A derivation started building, on `machine` (its URI with
    /// credentials redacted, or [`LOCALHOST`]).
    BuildStarted { drv_path: String, machine: String },
    /// A message Nix printed (level 0 is an error).
    Message { level: u64, text: String },
    /// A line that is not `@nix` JSON.
    Plain(String),
    /// Something the builder has no use for.
    Ignored,
}

#[derive(Deserialize)]
struct RawLine {
    action: String,
    #[serde(default)]
    id: u64,
    #[serde(rename = "type", default)]
    kind: u64,
    #[serde(default)]
    level: u64,
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    fields: Vec<serde_json::Value>,
}

/// Turns stderr lines into [`LogEvent`]s; remembers which activity carries
/// the derivation counts, which derivations are building and where, and how
/// many were built on each machine.
#[derive(Debug, Default)]
pub struct LogParser {
    builds_activity: Option<u64>,
    building: Vec<Building>,
    machines: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Building {
    id: u64,
    drv_path: String,
    machine: String,
}

impl LogParser {
    /// A parser for one Nix invocation.
    pub fn new() -> Self {
        Self::default()
    }

    /// The name of the derivation that most recently started building and
    /// is still building.
    pub fn building(&self) -> Option<&str> {
        self.building.last().map(|b| derivation_name(&b.drv_path))
    }

    /// The machine of the derivation [`Self::building`] names.
    pub fn machine(&self) -> Option<&str> {
        self.building.last().map(|b| b.machine.as_str())
    }

    /// Derivations started so far on each machine (redacted URI, or
    /// [`LOCALHOST`]).
    pub fn machines(&self) -> &BTreeMap<String, u64> {
        &self.machines
    }

    /// Interprets one stderr line (without its newline).
    pub fn parse(&mut self, line: &str) -> LogEvent {
        let Some(json) = line.strip_prefix("@nix ") else {
            return LogEvent::Plain(clean_line(line));
        };
        let Ok(raw) = serde_json::from_str::<RawLine>(json) else {
            return LogEvent::Ignored;
        };
        match raw.action.as_str() {
            // A remote build relays the remote Nix's own activities; the
            // first umbrella activity is the one of this command.
            "start" if raw.kind == ACT_BUILDS => {
                self.builds_activity.get_or_insert(raw.id);
                LogEvent::Ignored
            }
            "start" if raw.kind == ACT_BUILD => self.build_started(raw.id, &raw.fields),
            "stop" => {
                self.building.retain(|b| b.id != raw.id);
                LogEvent::Ignored
            }
            "result" if raw.kind == RES_BUILD_LOG_LINE || raw.kind == RES_POST_BUILD_LOG_LINE => {
                match raw.fields.first() {
                    Some(serde_json::Value::String(text)) => LogEvent::BuildLine(clean_line(text)),
                    _ => LogEvent::Ignored,
                }
            }
            "result" if raw.kind == RES_PROGRESS && Some(raw.id) == self.builds_activity => {
                let field = |i: usize| {
                    raw.fields
                        .get(i)
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0)
                };
                LogEvent::Progress {
                    done: field(0),
                    expected: field(1),
                    running: field(2),
                    failed: field(3),
                }
            }
            "msg" => LogEvent::Message {
                level: raw.level,
                text: strip_ansi(raw.msg.as_deref().unwrap_or_default()),
            },
            _ => LogEvent::Ignored,
        }
    }
}

impl LogParser {
    /// A build activity's fields are `[drvPath, machine, round, rounds]`;
    /// the machine is empty for a local build. The remote Nix's view of a
    /// build sent to it (the same derivation, "local" there) is relayed
    /// too, and is not a second build.
    fn build_started(&mut self, id: u64, fields: &[serde_json::Value]) -> LogEvent {
        let Some(serde_json::Value::String(drv_path)) = fields.first() else {
            return LogEvent::Ignored;
        };
        let machine = match fields.get(1).and_then(serde_json::Value::as_str) {
            None | Some("") => LOCALHOST.to_owned(),
            Some(uri) => redact(uri).into_owned(),
        };
        let relayed = machine == LOCALHOST
            && self
                .building
                .iter()
                .any(|b| b.drv_path == *drv_path && b.machine != LOCALHOST);
        if relayed {
            return LogEvent::Ignored;
        }
        *self.machines.entry(machine.clone()).or_default() += 1;
        self.building.push(Building {
            id,
            drv_path: drv_path.clone(),
            machine: machine.clone(),
        });
        LogEvent::BuildStarted {
            drv_path: drv_path.clone(),
            machine,
        }
    }
}

/// `/nix/store/<hash>-<name>.drv` → `<name>`.
pub fn derivation_name(drv_path: &str) -> &str {
    let file = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let name = file.split_once('-').map_or(file, |(_, name)| name);
    name.strip_suffix(".drv").unwrap_or(name)
}

/// Removes ANSI escape sequences and control characters (except newline and
/// tab) from text Nix or a builder printed.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates, then a final byte @..~
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A single log line, stripped and cut to [`MAX_LINE_BYTES`].
pub fn clean_line(line: &str) -> String {
    // Masked before the cut, which could split a credential.
    let mut text = crate::redact::redact_owned(strip_ansi(line));
    if text.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [...]");
    }
    text
}

/// The bounded memory of what went wrong: Nix's error messages and the last
/// lines of build output, from which the `error.message` of a failed host is
/// made.
#[derive(Debug)]
pub struct ErrorTail {
    messages: VecDeque<String>,
    log_lines: VecDeque<String>,
    max_log_lines: usize,
}

impl Default for ErrorTail {
    fn default() -> Self {
        Self::new(25)
    }
}

impl ErrorTail {
    const MAX_MESSAGES: usize = 16;

    /// Keeps up to `max_log_lines` of build output.
    pub fn new(max_log_lines: usize) -> Self {
        Self {
            messages: VecDeque::new(),
            log_lines: VecDeque::new(),
            max_log_lines,
        }
    }

    /// Takes note of one event.
    pub fn observe(&mut self, event: &LogEvent) {
        match event {
            LogEvent::BuildLine(line) => push_bounded(
                &mut self.log_lines,
                redact(line).into_owned(),
                self.max_log_lines,
            ),
            LogEvent::Message { level, text } if *level == LEVEL_ERROR => {
                push_bounded(
                    &mut self.messages,
                    keep_tail(redact(text).into_owned(), MAX_ERROR_MESSAGE_BYTES),
                    Self::MAX_MESSAGES,
                );
            }
            LogEvent::Plain(line) if !line.trim().is_empty() => push_bounded(
                &mut self.messages,
                redact(line).into_owned(),
                Self::MAX_MESSAGES,
            ),
            _ => {}
        }
    }

    /// Whether anything was recorded.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.log_lines.is_empty()
    }

    /// Nix's messages followed by the last build lines, at most
    /// [`MAX_ERROR_MESSAGE_BYTES`]; the newest lines are kept when cutting.
    pub fn summary(&self) -> String {
        let messages: Vec<&str> = self.messages.iter().map(String::as_str).collect();
        let messages = keep_tail(messages.join("\n"), MAX_ERROR_MESSAGE_BYTES / 2);
        let header = "\nlast log lines:\n";
        let mut budget = MAX_ERROR_MESSAGE_BYTES
            .saturating_sub(messages.len())
            .saturating_sub(header.len());
        let mut lines = Vec::new();
        for line in self.log_lines.iter().rev() {
            let cost = line.len() + 3;
            if cost > budget {
                break;
            }
            budget -= cost;
            lines.push(line.as_str());
        }
        if lines.is_empty() {
            return messages;
        }
        lines.reverse();
        let mut out = messages;
        out.push_str(header);
        for line in lines {
            out.push_str("> ");
            out.push_str(line);
            out.push('\n');
        }
        out.pop();
        out.trim_start_matches('\n').to_owned()
    }
}

fn push_bounded(queue: &mut VecDeque<String>, item: String, max: usize) {
    if max == 0 {
        return;
    }
    if queue.len() == max {
        queue.pop_front();
    }
    queue.push_back(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_log_lines_are_masked_before_they_are_cut() {
        let url = "https://x-access-token:SECRETSECRET@git.example/r";
        let cut_inside = url.find("SECRETSECRET").unwrap() + 6;
        let line = format!("{}{url}", "y".repeat(MAX_LINE_BYTES - cut_inside));
        let clean = clean_line(&line);
        assert!(!clean.contains("SECRET"), "{clean}");
    }

    /// A failing build as Nix 2.8 logs it (captured from Debian's nix-bin).
    const NIX_2_8_FAILED_BUILD: &str = include_str!("testdata/nix-2.8-failed-build.log");

    /// A failing build with a dependency that builds first, as Nix 2.26
    /// logs it (captured from Debian trixie's nix-bin 2.26.3 running
    /// `nix build --json --log-format internal-json --no-link <drv>^*`):
    /// activities carry a `parent`, informational messages come without
    /// `raw_msg`, and the counts shrink when a build fails (`[1,1,0,1]`).
    const NIX_2_26_FAILED_BUILD: &str = include_str!("testdata/nix-2.26-failed-build.log");

    /// Two derivations sent to a remote machine by Nix 2.8's build hook
    /// (captured from Debian's nix-bin with `builders = ssh-ng://…` and
    /// `max-jobs = 0`; the key path shortened, per-derivation progress of
    /// other activities left out): each build activity names the machine,
    /// and the remote Nix's own activities for the same derivation (an
    /// umbrella activity, a "local" build) are relayed in between.
    const NIX_2_8_REMOTE_BUILD: &str = include_str!("testdata/nix-2.8-remote-build.log");

    /// An evaluation error as Nix 2.26.3 logs it (`nix eval --json
    /// --log-format internal-json`): one message with the whole trace.
    const NIX_2_26_EVAL_ERROR: &str = include_str!("testdata/nix-2.26-eval-error.log");

    fn parse_all(text: &str) -> Vec<LogEvent> {
        let mut parser = LogParser::new();
        text.lines().map(|line| parser.parse(line)).collect()
    }

    /// What the error tail of a whole captured log says.
    fn summary_of(log: &str) -> String {
        let mut tail = ErrorTail::default();
        for event in parse_all(log) {
            tail.observe(&event);
        }
        tail.summary()
    }

    fn progress(events: &[LogEvent]) -> Vec<(u64, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                LogEvent::Progress { done, expected, .. } => Some((*done, *expected)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn nix_2_8_progress_comes_only_from_the_builds_activity() {
        let events = parse_all(NIX_2_8_FAILED_BUILD);
        // The copy-paths activity (type 103) also reports progress; it must
        // not be mistaken for derivation counts.
        assert_eq!(progress(&events), vec![(0, 1), (0, 1), (0, 0)]);
    }

    #[test]
    fn nix_2_8_build_lines_are_stripped_of_ansi() {
        let events = parse_all(NIX_2_8_FAILED_BUILD);
        let lines: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                LogEvent::BuildLine(l) => Some(l.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(lines, ["about to fail", "red"]);
        assert!(events.contains(&LogEvent::BuildStarted {
            drv_path: "/nix/store/k41ilxm0q77sq0igsw0vymk1wmljb9s0-bad.drv".into(),
            machine: LOCALHOST.into(),
        }));
    }

    #[test]
    fn nix_2_8_error_tail_has_the_error_and_the_log() {
        assert_eq!(
            summary_of(NIX_2_8_FAILED_BUILD),
            "error: builder for '/nix/store/k41ilxm0q77sq0igsw0vymk1wmljb9s0-bad.drv' failed with exit code 3\nlast log lines:\n> about to fail\n> red"
        );
    }

    #[test]
    fn nix_2_26_progress_comes_only_from_the_builds_activity() {
        let events = parse_all(NIX_2_26_FAILED_BUILD);
        assert_eq!(
            progress(&events),
            vec![(0, 1), (0, 2), (0, 2), (1, 2), (1, 2), (1, 1)]
        );
    }

    #[test]
    fn nix_2_26_build_lines_and_builds_are_seen() {
        let events = parse_all(NIX_2_26_FAILED_BUILD);
        let lines: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                LogEvent::BuildLine(l) => Some(l.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(lines, ["dep", "about to fail", "red"]);
        let started: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                LogEvent::BuildStarted { drv_path, .. } => Some(derivation_name(drv_path)),
                _ => None,
            })
            .collect();
        assert_eq!(started, ["dep", "bad"]);
    }

    #[test]
    fn nix_2_26_error_tail_has_the_error_and_the_log_but_no_info_messages() {
        assert_eq!(
            summary_of(NIX_2_26_FAILED_BUILD),
            "error: builder for '/nix/store/wm2hix6bnsr0yw02kj1309arp2chlfj2-bad.drv' failed with exit code 3\nlast log lines:\n> dep\n> about to fail\n> red"
        );
    }

    #[test]
    fn nix_2_8_remote_builds_are_counted_once_under_their_machine() {
        let mut parser = LogParser::new();
        let mut machines_seen = Vec::new();
        let events: Vec<LogEvent> = NIX_2_8_REMOTE_BUILD
            .lines()
            .map(|line| {
                let event = parser.parse(line);
                machines_seen.push(parser.machine().map(str::to_owned));
                event
            })
            .collect();
        let remote = "ssh-ng://root@127.0.0.1?ssh-key=***";
        let started: Vec<(&str, &str)> = events
            .iter()
            .filter_map(|e| match e {
                LogEvent::BuildStarted { drv_path, machine } => {
                    Some((derivation_name(drv_path), machine.as_str()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(started, [("dep", remote), ("top", remote)]);
        assert_eq!(
            parser.machines(),
            &BTreeMap::from([(remote.to_owned(), 2)]),
            "the relayed local view of a remote build is not a second build"
        );
        assert!(machines_seen.contains(&Some(remote.to_owned())));
        assert!(!machines_seen.contains(&Some(LOCALHOST.to_owned())));
        // Counts come from this command's umbrella activity, not from the
        // remote Nix's relayed one (which would say 1 of 1).
        assert_eq!(
            progress(&events),
            vec![(0, 1), (0, 2), (0, 2), (1, 2), (1, 2)]
        );
    }

    #[test]
    fn local_builds_count_under_localhost_on_both_versions() {
        for capture in [NIX_2_8_FAILED_BUILD, NIX_2_26_FAILED_BUILD] {
            let mut parser = LogParser::new();
            let mut machines_seen = Vec::new();
            for line in capture.lines() {
                parser.parse(line);
                machines_seen.extend(parser.machine().map(str::to_owned));
            }
            let expected = capture.matches(r#"","",1,1]"#).count();
            assert!(expected > 0);
            assert_eq!(
                parser.machines(),
                &BTreeMap::from([(LOCALHOST.to_owned(), expected as u64)])
            );
            assert!(machines_seen.iter().all(|m| m == LOCALHOST));
        }
    }

    #[test]
    fn machine_credentials_are_redacted() {
        let mut parser = LogParser::new();
        let line = r#"@nix {"action":"start","fields":["/nix/store/a-x.drv","ssh://builder:hunter2@b1",1,1],"id":7,"level":3,"text":"","type":105}"#;
        let LogEvent::BuildStarted { machine, .. } = parser.parse(line) else {
            panic!("not a build start");
        };
        assert_eq!(machine, "ssh://***@b1");
        assert_eq!(parser.machine(), Some("ssh://***@b1"));
    }

    #[test]
    fn nix_2_26_eval_error_keeps_its_trace_without_ansi() {
        let mut tail = ErrorTail::default();
        for event in parse_all(NIX_2_26_EVAL_ERROR) {
            tail.observe(&event);
        }
        let summary = tail.summary();
        assert!(summary.starts_with("error:\n"), "{summary}");
        assert!(
            summary.contains(
                "while evaluating the attribute 'evalfail.config.system.build.toplevel.drvPath'"
            ),
            "{summary}"
        );
        assert!(
            summary.ends_with("error: evaluation of this host fails on purpose"),
            "{summary}"
        );
        assert!(!summary.contains('\u{1b}'));
    }

    #[test]
    fn the_derivation_building_now_is_tracked() {
        let mut parser = LogParser::new();
        let mut seen = Vec::new();
        for line in NIX_2_8_FAILED_BUILD.lines() {
            parser.parse(line);
            seen.push(parser.building().map(str::to_owned));
        }
        assert!(seen.contains(&Some("bad".to_owned())));
        assert_eq!(seen.last().unwrap(), &None, "the build stopped");
        assert_eq!(
            derivation_name("/nix/store/abc-nixos-system-ns1-24.05.drv"),
            "nixos-system-ns1-24.05"
        );
    }

    #[test]
    fn plain_lines_and_garbage_do_not_break_parsing() {
        let mut parser = LogParser::new();
        assert_eq!(
            parser.parse("error: unrecognised flag '--bogus'"),
            LogEvent::Plain("error: unrecognised flag '--bogus'".into())
        );
        assert_eq!(parser.parse("@nix {not json"), LogEvent::Ignored);
        assert_eq!(
            parser.parse(r#"@nix {"action":"future"}"#),
            LogEvent::Ignored
        );
        assert_eq!(
            parser.parse(r#"@nix {"action":"result","id":1,"type":999,"fields":[{"x":1}]}"#),
            LogEvent::Ignored
        );
    }

    #[test]
    fn ansi_and_control_characters_are_removed() {
        assert_eq!(strip_ansi("\u{1b}[31;1merror:\u{1b}[0m x"), "error: x");
        assert_eq!(
            strip_ansi("a\u{1b}]8;;http://x\u{7}link\u{1b}]8;;\u{1b}\\b"),
            "alinkb"
        );
        assert_eq!(strip_ansi("progress\r50%\u{8}"), "progress50%");
        assert_eq!(
            strip_ansi("keep\ttabs\nand newlines"),
            "keep\ttabs\nand newlines"
        );
    }

    #[test]
    fn long_lines_are_cut() {
        let mut parser = LogParser::new();
        let long = format!(
            r#"@nix {{"action":"result","id":1,"type":101,"fields":["{}"]}}"#,
            "y".repeat(10_000)
        );
        let LogEvent::BuildLine(line) = parser.parse(&long) else {
            panic!("not a build line");
        };
        assert!(line.len() <= MAX_LINE_BYTES + 10);
    }

    #[test]
    fn the_tail_is_bounded_and_keeps_the_newest_lines() {
        let mut tail = ErrorTail::new(25);
        for i in 0..10_000 {
            tail.observe(&LogEvent::BuildLine(format!(
                "line {i} {}",
                "z".repeat(200)
            )));
        }
        tail.observe(&LogEvent::Message {
            level: 0,
            text: "error: boom".into(),
        });
        let summary = tail.summary();
        assert!(summary.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert!(summary.starts_with("error: boom"));
        assert!(summary.contains("line 9999"));
        assert!(!summary.contains("line 9974 "));
    }

    #[test]
    fn warnings_are_not_errors() {
        let mut tail = ErrorTail::default();
        tail.observe(&LogEvent::Message {
            level: 1,
            text: "warning: Git tree is dirty".into(),
        });
        assert!(tail.is_empty());
    }
}
