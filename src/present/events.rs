//! How a build's events read: the lines of the CLI's output, the short
//! notes of the MCP server's progress notifications, the result both show
//! at the end, and the live status of the hosts building now.
//!
//! What the events say is kept in a [`BuildState`] (updated by
//! [`BuildState::apply`]); what they look like is decided by [`describe`]
//! and [`status_lines`], which only read it. Everything they return is
//! escaped with [`printable_line`]: wire text stays on its line and acts on
//! no terminal.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::{changes_lines, changes_summary, human_duration, short_rev};
use crate::nix::log::LOCALHOST;
use crate::printable::printable_line;
use crate::protocol::{BuildStatus, ErrorBody, Event, HostStatus, Reply};

/// What has been seen of one build so far, as far as showing it needs.
#[derive(Debug, Default)]
pub struct BuildState {
    /// Every started host's position (`index`, `total`): a host's
    /// `host_finished` may come after later hosts started.
    positions: HashMap<String, (usize, usize)>,
    /// The hosts building now, by name. With the builder's
    /// `parallel_hosts` above 1 several build at once and their progress
    /// events interleave.
    building: HashMap<String, HostProgress>,
    /// Hosts done (finished before a restart, or now).
    finished: HashSet<String>,
    /// How many hosts the build has, once `started` said.
    total: Option<usize>,
}

/// Where one building host stands.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostProgress {
    since: Instant,
    done: u64,
    expected: u64,
    building: Option<String>,
    /// Its evaluation waits for room in the builder's memory budget.
    waiting_for_memory: bool,
}

impl HostProgress {
    fn new(since: Instant) -> Self {
        Self {
            since,
            done: 0,
            expected: 0,
            building: None,
            waiting_for_memory: false,
        }
    }
}

impl BuildState {
    /// Takes in what `event` says, received at `now`.
    pub fn apply(&mut self, event: &Event, now: Instant) {
        match event {
            Event::Started { hosts, .. } => self.total = Some(hosts.len()),
            Event::HostStarted { host, index, total } => {
                self.positions.insert(host.clone(), (*index, *total));
                self.building.insert(host.clone(), HostProgress::new(now));
            }
            Event::Progress {
                host,
                done,
                expected,
                building,
                waiting_for_memory,
                ..
            } => {
                if self.finished.contains(host) {
                    return;
                }
                let progress = self
                    .building
                    .entry(host.clone())
                    .or_insert_with(|| HostProgress::new(now));
                progress.done = *done;
                progress.expected = *expected;
                progress.building.clone_from(building);
                progress.waiting_for_memory = *waiting_for_memory;
            }
            Event::HostFinished { host, .. } => {
                self.building.remove(host);
                self.finished.insert(host.clone());
            }
            // Nothing builds while the builder is away; it starts the hosts
            // it builds again with `host_started`.
            Event::Interrupted { .. } => self.building.clear(),
            Event::Resumed { done, .. } => {
                self.building.clear();
                self.finished.extend(done.iter().cloned());
            }
            Event::Accepted { .. }
            | Event::Heartbeat
            | Event::Log { .. }
            | Event::Finished { .. }
            | Event::Rejected { .. }
            | Event::Unknown => {}
        }
    }

    /// How many hosts are done.
    pub fn finished(&self) -> usize {
        self.finished.len()
    }

    /// How many hosts the build has, once known.
    pub fn total(&self) -> Option<usize> {
        self.total
    }

    /// `[index/total]` of a started host, `[-]` for one not seen starting.
    fn position(&self, host: &str) -> String {
        match self.positions.get(host) {
            Some((index, total)) => format!("[{index}/{total}]"),
            None => "[-]".to_owned(),
        }
    }
}

/// How events are shown.
#[derive(Debug, Clone, Default)]
pub struct Style {
    /// A live status ([`status_lines`]) shows the hosts building: no line
    /// when a host starts or when its counts change.
    pub live: bool,
    /// Every changed package under each host, not only the summary.
    pub all_changes: bool,
    /// The request as `repo/target`, named in the last lines for a reader
    /// who does not see the `accepted` line.
    pub request: Option<String>,
}

