//! How the client shows a build: plain lines for logs and CI, plus on a
//! terminal a live status redrawn in place, a line per host building
//! (host i of n, its time and derivation counts).

use std::io::Write;
use std::time::Instant;

use crate::present::events::{BuildState, Style, describe, status_lines};
use crate::protocol::Reply;

/// Renders one request's events.
pub struct View<W: Write> {
    out: W,
    style: Style,
    started: Instant,
    state: BuildState,
    /// Lines of the status drawn below the output (0: none).
    status_drawn: usize,
}

impl<W: Write> View<W> {
    /// `live` draws a status that is redrawn in place (terminals only).
    pub fn new(out: W, live: bool) -> Self {
        Self {
            out,
            style: Style {
                live,
                ..Style::default()
            },
            started: Instant::now(),
            state: BuildState::default(),
            status_drawn: 0,
        }
    }

    /// Lists every changed package under each host, not only the summary.
    pub fn with_all_changes(mut self, all_changes: bool) -> Self {
        self.style.all_changes = all_changes;
        self
    }

    /// Shows one event.
    pub fn event(&mut self, reply: &Reply) {
        let shown = describe(reply, &self.state, &self.style);
        self.state.apply(&reply.event, Instant::now());
        self.clear_status();
        // Escaped by `describe`.
        for line in shown.lines {
            let _ = writeln!(self.out, "{line}");
        }
        if !reply.is_terminal() {
            self.draw_status();
        }
        let _ = self.out.flush();
    }

    /// Redraws the status (call about once a second).
    pub fn tick(&mut self) {
        if self.style.live && self.status_drawn > 0 {
            self.clear_status();
            self.draw_status();
            let _ = self.out.flush();
        }
    }

    /// Removes the status, before the program prints something else.
    pub fn finish(&mut self) {
        self.clear_status();
        let _ = self.out.flush();
    }

    fn draw_status(&mut self) {
        if !self.style.live {
            return;
        }
        // Escaped by `status_lines`.
        let lines = status_lines(&self.state, Instant::now(), self.started.elapsed());
        let _ = write!(self.out, "{}", lines.join("\n"));
        self.status_drawn = lines.len();
    }

    /// Erases the status: its last line, then each line above it.
    fn clear_status(&mut self) {
        if self.status_drawn > 0 {
            let _ = write!(self.out, "\r\x1b[2K");
            for _ in 1..self.status_drawn {
                let _ = write!(self.out, "\x1b[1A\x1b[2K");
            }
            self.status_drawn = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::protocol::{BuildStatus, ErrorBody, ErrorCode, Event, HostStatus, HostSummary};

    fn reply(event: Event) -> Reply {
        Reply::new("b1", event)
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
                builder: None,
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
                closure_size: None,
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
                closure_size: None,
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
    fn live_output_redraws_a_line_per_building_host() {
        let mut out = Vec::new();
        {
            let mut view = View::new(&mut out, true);
            for event in [
                Event::HostStarted {
                    host: "a".into(),
                    index: 1,
                    total: 2,
                },
                Event::HostStarted {
                    host: "b".into(),
                    index: 2,
                    total: 2,
                },
            ] {
                view.event(&reply(event));
            }
            view.tick();
        }
        let text = String::from_utf8(out).unwrap();
        // The second draw erases both lines of the first, then draws both.
        let (_, last) = text.rsplit_once("\r\x1b[2K\x1b[1A\x1b[2K").unwrap();
        let lines: Vec<&str> = last.split('\n').collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        assert!(
            lines[0].starts_with("  building host 1 of 2: a ("),
            "{text:?}"
        );
        assert!(
            lines[1].starts_with("  building host 2 of 2: b ("),
            "{text:?}"
        );
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
