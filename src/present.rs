//! How builds and the builder read for people, the same in the CLI and in
//! the MCP server's tool results: durations, revisions, sizes, what a
//! result changes, the status report and the outcome of a cancel; a
//! build's events in [`events`].

use std::time::Duration;

pub mod events;

use crate::client::StatusAnswer;
use crate::protocol::{
    BuilderStatus, CancelOutcome, CancelledState, ChangedPackage, Changes, RunningBuild,
};
use crate::signing::Signature;

/// Formats a duration the way people read build times: `850ms`, `12.3s`,
/// `4m05s`, `1h02m`.
pub fn human_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    let secs = duration.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if secs < 60 {
        format!("{:.1}s", duration.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// A commit as people quote it: its first 12 digits, or `-` for none.
pub fn short_rev(rev: Option<&str>) -> &str {
    rev.map(|r| r.get(..12).unwrap_or(r)).unwrap_or("-")
}

/// A size in bytes with a binary unit: `412 B`, `10.0 KiB`, `1.2 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Display only: the rounding of a u64 to f64 does not matter.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A size change with its sign: `+1.3 MiB`, `-412 B`, `+0 B`.
pub fn human_size_delta(delta: i64) -> String {
    let sign = if delta < 0 { '-' } else { '+' };
    format!("{sign}{}", human_size(delta.unsigned_abs()))
}

/// Versions as people read them: `3.0.14`, `{3.11.9, 3.12.4}`; a path
/// without a version shows as `∅`.
fn versions(list: &[String]) -> String {
    let shown: Vec<&str> = list
        .iter()
        .map(|v| if v.is_empty() { "∅" } else { v.as_str() })
        .collect();
    match shown.as_slice() {
        [one] => (*one).to_owned(),
        many => format!("{{{}}}", many.join(", ")),
    }
}

/// One package's change: `openssl 3.0.14 → 3.0.15`, `htop 3.3.0 (added)`,
/// `nano 8.0 (removed)`.
pub fn package_change(package: &ChangedPackage) -> String {
    let name = &package.name;
    let (before, after) = (&package.before, &package.after);
    let unversioned = |list: &[String]| list.iter().all(String::is_empty);
    match (before.is_empty(), after.is_empty()) {
        (true, _) if unversioned(after) => format!("{name} (added)"),
        (true, _) => format!("{name} {} (added)", versions(after)),
        (_, true) if unversioned(before) => format!("{name} (removed)"),
        (_, true) => format!("{name} {} (removed)", versions(before)),
        _ => format!("{name} {} → {}", versions(before), versions(after)),
    }
}

/// How many packages the one-line summary names before `, …`.
const SUMMARY_PACKAGES: usize = 5;

/// What a result changes, in one line: `3 packages changed: openssl 3.0.14
/// → 3.0.15, …; closure 1.2 GiB, +1.3 MiB`.
pub fn changes_summary(changes: &Changes) -> String {
    let count = changes.changed_packages();
    let mut text = match count {
        0 => "no packages changed".to_owned(),
        1 => "1 package changed: ".to_owned(),
        n => format!("{n} packages changed: "),
    };
    let named: Vec<String> = changes
        .packages
        .iter()
        .take(SUMMARY_PACKAGES)
        .map(package_change)
        .collect();
    text.push_str(&named.join(", "));
    if count > named.len() {
        text.push_str(", …");
    }
    if changes.rebuilt.packages > 0 {
        text.push_str(&format!(
            "; {} rebuilt at the same version",
            changes.rebuilt.packages
        ));
    }
    text.push_str(&format!(
        "; closure {}, {}",
        human_size(changes.closure_size),
        human_size_delta(changes.closure_size_delta)
    ));
    text
}

/// What a result changes, one line per package (for `--changes`), then
/// what is not listed and what it was compared with.
pub fn changes_lines(changes: &Changes) -> Vec<String> {
    let width = changes
        .packages
        .iter()
        .map(|p| package_change(p).chars().count())
        .max()
        .unwrap_or(0);
    let mut lines: Vec<String> = changes
        .packages
        .iter()
        .map(|p| {
            format!(
                "{:<width$}  {}",
                package_change(p),
                human_size_delta(p.size_delta)
            )
        })
        .collect();
    if changes.more > 0 {
        lines.push(format!(
            "… and {} more packages with smaller size changes",
            changes.more
        ));
    }
    if changes.rebuilt.packages > 0 {
        lines.push(format!(
            "{} packages rebuilt at the same version, {}",
            changes.rebuilt.packages,
            human_size_delta(changes.rebuilt.size_delta)
        ));
    }
    lines.push(format!(
        "compared with {} (rev {})",
        changes.against.out_path,
        short_rev(changes.against.rev.as_deref())
    ));
    lines
}

/// Where the running build is: fetching, between hosts, or the hosts
/// building now (several with `parallel_hosts`), each with its progress.
fn building_hosts(running: &RunningBuild) -> String {
    let Some(total) = running.total else {
        return ", fetching".to_owned();
    };
    if running.hosts.is_empty() {
        return format!(", {} of {total} hosts done", running.finished);
    }
    let indices: Vec<String> = running.hosts.iter().map(|h| h.index.to_string()).collect();
    let hosts: Vec<String> = running
        .hosts
        .iter()
        .map(|h| match h.expected {
            0 => h.host.clone(),
            expected => format!("{} ({}/{expected} drvs)", h.host, h.done),
        })
        .collect();
    let noun = if hosts.len() == 1 { "host" } else { "hosts" };
    format!(
        ", {noun} {} of {total}: {}",
        indices.join(", "),
        hosts.join(", ")
    )
}

/// The status as people read it.
pub fn status_report(status: &BuilderStatus) -> String {
    let mut text = format!("homelab-deploy builder {}\n", status.version);
    let repos: Vec<String> = status
        .repos
        .iter()
        .map(|r| match &r.git_ref {
            Some(git_ref) => format!("{} (ref {git_ref})", r.name),
            None => format!("{} (default branch)", r.name),
        })
        .collect();
    text.push_str(&format!("repos: {}\n", repos.join(", ")));
    if let Some(url) = &status.web_url {
        text.push_str(&format!("page: {url}\n"));
    }
    match &status.running {
        Some(running) => {
            let mut host = building_hosts(running);
            if !running.waiting_for_memory.is_empty() {
                host.push_str(&format!(
                    "; waiting for memory to evaluate: {}",
                    running.waiting_for_memory.join(", ")
                ));
            }
            text.push_str(&format!(
                "running: {} {}/{}{host}, since {}{}\n",
                running.build_id,
                running.repo,
                running.target,
                running.started_at,
                owned_by(running.owner.as_deref())
                    + if running.resumed {
                        ", resumed after a restart"
                    } else {
                        ""
                    }
            ));
        }
        None => text.push_str("running: nothing\n"),
    }
    if status.queue.is_empty() {
        text.push_str("queue: empty\n");
    } else {
        text.push_str(&format!("queue: {} waiting\n", status.queue.len()));
        for queued in &status.queue {
            text.push_str(&format!(
                "  {} {}/{} (ref {}), since {}{}\n",
                queued.build_id,
                queued.repo,
                queued.target,
                queued.git_ref.as_deref().unwrap_or("default"),
                queued.queued_at,
                owned_by(queued.owner.as_deref())
                    + if queued.resumed {
                        ", resumed after a restart"
                    } else {
                        ""
                    }
            ));
        }
    }
    if !status.machines.is_empty() {
        text.push_str("remote builders:\n");
        for machine in &status.machines {
            let state = match (machine.up, &machine.checked_at) {
                (Some(true), Some(at)) => format!("up (checked {at})"),
                (Some(false), Some(at)) => format!(
                    "DOWN (checked {at}): {}",
                    machine.error.as_deref().unwrap_or("unreachable")
                ),
                _ => "not checked yet".to_owned(),
            };
            text.push_str(&format!("  {} {state}\n", machine.machine));
        }
    }
    if status.last_results.is_empty() {
        text.push_str("last results: none yet\n");
    } else {
        text.push_str("last results:\n");
        let width = status
            .last_results
            .iter()
            .map(|r| {
                r.repo.len()
                    + r.host.len()
                    + 1
                    + r.git_ref.as_ref().map_or(0, |g| g.len() + 3)
                    + if r.git_ref.is_none() && r.pinned {
                        6
                    } else {
                        0
                    }
            })
            .max()
            .unwrap_or(0);
        for result in &status.last_results {
            let mut name = format!("{}/{}", result.repo, result.host);
            if let Some(git_ref) = &result.git_ref {
                name.push_str(&format!(" ({git_ref})"));
            } else if result.pinned {
                name.push_str(" (rev)");
            }
            let rev = short_rev(result.rev.as_deref());
            text.push_str(&format!(
                "  {name:<width$}  {:<9} rev {rev:<12}  {}  {}\n",
                result.status.as_str(),
                result.finished_at,
                result.out_path.as_deref().unwrap_or("-")
            ));
        }
    }
    if status.omitted_results > 0 {
        text.push_str(&format!(
            "  ({} older results not listed: the status was too large for NATS)\n",
            status.omitted_results
        ));
    }
    text
}

/// The line that heads one builder's status: its name and how its answer
/// was signed (builders may share a name; their keys tell them apart).
pub fn builder_heading(name: Option<&str>, signature: &Signature) -> String {
    let name = name.map_or_else(
        || "unnamed builder".to_owned(),
        |name| format!("builder {name}"),
    );
    match signature {
        Signature::Valid(key) => format!("{name} (key {key}, signed)"),
        Signature::Unsigned => format!("{name} (unsigned)"),
        Signature::Invalid(why) => format!("{name} (signature not valid: {why})"),
    }
}

/// Every builder's status in the order given, each under its
/// [`builder_heading`], with a blank line between builders.
pub fn status_reports(answers: &[StatusAnswer]) -> String {
    answers
        .iter()
        .map(|answer| {
            format!(
                "{}\n{}",
                builder_heading(answer.status.builder.as_deref(), &answer.signature),
                status_report(&answer.status)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `, by U…` for a signed request, nothing otherwise.
fn owned_by(owner: Option<&str>) -> String {
    owner.map_or_else(String::new, |key| format!(", by {key}"))
}

/// What a cancel did, in one line; `true` when it was refused or found
/// nothing to cancel.
pub fn cancel_outcome(outcome: &CancelOutcome) -> (String, bool) {
    let id = &outcome.build_id;
    match (&outcome.error, outcome.state) {
        (Some(error), _) => (format!("{} ({})", error.message, error.code), true),
        (None, Some(CancelledState::Running)) => {
            (format!("build {id}: cancelled while running"), false)
        }
        (None, Some(CancelledState::Queued)) => {
            (format!("build {id}: cancelled while queued"), false)
        }
        (None, Some(CancelledState::Finishing)) => (
            format!(
                "build {id}: too late to cancel: every host was done; it ends with its own result"
            ),
            true,
        ),
        (None, Some(CancelledState::Unknown)) => (
            format!(
                "build {id}: not cancelled (the builder gave a state this client does not know)"
            ),
            true,
        ),
        (None, None) => (
            format!(
                "build {id}: no running or queued build has this id (already finished, or unknown)"
            ),
            true,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{HostStatus, LastResult, QueuedBuild, RepoInfo, RunningHost};

    #[test]
    fn status_reads_as_a_summary() {
        let status = BuilderStatus {
            builder: None,
            version: "0.1.0".into(),
            repos: vec![
                RepoInfo {
                    name: "nixos-servers".into(),
                    git_ref: Some("master".into()),
                },
                RepoInfo {
                    name: "nixos".into(),
                    git_ref: None,
                },
            ],
            running: Some(RunningBuild {
                rev: None,
                owner: None,
                resumed: false,
                build_id: "b1".into(),
                repo: "nixos-servers".into(),
                target: "all".into(),
                git_ref: Some("master".into()),
                hosts: vec![RunningHost {
                    host: "ns1".into(),
                    index: 3,
                    done: 0,
                    expected: 0,
                }],
                finished: 2,
                waiting_for_memory: vec!["ns5".into()],
                total: Some(16),
                started_at: "2026-11-28T01:00:00Z".into(),
            }),
            queue: vec![QueuedBuild {
                owner: None,
                resumed: false,
                build_id: "b2".into(),
                repo: "nixos".into(),
                target: "gunter".into(),
                git_ref: None,
                queued_at: "2026-11-28T01:01:00Z".into(),
            }],
            last_results: vec![LastResult {
                repo: "nixos-servers".into(),
                host: "ns2".into(),
                status: HostStatus::Failed,
                rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
                out_path: None,
                finished_at: "2026-11-28T00:59:00Z".into(),
                git_ref: None,
                pinned: false,
            }],
            machines: vec![],
            omitted_results: 0,
            web_url: Some("http://nix-cache02:9973/".into()),
        };
        let text = status_report(&status);
        assert!(
            text.contains("repos: nixos-servers (ref master), nixos (default branch)\npage: http://nix-cache02:9973/\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "running: b1 nixos-servers/all, host 3 of 16: ns1; waiting for memory to evaluate: ns5, since 2026-11-28T01:00:00Z"
            ),
            "{text}"
        );
        assert!(
            text.contains("queue: 1 waiting\n  b2 nixos/gunter (ref default)"),
            "{text}"
        );
        assert!(
            text.contains("nixos-servers/ns2  failed    rev 609da7ab2bec"),
            "{text}"
        );
    }

    fn bare_status(name: Option<&str>) -> BuilderStatus {
        BuilderStatus {
            builder: name.map(str::to_owned),
            version: "0.1.0".into(),
            repos: vec![RepoInfo {
                name: "nixos".into(),
                git_ref: None,
            }],
            running: None,
            queue: vec![],
            last_results: vec![],
            machines: vec![],
            omitted_results: 0,
            web_url: None,
        }
    }

    #[test]
    fn a_builder_is_headed_by_its_name_and_how_it_signed() {
        let key = format!("U{}", "A".repeat(55));
        assert_eq!(
            builder_heading(Some("nix-cache02"), &Signature::Valid(key.clone())),
            format!("builder nix-cache02 (key {key}, signed)")
        );
        assert_eq!(
            builder_heading(Some("nix-cache02"), &Signature::Unsigned),
            "builder nix-cache02 (unsigned)"
        );
        assert_eq!(
            builder_heading(None, &Signature::Invalid("the signature does not match")),
            "unnamed builder (signature not valid: the signature does not match)"
        );
    }

    #[test]
    fn several_builders_read_one_after_the_other() {
        let key = format!("U{}", "B".repeat(55));
        let answer = |name, signature| StatusAnswer {
            status: bare_status(name),
            raw: bytes::Bytes::new(),
            signature,
        };
        let one = status_reports(&[answer(Some("a"), Signature::Unsigned)]);
        assert_eq!(
            one,
            format!(
                "builder a (unsigned)\n{}",
                status_report(&bare_status(Some("a")))
            )
        );
        let two = status_reports(&[
            answer(Some("a"), Signature::Valid(key.clone())),
            answer(Some("a"), Signature::Unsigned),
        ]);
        assert_eq!(
            two,
            format!(
                "builder a (key {key}, signed)\n{body}\nbuilder a (unsigned)\n{body}",
                body = status_report(&bare_status(Some("a")))
            )
        );
        assert!(two.contains("last results: none yet\n\nbuilder a (unsigned)\n"));
        assert_eq!(status_reports(&[]), "");
    }

    fn example_changes() -> Changes {
        let package = |name: &str, before: &[&str], after: &[&str], size_delta| ChangedPackage {
            name: name.into(),
            before: before.iter().map(|s| (*s).to_owned()).collect(),
            after: after.iter().map(|s| (*s).to_owned()).collect(),
            size_delta,
        };
        Changes {
            against: crate::protocol::Against {
                out_path: "/nix/store/aaaa-nixos-system-ns1".into(),
                rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
            },
            packages: vec![
                package("htop", &[], &["3.3.0"], 412_000),
                package("openssl", &["3.0.14"], &["3.0.15"], 10_240),
                package("nano", &["8.0"], &[], -300),
                package("python3", &["3.11.9", "3.12.4"], &["3.12.4"], -20),
                package("system-path", &[""], &[], 0),
            ],
            more: 2,
            rebuilt: crate::protocol::Rebuilt {
                packages: 12,
                size_delta: 4096,
            },
            closure_size: 1_288_490_188,
            closure_size_delta: 1_372_160,
        }
    }

    #[test]
    fn changes_read_as_one_line() {
        assert_eq!(
            changes_summary(&example_changes()),
            "7 packages changed: htop 3.3.0 (added), openssl 3.0.14 → 3.0.15, nano 8.0 (removed), \
             python3 {3.11.9, 3.12.4} → 3.12.4, system-path (removed), …; \
             12 rebuilt at the same version; closure 1.2 GiB, +1.3 MiB"
        );
        let unchanged = Changes {
            packages: vec![],
            more: 0,
            rebuilt: crate::protocol::Rebuilt::default(),
            closure_size_delta: 0,
            ..example_changes()
        };
        assert_eq!(
            changes_summary(&unchanged),
            "no packages changed; closure 1.2 GiB, +0 B"
        );
    }

    #[test]
    fn changes_read_as_one_line_per_package() {
        assert_eq!(
            changes_lines(&example_changes()),
            [
                "htop 3.3.0 (added)                 +402.3 KiB",
                "openssl 3.0.14 → 3.0.15            +10.0 KiB",
                "nano 8.0 (removed)                 -300 B",
                "python3 {3.11.9, 3.12.4} → 3.12.4  -20 B",
                "system-path (removed)              +0 B",
                "… and 2 more packages with smaller size changes",
                "12 packages rebuilt at the same version, +4.0 KiB",
                "compared with /nix/store/aaaa-nixos-system-ns1 (rev 609da7ab2bec)",
            ]
        );
    }

    #[test]
    fn sizes_read_with_binary_units() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(1_288_490_188), "1.2 GiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
        assert_eq!(human_size_delta(-412), "-412 B");
        assert_eq!(human_size_delta(i64::MIN), "-8.0 EiB");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_millis(12_340)), "12.3s");
        assert_eq!(human_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(human_duration(Duration::from_secs(3720)), "1h02m");
    }

    #[test]
    fn cancel_outcomes_say_what_happened() {
        let outcome = |state: Option<CancelledState>, error| CancelOutcome {
            build_id: "b1".to_owned(),
            found: state.is_some(),
            state,
            error,
        };
        assert_eq!(
            cancel_outcome(&outcome(Some(CancelledState::Queued), None)),
            ("build b1: cancelled while queued".to_owned(), false)
        );
        let (text, is_error) = cancel_outcome(&outcome(None, None));
        assert!(
            is_error && text.contains("no running or queued build"),
            "{text}"
        );
        let error =
            crate::protocol::ErrorBody::new(crate::protocol::ErrorCode::InvalidRequest, "bad id");
        assert_eq!(
            cancel_outcome(&outcome(None, Some(error))),
            ("bad id (invalid_request)".to_owned(), true)
        );
    }
}