/// One event as shown.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Shown {
    /// Lines of the build's log (the CLI's output), maybe none.
    pub lines: Vec<String>,
    /// One short line on where the build stands (a progress
    /// notification), for events that move it on.
    pub note: Option<String>,
}

/// How `reply` reads, given what was seen before it (`state` before
/// [`BuildState::apply`] takes the event in).
pub fn describe(reply: &Reply, state: &BuildState, style: &Style) -> Shown {
    let (lines, note) = lines_and_note(reply, state, style);
    Shown {
        lines: lines
            .iter()
            .map(|line| printable_line(line).into_owned())
            .collect(),
        note: note.map(|note| printable_line(&note).into_owned()),
    }
}

fn lines_and_note(
    reply: &Reply,
    state: &BuildState,
    style: &Style,
) -> (Vec<String>, Option<String>) {
    let id = &reply.build_id;
    let of_request = style
        .request
        .as_ref()
        .map(|request| format!(" of {request}"))
        .unwrap_or_default();
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
            let line = format!(
                "build {id}: {repo}/{target} accepted (ref {}, {ahead})",
                git_ref.as_deref().unwrap_or("default")
            );
            let note =
                (*queue_position > 0).then(|| format!("queued behind {queue_position} request(s)"));
            (vec![line], note)
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
            let line = format!(
                "build {id}: rev {}, {} host{}: {names}",
                short_rev(rev.as_deref()),
                hosts.len(),
                if hosts.len() == 1 { "" } else { "s" }
            );
            (
                vec![line],
                Some(format!("building {} host(s)", hosts.len())),
            )
        }
        Event::HostStarted { host, index, total } => {
            let lines = if style.live {
                Vec::new()
            } else {
                vec![format!("[{index}/{total}] {host}: building")]
            };
            (lines, Some(format!("host {index} of {total}: {host}")))
        }
        Event::Progress {
            host,
            done,
            expected,
            ..
        } => {
            if *expected == 0 {
                return (Vec::new(), None);
            }
            let note = Some(format!("{host}: {done}/{expected} derivations"));
            // Without a status line, a line when this host's counts change.
            let seen = state
                .building
                .get(host)
                .is_some_and(|p| (p.done, p.expected) == (*done, *expected));
            if style.live || seen {
                return (Vec::new(), note);
            }
            let line = format!(
                "{} {host}: {done}/{expected} derivations built",
                state.position(host)
            );
            (vec![line], note)
        }
        Event::Log { host, lines } => (
            lines
                .iter()
                .map(|line| format!("  {host} | {line}"))
                .collect(),
            None,
        ),
        Event::HostFinished {
            host,
            status,
            duration_ms,
            out_path,
            cached,
            error,
            machines,
            changes,
            ..
        } => {
            let position = state.position(host);
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
                if style.all_changes {
                    lines.extend(changes_lines(changes).iter().map(|l| format!("      {l}")));
                }
            }
            (lines, Some(format!("{host}: {status}")))
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
            // A failing host's error was shown with the host; the
            // request's own error says what no host says.
            if let Some(error) = error {
                if hosts.is_empty() || *status == BuildStatus::Cancelled || !skipped.is_empty() {
                    lines.push(format!("build {id}: {}", error.code));
                    lines.extend(indent_error(error));
                }
            }
            let mut summary = format!(
                "build {id}{of_request} {status}: {succeeded} succeeded, {failed} failed in {took} (rev {})",
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
            (lines, None)
        }
        Event::Rejected { error, .. } => {
            let mut lines = vec![format!("build {id}{of_request} rejected ({})", error.code)];
            lines.extend(indent_error(error));
            (lines, None)
        }
        Event::Interrupted { resume: true } => (
            vec![format!(
                "build {id}: the builder is restarting; waiting for it to resume the build"
            )],
            Some("the builder is restarting; waiting for it to resume".to_owned()),
        ),
        Event::Interrupted { resume: false } => (
            vec![format!("build {id}: the builder is stopping")],
            Some("the builder is stopping".to_owned()),
        ),
        Event::Resumed { done, .. } => (
            vec![match done.len() {
                0 => format!("build {id}: resumed"),
                n => format!("build {id}: resumed ({n} hosts already done)"),
            }],
            Some("the builder resumed the build".to_owned()),
        ),
        Event::Heartbeat | Event::Unknown => (Vec::new(), None),
    }
}

