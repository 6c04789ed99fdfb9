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
}

impl HostProgress {
    fn new(since: Instant) -> Self {
        Self {
            since,
            done: 0,
            expected: 0,
            building: None,
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
