//! How the client shows a build: plain lines for logs and CI, plus a live
//! status line (host i of n, current host, elapsed) on a terminal.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::nix::log::LOCALHOST;
use crate::present::{changes_lines, changes_summary, human_duration, short_rev};
use crate::printable::{printable, printable_line};
use crate::protocol::{BuildStatus, ErrorBody, Event, HostStatus, Reply};

/// What the user has seen of the build so far, for the status line.
#[derive(Debug, Default)]
struct State {
    current: Option<(String, usize, usize)>,
    /// Every started host's position: a host's `host_finished` may come
    /// after the next host started.
    positions: std::collections::HashMap<String, (usize, usize)>,
    host_started: Option<Instant>,
    counts: (u64, u64),
    building: Option<String>,
    last_printed_counts: Option<(String, u64, u64)>,
}

/// Renders one request's events.
pub struct View<W: Write> {
    out: W,
    live: bool,
    all_changes: bool,
    started: Instant,
    state: State,
    status_shown: bool,
}

impl<W: Write> View<W> {
    /// `live` draws a status line that is redrawn in place (terminals only).
    pub fn new(out: W, live: bool) -> Self {
        Self {
            out,
            live,
            all_changes: false,
            started: Instant::now(),
            state: State::default(),
            status_shown: false,
        }
    }

    /// Lists every changed package under each host, not only the summary.
    pub fn with_all_changes(mut self, all_changes: bool) -> Self {
        self.all_changes = all_changes;
        self
    }

    /// Shows one event.
    pub fn event(&mut self, reply: &Reply) {
        let lines = self.describe(reply);
        self.clear_status();
        for line in lines {
            let _ = writeln!(self.out, "{}", printable(&line));
        }
        if !reply.is_terminal() {
            self.draw_status();
        }
        let _ = self.out.flush();
    }

    /// Redraws the status line (call about once a second).
    pub fn tick(&mut self) {
        if self.live && self.status_shown {
            self.clear_status();
            self.draw_status();
            let _ = self.out.flush();
        }
    }

    /// Removes the status line, before the program prints something else.
    pub fn finish(&mut self) {
        self.clear_status();
        let _ = self.out.flush();
    }