/// An error's message, one indented line per line.
fn indent_error(error: &ErrorBody) -> Vec<String> {
    error
        .message
        .lines()
        .map(|line| format!("    {line}"))
        .collect()
}

/// The live status at `now`, `elapsed` into the request: a line per host
/// building (in the hosts' order) with its own time and counts, the first
/// also with the request's time; one `waiting` line while none builds.
pub fn status_lines(state: &BuildState, now: Instant, elapsed: Duration) -> Vec<String> {
    let total = format!("{} in total", human_duration(elapsed));
    let mut building: Vec<(&String, &HostProgress)> = state.building.iter().collect();
    building.sort_by_key(|(host, _)| (state.positions.get(*host).map(|p| p.0), *host));
    if building.is_empty() {
        return vec![format!("  waiting, {total}")];
    }
    building
        .iter()
        .enumerate()
        .map(|(n, (host, progress))| {
            let mut details = human_duration(now.saturating_duration_since(progress.since));
            if progress.waiting_for_memory {
                details.push_str(", waiting for memory");
            }
            if progress.expected > 0 {
                details.push_str(&format!(", {}/{} drvs", progress.done, progress.expected));
            }
            if let Some(drv) = &progress.building {
                details.push_str(&format!(", building {drv}"));
            }
            let which = match state.positions.get(*host) {
                Some((index, of)) => format!("host {index} of {of}: {host}"),
                None => (*host).clone(),
            };
            let mut line = format!("  building {which} ({details})");
            if n == 0 {
                line.push_str(&format!(", {total}"));
            }
            printable_line(&line).into_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::protocol::{Changes, ErrorCode, HostSummary, SkippedHost};

    fn reply(event: Event) -> Reply {
        Reply::new("b1", event)
    }

    fn plain() -> Style {
        Style::default()
    }

    fn live() -> Style {
        Style {
            live: true,
            ..Style::default()
        }
    }

    /// Shows `events` in order, each given the state before it, as the
    /// CLI and the MCP server do; returns what each showed.
    fn show_all(events: Vec<Event>, style: &Style, state: &mut BuildState) -> Vec<Shown> {
        events
            .into_iter()
            .map(|event| {
                let shown = describe(&reply(event.clone()), state, style);
                state.apply(&event, Instant::now());
                shown
            })
            .collect()
    }

    fn host_started(host: &str, index: usize, total: usize) -> Event {
        Event::HostStarted {
            host: host.into(),
            index,
            total,
        }
    }

    fn progress(host: &str, done: u64, expected: u64, building: Option<&str>) -> Event {
        Event::Progress {
            host: host.into(),
            done,
            expected,
            building: building.map(Into::into),
            machine: None,
            waiting_for_memory: false,
        }
    }

    fn host_finished(host: &str, status: HostStatus, error: Option<ErrorBody>) -> Event {
        Event::HostFinished {
            host: host.into(),
            status,
            duration_ms: 1500,
            out_path: (status == HostStatus::Success).then(|| format!("/nix/store/x-{host}")),
            cached: false,
            error,
            machines: BTreeMap::new(),
            changes: None,
            closure_size: None,
        }
    }

    fn finished(status: BuildStatus, hosts: Vec<HostSummary>, error: Option<ErrorBody>) -> Event {
        Event::Finished {
            repo: "demo".into(),
            target: "all".into(),
            rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
            status,
            duration_ms: 1800,
            succeeded: hosts
                .iter()
                .filter(|h| h.status == HostStatus::Success)
                .count(),
            failed: hosts
                .iter()
                .filter(|h| h.status != HostStatus::Success)
                .count(),
            hosts,
            skipped: vec![],
            error,
            omitted_hosts: 0,
        }
    }

    fn summary(host: &str, status: HostStatus) -> HostSummary {
        HostSummary {
            host: host.into(),
            status,
            duration_ms: 1500,
            out_path: None,
            cached: false,
            changed_packages: None,
            size_delta: None,
        }
    }

    #[test]
    fn accepted_notes_only_a_wait_in_the_queue() {
        let accepted = |queue_position| Event::Accepted {
            builder: None,
            request_digest: None,
            repo: "demo".into(),
            target: "ns1".into(),
            git_ref: None,
            queue_position,
            heartbeat_ms: 0,
        };
        let now = describe(&reply(accepted(0)), &BuildState::default(), &plain());
        assert_eq!(
            now.lines,
            ["build b1: demo/ns1 accepted (ref default, starting now)"]
        );
        assert_eq!(now.note, None);
        let queued = describe(&reply(accepted(2)), &BuildState::default(), &plain());
        assert_eq!(
            queued.lines,
            ["build b1: demo/ns1 accepted (ref default, 2 ahead in the queue)"]
        );
        assert_eq!(queued.note.as_deref(), Some("queued behind 2 request(s)"));
    }

    #[test]
    fn started_lists_at_most_twenty_hosts() {
        let hosts: Vec<String> = (1..=22).map(|n| format!("h{n}")).collect();
        let shown = describe(
            &reply(Event::Started {
                repo: "demo".into(),
                target: "all".into(),
                rev: None,
                hosts,
                skipped: vec![],
            }),
            &BuildState::default(),
            &plain(),
        );
        assert_eq!(shown.lines.len(), 1);
        assert!(
            shown.lines[0].starts_with("build b1: rev -, 22 hosts: h1, h2,"),
            "{shown:?}"
        );
        assert!(shown.lines[0].ends_with(", h20, ... (2 more)"), "{shown:?}");
        assert_eq!(shown.note.as_deref(), Some("building 22 host(s)"));
    }

    #[test]
    fn a_started_host_has_a_line_only_without_a_live_status() {
        let event = reply(host_started("ns1", 2, 5));
        let shown = describe(&event, &BuildState::default(), &plain());
        assert_eq!(shown.lines, ["[2/5] ns1: building"]);
        assert_eq!(shown.note.as_deref(), Some("host 2 of 5: ns1"));
        let shown = describe(&event, &BuildState::default(), &live());
        assert!(shown.lines.is_empty(), "{shown:?}");
        assert_eq!(shown.note.as_deref(), Some("host 2 of 5: ns1"));
    }

    #[test]
    fn interleaved_progress_lines_carry_each_hosts_own_position_once_per_count() {
        let shown = show_all(
            vec![
                host_started("a", 1, 2),
                host_started("b", 2, 2),
                progress("a", 0, 0, None),
                progress("a", 1, 4, Some("x")),
                progress("b", 0, 3, None),
                // The same counts again (a new derivation building): no line.
                progress("a", 1, 4, Some("y")),
                progress("b", 1, 3, None),
            ],
            &plain(),
            &mut BuildState::default(),
        );
        let lines: Vec<&String> = shown.iter().flat_map(|s| &s.lines).collect();
        assert_eq!(
            lines,
            [
                "[1/2] a: building",
                "[2/2] b: building",
                "[1/2] a: 1/4 derivations built",
                "[2/2] b: 0/3 derivations built",
                "[2/2] b: 1/3 derivations built",
            ]
        );
        // Counts not yet known say nothing; known ones are noted each time.
        assert_eq!(shown[2], Shown::default());
        assert_eq!(shown[5].note.as_deref(), Some("a: 1/4 derivations"));
    }

    #[test]
    fn progress_of_a_host_never_seen_starting_has_no_position() {
        let shown = describe(
            &reply(progress("ghost", 1, 2, None)),
            &BuildState::default(),
            &plain(),
        );
        assert_eq!(shown.lines, ["[-] ghost: 1/2 derivations built"]);
        let shown = describe(
            &reply(progress("ghost", 1, 2, None)),
            &BuildState::default(),
            &live(),
        );
        assert!(shown.lines.is_empty(), "{shown:?}");
    }

    #[test]
    fn a_finished_host_keeps_its_own_position_after_later_hosts_started() {
        let error = ErrorBody::new(ErrorCode::BuildFailed, "error: boom\n> last line");
        let shown = show_all(
            vec![
                host_started("a", 1, 2),
                host_started("b", 2, 2),
                host_finished("a", HostStatus::Failed, Some(error)),
                host_finished("b", HostStatus::Success, None),
            ],
            &live(),
            &mut BuildState::default(),
        );
        assert_eq!(
            shown[2].lines,
            [
                "[1/2] a: FAILED in 1.5s (build_failed)",
                "    error: boom",
                "    > last line"
            ]
        );
        assert_eq!(shown[2].note.as_deref(), Some("a: failed"));
        assert_eq!(
            shown[3].lines,
            ["[2/2] b: success in 1.5s -> /nix/store/x-b"]
        );
    }

    #[test]
    fn a_finished_host_names_remote_machines_and_its_changes() {
        let changes = Changes {
            against: crate::protocol::Against {
                out_path: "/nix/store/aaaa-old".into(),
                rev: None,
            },
            packages: vec![crate::protocol::ChangedPackage {
                name: "openssl".into(),
                before: vec!["3.0.14".into()],
                after: vec!["3.0.15".into()],
                size_delta: 0,
            }],
            more: 0,
            rebuilt: crate::protocol::Rebuilt::default(),
            closure_size: 2048,
            closure_size_delta: 0,
        };
        let event = Event::HostFinished {
            host: "a".into(),
            status: HostStatus::Success,
            duration_ms: 10,
            out_path: Some("/nix/store/x-a".into()),
            cached: true,
            error: None,
            machines: BTreeMap::from([(LOCALHOST.to_owned(), 1), ("ssh-ng://b1".to_owned(), 2)]),
            changes: Some(changes),
            closure_size: None,
        };
        let summary_only = describe(&reply(event.clone()), &BuildState::default(), &plain());
        assert_eq!(
            summary_only.lines,
            [
                "[-] a: already built in 10ms -> /nix/store/x-a",
                "  derivations built on localhost: 1, ssh-ng://b1: 2",
                "    1 package changed: openssl 3.0.14 → 3.0.15; closure 2.0 KiB, +0 B",
            ]
        );
        let all = Style {
            all_changes: true,
            ..Style::default()
        };
        let every_package = describe(&reply(event), &BuildState::default(), &all);
        assert_eq!(
            every_package.lines[3..],
            [
                "      openssl 3.0.14 → 3.0.15  +0 B",
                "      compared with /nix/store/aaaa-old (rev -)",
            ]
        );
    }

    #[test]
    fn the_result_names_failing_hosts_and_only_the_requests_own_error() {
        let hosts = vec![
            summary("a", HostStatus::Success),
            summary("b", HostStatus::Failed),
        ];
        // Host b's error was shown with b.
        let shown = describe(
            &reply(finished(
                BuildStatus::Failed,
                hosts.clone(),
                Some(ErrorBody::new(ErrorCode::BuildFailed, "b failed")),
            )),
            &BuildState::default(),
            &plain(),
        );
        assert_eq!(
            shown.lines,
            ["build b1 failed: 1 succeeded, 1 failed in 1.8s (rev 609da7ab2bec); not built: b"]
        );
        assert_eq!(shown.note, None);
        let cancelled = describe(
            &reply(finished(
                BuildStatus::Cancelled,
                hosts,
                Some(ErrorBody::new(ErrorCode::Cancelled, "cancelled by U1")),
            )),
            &BuildState::default(),
            &plain(),
        );
        assert_eq!(
            cancelled.lines[..2],
            ["build b1: cancelled", "    cancelled by U1"]
        );
        let mut skipped = finished(BuildStatus::Failed, vec![], None);
        if let Event::Finished {
            skipped,
            error,
            omitted_hosts,
            ..
        } = &mut skipped
        {
            skipped.push(SkippedHost {
                host: "c".into(),
                reason: "no toplevel".into(),
            });
            *error = Some(ErrorBody::new(
                ErrorCode::HostsSkipped,
                "1 host(s) not built",
            ));
            *omitted_hosts = 3;
        }
        let shown = describe(&reply(skipped), &BuildState::default(), &plain());
        assert_eq!(
            shown.lines,
            [
                "build b1: hosts_skipped",
                "    1 host(s) not built",
                "build b1 failed: 0 succeeded, 0 failed in 1.8s (rev 609da7ab2bec) \
                 (3 more hosts not listed: the result was too large for NATS)",
            ]
        );
    }

    #[test]
    fn a_reader_who_missed_accepted_is_told_the_request() {
        let style = Style {
            request: Some("demo/ns1".into()),
            ..Style::default()
        };
        let shown = describe(
            &reply(finished(
                BuildStatus::Success,
                vec![summary("ns1", HostStatus::Success)],
                None,
            )),
            &BuildState::default(),
            &style,
        );
        assert_eq!(
            shown.lines,
            ["build b1 of demo/ns1 success: 1 succeeded, 0 failed in 1.8s (rev 609da7ab2bec)"]
        );
        let rejected = Event::Rejected {
            request_digest: None,
            error: ErrorBody::new(ErrorCode::UnknownRepo, "repo \"x\" is not configured"),
        };
        assert_eq!(
            describe(&reply(rejected.clone()), &BuildState::default(), &style).lines,
            [
                "build b1 of demo/ns1 rejected (unknown_repo)",
                "    repo \"x\" is not configured"
            ]
        );
        assert_eq!(
            describe(&reply(rejected), &BuildState::default(), &plain()).lines[0],
            "build b1 rejected (unknown_repo)"
        );
    }

    #[test]
    fn restarts_are_told_and_heartbeats_are_not() {
        let shown = |event| describe(&reply(event), &BuildState::default(), &plain());
        assert_eq!(
            shown(Event::Interrupted { resume: true }).lines,
            ["build b1: the builder is restarting; waiting for it to resume the build"]
        );
        assert_eq!(
            shown(Event::Interrupted { resume: false }).note.as_deref(),
            Some("the builder is stopping")
        );
        let resumed = shown(Event::Resumed {
            done: vec!["a".into(), "b".into()],
            heartbeat_ms: 0,
        });
        assert_eq!(resumed.lines, ["build b1: resumed (2 hosts already done)"]);
        assert_eq!(
            resumed.note.as_deref(),
            Some("the builder resumed the build")
        );
        assert_eq!(shown(Event::Heartbeat), Shown::default());
        assert_eq!(shown(Event::Unknown), Shown::default());
        let log = shown(Event::Log {
            host: "a".into(),
            lines: vec!["one".into(), "two".into()],
        });
        assert_eq!(log.lines, ["  a | one", "  a | two"]);
        assert_eq!(log.note, None);
    }

    /// Whether `text` holds a character that acts on a terminal.
    fn has_controls(text: &str) -> bool {
        text.chars()
            .any(|c| c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c))
    }

    #[test]
    fn wire_text_is_escaped_and_stays_on_its_line() {
        let host = "a\x1b]0;title\x07\n[9/9] b: success\u{202e}";
        let error = ErrorBody::new(ErrorCode::BuildFailed, "boom\x1b[2K\r\nnext\u{9b}1A");
        let mut state = BuildState::default();
        let shown = show_all(
            vec![
                host_started(host, 1, 1),
                progress(host, 1, 2, Some("drv\x1b[1A")),
                Event::Log {
                    host: host.into(),
                    lines: vec!["out\x1b[2J\rput".into()],
                },
                host_finished(host, HostStatus::Failed, Some(error)),
            ],
            &plain(),
            &mut state,
        );
        for shown in &shown {
            for text in shown.lines.iter().chain(&shown.note) {
                assert!(!has_controls(text), "{text:?}");
            }
        }
        let escaped_host = "a\\x1b]0;title\\x07\\x0a[9/9] b: success\\u{202e}";
        assert_eq!(shown[0].lines, [format!("[1/1] {escaped_host}: building")]);
        assert_eq!(shown[0].note, Some(format!("host 1 of 1: {escaped_host}")));
        assert_eq!(
            shown[2].lines,
            [format!("  {escaped_host} | out\\x1b[2J\\x0dput")]
        );
        assert_eq!(shown[3].lines[1..], ["    boom\\x1b[2K", "    next\\x9b1A"]);
        // The live status, drawn from the state, too.
        let mut live_state = BuildState::default();
        show_all(
            vec![
                host_started(host, 1, 1),
                progress(host, 1, 2, Some("drv\x1b[1A")),
            ],
            &live(),
            &mut live_state,
        );
        let status = status_lines(&live_state, Instant::now(), Duration::ZERO);
        assert_eq!(status.len(), 1);
        assert!(!has_controls(&status[0]), "{status:?}");
        assert!(status[0].contains("building drv\\x1b[1A"), "{status:?}");
    }

    #[test]
    fn the_live_status_keeps_each_building_hosts_own_counts() {
        let t0 = Instant::now();
        let mut state = BuildState::default();
        let at = |secs| t0 + Duration::from_secs(secs);
        state.apply(&host_started("a", 1, 3), at(0));
        state.apply(&host_started("b", 2, 3), at(5));
        state.apply(&progress("b", 1, 4, Some("bar")), at(6));
        state.apply(&progress("a", 2, 10, Some("foo")), at(7));
        state.apply(&progress("b", 2, 4, None), at(8));
        state.apply(&progress("a", 3, 10, Some("baz")), at(9));
        assert_eq!(
            status_lines(&state, at(12), Duration::from_secs(20)),
            [
                "  building host 1 of 3: a (12.0s, 3/10 drvs, building baz), 20.0s in total",
                "  building host 2 of 3: b (7.0s, 2/4 drvs)",
            ]
        );
        // A host's entry goes when it finishes; a late progress of it does
        // not bring it back.
        state.apply(&host_finished("a", HostStatus::Success, None), at(13));
        state.apply(&progress("a", 10, 10, None), at(13));
        state.apply(&host_started("c", 3, 3), at(14));
        assert_eq!(
            status_lines(&state, at(15), Duration::from_secs(23)),
            [
                "  building host 2 of 3: b (10.0s, 2/4 drvs), 23.0s in total",
                "  building host 3 of 3: c (1.0s)",
            ]
        );
        state.apply(&host_finished("b", HostStatus::Success, None), at(16));
        state.apply(&host_finished("c", HostStatus::Success, None), at(16));
        assert_eq!(
            status_lines(&state, at(16), Duration::from_secs(24)),
            ["  waiting, 24.0s in total"]
        );
    }

    #[test]
    fn a_host_waiting_for_memory_says_so_until_it_no_longer_does() {
        let t0 = Instant::now();
        let mut state = BuildState::default();
        state.apply(&host_started("a", 1, 2), t0);
        let waiting = Event::Progress {
            host: "a".into(),
            done: 0,
            expected: 0,
            building: None,
            machine: None,
            waiting_for_memory: true,
        };
        state.apply(&waiting, t0);
        assert_eq!(
            status_lines(&state, t0, Duration::from_secs(3)),
            ["  building host 1 of 2: a (0ms, waiting for memory), 3.0s in total"]
        );
        state.apply(&progress("a", 1, 2, None), t0);
        assert!(
            !status_lines(&state, t0, Duration::from_secs(3))[0].contains("memory"),
            "no longer waiting"
        );
    }

    #[test]
    fn the_state_counts_finished_hosts_across_a_restart() {
        let mut state = BuildState::default();
        let now = Instant::now();
        assert_eq!((state.finished(), state.total()), (0, None));
        state.apply(
            &Event::Started {
                repo: "demo".into(),
                target: "all".into(),
                rev: None,
                hosts: vec!["a".into(), "b".into(), "c".into()],
                skipped: vec![],
            },
            now,
        );
        state.apply(&host_started("a", 1, 3), now);
        state.apply(&host_finished("a", HostStatus::Success, None), now);
        state.apply(&host_started("b", 2, 3), now);
        // Nothing builds while the builder is away.
        state.apply(&Event::Interrupted { resume: true }, now);
        assert_eq!(
            status_lines(&state, now, Duration::ZERO),
            ["  waiting, 0ms in total"]
        );
        state.apply(
            &Event::Resumed {
                done: vec!["a".into(), "c".into()],
                heartbeat_ms: 0,
            },
            now,
        );
        assert_eq!((state.finished(), state.total()), (2, Some(3)));
    }
}