    fn describe(&mut self, reply: &Reply) -> Vec<String> {
        let id = &reply.build_id;
        match &reply.event {
            Event::Accepted {
                repo,
                target,
                git_ref,
                queue_position,
                ..
            } => {
                let ahead = match queue_position {
                    0 => "starting now".to_owned(),
                    n => format!("{n} ahead in the queue"),
                };
                vec![format!(
                    "build {id}: {repo}/{target} accepted (ref {}, {ahead})",
                    git_ref.as_deref().unwrap_or("default")
                )]
            }
            Event::Started { rev, hosts, .. } => {
                let mut names = hosts
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if hosts.len() > 20 {
                    names.push_str(&format!(", ... ({} more)", hosts.len() - 20));
                }
                vec![format!(
                    "build {id}: rev {}, {} host{}: {names}",
                    short_rev(rev.as_deref()),
                    hosts.len(),
                    if hosts.len() == 1 { "" } else { "s" }
                )]
            }
            Event::HostStarted { host, index, total } => {
                self.state.current = Some((host.clone(), *index, *total));
                self.state.positions.insert(host.clone(), (*index, *total));
                self.state.host_started = Some(Instant::now());
                self.state.counts = (0, 0);
                self.state.building = None;
                if self.live {
                    Vec::new()
                } else {
                    vec![format!("[{index}/{total}] {host}: building")]
                }
            }
            Event::Progress {
                host,
                done,
                expected,
                building,
                ..
            } => {
                self.state.counts = (*done, *expected);
                self.state.building = building.clone();
                let key = (host.clone(), *done, *expected);
                if self.live
                    || *expected == 0
                    || self.state.last_printed_counts.as_ref() == Some(&key)
                {
                    return Vec::new();
                }
                self.state.last_printed_counts = Some(key);
                vec![format!(
                    "{} {host}: {done}/{expected} derivations built",
                    self.position()
                )]
            }
            Event::Log { host, lines } => lines
                .iter()
                .map(|line| format!("  {host} | {line}"))
                .collect(),
            Event::HostFinished {
                host,
                status,
                duration_ms,
                out_path,
                cached,
                error,
                machines,
                changes,
            } => {
                let position = match self.state.positions.get(host) {
                    Some((index, total)) => format!("[{index}/{total}]"),
                    None => self.position(),
                };
                if self
                    .state
                    .current
                    .as_ref()
                    .is_none_or(|(current, _, _)| current == host)
                {
                    self.state.current = None;
                }
                let took = human_duration(Duration::from_millis(*duration_ms));
                let mut lines = vec![match status {
                    HostStatus::Success => format!(
                        "{position} {host}: {} in {took} -> {}",
                        if *cached { "already built" } else { "success" },
                        out_path.as_deref().unwrap_or("?")
                    ),
                    other => format!(
                        "{position} {host}: {} in {took}{}",
                        other.as_str().to_uppercase(),
                        error
                            .as_ref()
                            .map(|e| format!(" ({})", e.code))
                            .unwrap_or_default()
                    ),
                }];
                if let Some(error) = error {
                    lines.extend(indent_error(error));
                }
                if machines.keys().any(|m| m != LOCALHOST) {
                    let built: Vec<String> =
                        machines.iter().map(|(m, n)| format!("{m}: {n}")).collect();
                    lines.push(format!("  derivations built on {}", built.join(", ")));
                }
                if let Some(changes) = changes {
                    lines.push(format!("    {}", changes_summary(changes)));
                    if self.all_changes {
                        lines.extend(changes_lines(changes).iter().map(|l| format!("      {l}")));
                    }
                }
                lines
            }
            Event::Finished {
                status,
                duration_ms,
                succeeded,
                failed,
                hosts,
                rev,
                error,
                omitted_hosts,
                skipped,
                ..
            } => {
                let took = human_duration(Duration::from_millis(*duration_ms));
                let mut lines = Vec::new();
                if let Some(error) = error {
                    if hosts.is_empty() || *status == BuildStatus::Cancelled || !skipped.is_empty()
                    {
                        lines.push(format!("build {id}: {}", error.code));
                        lines.extend(indent_error(error));
                    }
                }
                let mut summary = format!(
                    "build {id} {status}: {succeeded} succeeded, {failed} failed in {took} (rev {})",
                    short_rev(rev.as_deref())
                );
                let failing: Vec<&str> = hosts
                    .iter()
                    .filter(|h| h.status != HostStatus::Success)
                    .map(|h| h.host.as_str())
                    .collect();
                if !failing.is_empty() {
                    summary.push_str(&format!("; not built: {}", failing.join(", ")));
                }
                if *omitted_hosts > 0 {
                    summary.push_str(&format!(
                        " ({omitted_hosts} more hosts not listed: the result was too large for NATS)"
                    ));
                }
                lines.push(summary);
                lines
            }
            Event::Rejected { error, .. } => {
                let mut lines = vec![format!("build {id} rejected ({})", error.code)];
                lines.extend(indent_error(error));
                lines
            }
            Event::Interrupted { resume: true } => vec![format!(
                "build {id}: the builder is restarting; waiting for it to resume the build"
            )],
            Event::Interrupted { resume: false } => {
                vec![format!("build {id}: the builder is stopping")]
            }
            Event::Resumed { done, .. } => vec![match done.len() {
                0 => format!("build {id}: resumed"),
                n => format!("build {id}: resumed ({n} hosts already done)"),
            }],
            Event::Heartbeat | Event::Unknown => Vec::new(),
        }
    }

    fn position(&self) -> String {
        match &self.state.current {
            Some((_, index, total)) => format!("[{index}/{total}]"),
            None => "[-]".to_owned(),
        }
    }

    fn draw_status(&mut self) {
        if !self.live {
            return;
        }
        let elapsed = human_duration(self.started.elapsed());
        let line = match &self.state.current {
            Some((host, index, total)) => {
                let host_elapsed = self
                    .state
                    .host_started
                    .map(|t| human_duration(t.elapsed()))
                    .unwrap_or_default();
                let (done, expected) = self.state.counts;
                let mut counts = if expected > 0 {
                    format!(", {done}/{expected} drvs")
                } else {
                    String::new()
                };
                if let Some(building) = &self.state.building {
                    counts.push_str(&format!(", building {building}"));
                }
                format!(
                    "  building host {index} of {total}: {host} ({host_elapsed}{counts}), {elapsed} in total"
                )
            }
            None => format!("  waiting, {elapsed} in total"),
        };
        let _ = write!(self.out, "{}", printable_line(&line));
        self.status_shown = true;
    }

    fn clear_status(&mut self) {
        if self.status_shown {
            let _ = write!(self.out, "\r\x1b[2K");
            self.status_shown = false;
        }
    }
}

fn indent_error(error: &ErrorBody) -> Vec<String> {
    error
        .message
        .lines()
        .map(|line| format!("    {line}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::protocol::{ErrorCode, HostSummary};

    fn reply(event: Event) -> Reply {
        Reply {
            build_id: "b1".into(),
            seq: None,
            event,
        }
    }

    fn render(events: Vec<Event>) -> String {
        let mut out = Vec::new();
        {
            let mut view = View::new(&mut out, false);
            for event in events {
                view.event(&reply(event));
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_output_is_one_line_per_step() {
        let text = render(vec![
            Event::Accepted {
                request_digest: None,
                repo: "demo".into(),
                target: "all".into(),
                git_ref: Some("master".into()),
                queue_position: 0,
                heartbeat_ms: 0,
            },
            Event::Started {
                repo: "demo".into(),
                target: "all".into(),
                rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
                hosts: vec!["a".into(), "b".into()],
                skipped: vec![],
            },
            Event::HostStarted {
                host: "a".into(),
                index: 1,
                total: 2,
            },
            Event::HostFinished {
                host: "a".into(),
                status: HostStatus::Success,
                duration_ms: 1500,
                out_path: Some("/nix/store/x-a".into()),
                cached: false,
                error: None,
                machines: BTreeMap::from([
                    ("localhost".to_owned(), 1),
                    ("ssh-ng://root@b1?ssh-key=***".to_owned(), 3),
                ]),
                changes: None,
            },
            Event::HostStarted {
                host: "b".into(),
                index: 2,
                total: 2,
            },
            Event::HostFinished {
                host: "b".into(),
                status: HostStatus::Failed,
                duration_ms: 200,
                out_path: None,
                cached: false,
                error: Some(ErrorBody::new(
                    ErrorCode::BuildFailed,
                    "error: boom\n> last line",
                )),
                machines: BTreeMap::from([("localhost".to_owned(), 1)]),
                changes: None,
            },
            Event::Finished {
                omitted_hosts: 0,
                repo: "demo".into(),
                target: "all".into(),
                rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
                status: BuildStatus::Failed,
                duration_ms: 1800,
                succeeded: 1,
                failed: 1,
                hosts: vec![
                    HostSummary {
                        host: "a".into(),
                        status: HostStatus::Success,
                        duration_ms: 1500,
                        out_path: Some("/nix/store/x-a".into()),
                        cached: false,
                        changed_packages: None,
                        size_delta: None,
                    },
                    HostSummary {
                        host: "b".into(),
                        status: HostStatus::Failed,
                        duration_ms: 200,
                        out_path: None,
                        cached: false,
                        changed_packages: None,
                        size_delta: None,
                    },
                ],
                skipped: vec![],
                error: None,
            },
        ]);
        assert_eq!(
            text,
            "build b1: demo/all accepted (ref master, starting now)\n\
             build b1: rev 609da7ab2bec, 2 hosts: a, b\n\
             [1/2] a: building\n\
             [1/2] a: success in 1.5s -> /nix/store/x-a\n  derivations built on localhost: 1, ssh-ng://root@b1?ssh-key=***: 3\n\
             [2/2] b: building\n\
             [2/2] b: FAILED in 200ms (build_failed)\n    error: boom\n    > last line\n\
             build b1 failed: 1 succeeded, 1 failed in 1.8s (rev 609da7ab2bec); not built: b\n"
        );
    }

    #[test]
    fn live_output_redraws_a_status_line() {
        let mut out = Vec::new();
        {
            let mut view = View::new(&mut out, true);
            view.event(&reply(Event::HostStarted {
                host: "ns1".into(),
                index: 2,
                total: 5,
            }));
            view.tick();
        }
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("building host 2 of 5: ns1"), "{text}");
        assert!(text.contains("\r\x1b[2K"), "{text}");
    }

    #[test]
    fn request_errors_are_shown_before_the_summary() {
        let text = render(vec![Event::Finished {
            omitted_hosts: 0,
            repo: "demo".into(),
            target: "nope".into(),
            rev: None,
            status: BuildStatus::Failed,
            duration_ms: 10,
            succeeded: 0,
            failed: 0,
            hosts: vec![],
            skipped: vec![],
            error: Some(ErrorBody::new(
                ErrorCode::UnknownHost,
                "host \"nope\" is not known",
            )),
        }]);
        assert!(
            text.starts_with("build b1: unknown_host\n    host \"nope\" is not known\n"),
            "{text}"
        );
    }
}
