//! Server-rendered pages: `/`, `/builds/<id>`, `/hosts/<repo>/<host>`.
//!
//! Every page is whole without JavaScript: the data is rendered here, and
//! the inlined script (`assets/live.js`) only applies the builder's events
//! to it. The attributes that script (and the browser tests) rely on:
//!
//! - `<body data-page="index|build|host|not-found">`;
//! - index: `<section id="running" data-build-id data-repo>` (attributes
//!   only while a build runs), its hosts `<tr data-running-host>`; queued
//!   builds `<tr data-queued>`; every host's latest result
//!   `<tr data-repo data-host data-status>` in `<table data-repo>`, its
//!   status in `<td class="status">`; recent builds `<tr data-build-id
//!   data-status>` in `<tbody id="recent-rows">`;
//! - build: `<body data-build-id data-status>`, `<span id="build-status">`,
//!   host rows `<tr data-host data-status>` in `<tbody id="host-rows">`;
//! - host: `<body data-repo data-host>`, rows in `<tbody id="history-rows">`.

use std::collections::BTreeMap;

use super::chart::closure_size_chart;
use super::html::{
    build_link, duration, host_link, maybe_time, page, short_rev, size, size_delta, text, time,
};
use crate::history::{
    BuildRecord, BuildSummary, HostHistoryEntry, HostRecord, LatestHost, RecordStatus,
};
use crate::protocol::{BuilderStatus, Changes, ErrorBody, HostStatus, RunningBuild};

/// A table in a scrolling wrapper, then `empty` (what to say without
/// rows): while it has no rows the table is `hidden`, and the style sheet
/// shows the note only then, so a row the script adds replaces it.
fn table(attributes: &str, headings: &str, rows: &str, tbody_id: &str, empty: &str) -> String {
    let hidden = if rows.is_empty() { " hidden" } else { "" };
    let tbody = if tbody_id.is_empty() {
        String::new()
    } else {
        format!(" id=\"{tbody_id}\"")
    };
    format!(
        "<div class=\"table\"{hidden}><table{attributes}><thead><tr>{headings}</tr></thead>\
         <tbody{tbody}>{rows}</tbody></table></div><p class=\"empty\">{empty}</p>"
    )
}

fn code(data: &str) -> String {
    format!("<code>{}</code>", text(data))
}

fn maybe_code(data: Option<&str>) -> String {
    data.map_or_else(|| "–".to_owned(), code)
}

/// `<td class="status">` for a result.
fn status_cell(status: &str) -> String {
    format!("<td class=\"status\">{status}</td>")
}

/// The closure size with its change, as far as known.
fn closure(size_bytes: Option<u64>, delta: Option<i64>) -> String {
    match (size_bytes, delta) {
        (Some(bytes), Some(delta)) => {
            format!("{} <small>{}</small>", size(bytes), size_delta(delta))
        }
        (Some(bytes), None) => size(bytes),
        (None, _) => "–".to_owned(),
    }
}

/// `/`: the build running now, the queue, every host's latest result per
/// repo, and recent builds.
pub fn index(status: &BuilderStatus, latest: &[LatestHost], recent: &[BuildSummary]) -> String {
    // The builder's name tells builders sharing a NATS server apart.
    let name = status
        .builder
        .as_deref()
        .map(|name| format!(" <span class=\"builder\">{}</span>", text(name)))
        .unwrap_or_default();
    let mut out = format!(
        "<header><h1>homelab-deploy{name}</h1><span class=\"version\">{}</span></header>\n<main>\n",
        text(&status.version)
    );
    out.push_str(&running_section(status.running.as_ref()));
    out.push_str(&queue_section(status));
    out.push_str(&hosts_section(status, latest));
    out.push_str(&recent_section(recent));
    out.push_str(&templates());
    out.push_str("</main>");
    page("homelab-deploy", " data-page=\"index\"", &out, true)
}

fn running_section(running: Option<&RunningBuild>) -> String {
    let Some(running) = running else {
        return "<section id=\"running\"><h2>Building now</h2>\
                <p class=\"empty\">Nothing is building.</p></section>\n"
            .to_owned();
    };
    let mut out = format!(
        "<section id=\"running\" data-build-id=\"{}\" data-repo=\"{}\" data-rev=\"{}\">\
         <h2>Building now</h2>\n\
         <p>{} <b>{}</b> · target {} · ref {} · rev <code>{}</code> · started {} · ",
        text(&running.build_id),
        text(&running.repo),
        text(running.rev.as_deref().unwrap_or_default()),
        build_link(&running.build_id),
        text(&running.repo),
        code(&running.target),
        maybe_code(running.git_ref.as_deref()),
        short_rev(running.rev.as_deref()),
        time(&running.started_at),
    );
    match running.total {
        Some(total) => out.push_str(&format!(
            "<span class=\"finished\">{}</span> of <span class=\"total\">{total}</span> hosts done",
            running.finished
        )),
        None => out.push_str("fetching the flake"),
    }
    if running.resumed {
        out.push_str(" · resumed after a restart");
    }
    out.push_str("</p>\n");
    if !running.waiting_for_memory.is_empty() {
        let waiting: Vec<String> = running.waiting_for_memory.iter().map(|h| text(h)).collect();
        out.push_str(&format!(
            "<p class=\"muted\">Waiting for evaluator memory: {}</p>\n",
            waiting.join(", ")
        ));
    }
    let rows: String = running
        .hosts
        .iter()
        .map(|host| {
            let progress = if host.expected == 0 {
                "<progress></progress> evaluating".to_owned()
            } else {
                format!(
                    "<progress value=\"{}\" max=\"{}\"></progress> {}/{}",
                    host.done.min(host.expected),
                    host.expected,
                    host.done,
                    host.expected
                )
            };
            format!(
                "<tr data-running-host=\"{}\"><td class=\"host\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"drvs\">{progress}</td></tr>\n",
                text(&host.host),
                text(&host.host),
                host.index
            )
        })
        .collect();
    out.push_str(&table(
        "",
        RUNNING_HEADINGS,
        &rows,
        "running-rows",
        "No host is building at this moment.",
    ));
    out.push_str("</section>\n");
    out
}

const RUNNING_HEADINGS: &str = "<th>Host</th><th class=\"num\">#</th><th>Derivations</th>";

/// What the script fills with a build's data when one starts, and when a
/// repo first appears while the page is open (inert until then).
fn templates() -> String {
    format!(
        "<template id=\"running-template\"><h2>Building now</h2>\
         <p><a href=\"/\"><code></code></a> <b class=\"repo\"></b> · target \
         <code class=\"target\"></code> · <span class=\"finished\">0</span> of \
         <span class=\"total\">?</span> hosts done</p>{}</template>\n\
         <template id=\"repo-template\"><h3></h3>{}</template>\n",
        table(
            "",
            RUNNING_HEADINGS,
            "",
            "running-rows",
            "No host is building at this moment."
        ),
        table(
            " data-repo=\"\"",
            LATEST_HEADINGS,
            "",
            "",
            "No results yet."
        ),
    )
}

fn queue_section(status: &BuilderStatus) -> String {
    let rows: String = status
        .queue
        .iter()
        .enumerate()
        .map(|(position, queued)| {
            format!(
                "<tr data-queued=\"{}\"><td class=\"num\">{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td></tr>\n",
                text(&queued.build_id),
                position + 1,
                build_link(&queued.build_id),
                text(&queued.repo),
                code(&queued.target),
                maybe_code(queued.git_ref.as_deref()),
                time(&queued.queued_at),
            )
        })
        .collect();
    format!(
        "<section id=\"queue\"><h2>Queue</h2>{}</section>\n",
        table(
            "",
            "<th class=\"num\">#</th><th>Build</th><th>Repo</th><th>Target</th><th>Ref</th>\
             <th>Queued</th>",
            &rows,
            "queue-rows",
            "The queue is empty.",
        )
    )
}

/// The headings of a repo's table of latest results.
const LATEST_HEADINGS: &str = "<th>Host</th><th>Status</th><th>Finished</th><th>Rev</th>\
     <th class=\"num\">Closure</th><th class=\"num\">Changed</th><th>Build</th>";

fn hosts_section(status: &BuilderStatus, latest: &[LatestHost]) -> String {
    // The configured repos in their order, then any others with results.
    let mut repos: Vec<&str> = status.repos.iter().map(|r| r.name.as_str()).collect();
    let mut others: Vec<&str> = latest
        .iter()
        .map(|l| l.repo.as_str())
        .filter(|repo| !repos.contains(repo))
        .collect();
    others.sort_unstable();
    others.dedup();
    repos.extend(others);
    let mut out = String::from("<section id=\"hosts\"><h2>Hosts</h2>\n");
    if repos.is_empty() {
        out.push_str("<p class=\"empty\">No repo is configured.</p>\n");
    }
    for repo in repos {
        let mut hosts: Vec<&LatestHost> = latest.iter().filter(|l| l.repo == repo).collect();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        out.push_str(&format!("<h3>{}</h3>\n", text(repo)));
        let rows: String = hosts.iter().map(|l| latest_row(l)).collect();
        out.push_str(&table(
            &format!(" data-repo=\"{}\"", text(repo)),
            LATEST_HEADINGS,
            &rows,
            "",
            "No results yet.",
        ));
        out.push('\n');
    }
    out.push_str("</section>\n");
    out
}

fn latest_row(latest: &LatestHost) -> String {
    let status = latest.status.as_str();
    format!(
        "<tr data-repo=\"{}\" data-host=\"{}\" data-status=\"{status}\">\
         <td class=\"host\">{}</td>{}<td class=\"when\">{}</td>\
         <td class=\"rev\"><code>{}</code></td><td class=\"closure num\">{}</td>\
         <td class=\"changes num\">{}</td><td class=\"build\">{}</td></tr>\n",
        text(&latest.repo),
        text(&latest.host),
        host_link(&latest.repo, &latest.host),
        status_cell(status),
        time(&latest.finished_at),
        short_rev(latest.rev.as_deref()),
        closure(latest.closure_size, None),
        latest
            .changed_packages
            .map_or_else(|| "–".to_owned(), |n| n.to_string()),
        latest
            .build_id
            .as_deref()
            .map_or_else(|| "–".to_owned(), build_link),
    )
}

fn recent_section(recent: &[BuildSummary]) -> String {
    let rows: String = recent.iter().map(recent_row).collect();
    format!(
        "<section id=\"recent\"><h2>Recent builds</h2>{}</section>\n",
        table(
            "",
            "<th>Build</th><th>Repo</th><th>Target</th><th>Rev</th><th>Status</th>\
             <th>Accepted</th><th class=\"num\">Duration</th><th class=\"num\">Hosts</th>",
            &rows,
            "recent-rows",
            "No build has been recorded yet.",
        )
    )
}

fn recent_row(build: &BuildSummary) -> String {
    let status = build.status.as_str();
    let failed = build
        .hosts
        .iter()
        .filter(|h| h.status != HostStatus::Success)
        .count();
    let failed = if failed == 0 {
        String::new()
    } else {
        format!(" <small>({failed} failed)</small>")
    };
    format!(
        "<tr data-build-id=\"{}\" data-status=\"{status}\"><td class=\"build\">{}</td>\
         <td class=\"repo\">{}</td><td class=\"target\">{}</td>\
         <td class=\"rev\"><code>{}</code></td>{}<td class=\"when\">{}</td>\
         <td class=\"duration num\">{}</td><td class=\"hosts num\">{}{failed}</td></tr>\n",
        text(&build.build_id),
        build_link(&build.build_id),
        text(&build.repo),
        code(&build.target),
        short_rev(build.rev.as_deref()),
        status_cell(status),
        time(&build.accepted_at),
        build.duration_ms.map_or_else(|| "–".to_owned(), duration),
        build.hosts.len(),
    )
}

/// `/builds/<build_id>`.
pub fn build(record: &BuildRecord) -> String {
    let status = record.status.as_str();
    let mut out = format!(
        "<header><a href=\"/\">homelab-deploy</a></header>\n<main>\n\
         <h1>Build <code>{}</code></h1>\n<dl>\
         <dt>Status</dt><dd><span class=\"status\" id=\"build-status\" data-status=\"{status}\">\
         {status}</span></dd>\
         <dt>Repo</dt><dd>{}</dd><dt>Target</dt><dd>{}</dd><dt>Ref</dt><dd>{}</dd>\
         <dt>Rev</dt><dd id=\"build-rev\">{}</dd><dt>Owner</dt><dd>{}</dd>\
         <dt>Accepted</dt><dd>{}</dd><dt>Started</dt><dd>{}</dd>\
         <dt>Finished</dt><dd id=\"build-finished\">{}</dd>\
         <dt>Duration</dt><dd id=\"build-duration\">{}</dd></dl>\n",
        text(&record.build_id),
        text(&record.repo),
        code(&record.target),
        maybe_code(record.git_ref.as_deref()),
        maybe_code(record.rev.as_deref()),
        record
            .owner
            .as_deref()
            .map_or_else(|| "unsigned".to_owned(), code),
        time(&record.accepted_at),
        maybe_time(record.started_at.as_deref()),
        maybe_time(record.finished_at.as_deref()),
        record.duration_ms.map_or_else(|| "–".to_owned(), duration),
    );
    if let Some(error) = &record.error {
        out.push_str(&format!(
            "<section id=\"error\"><h2>Error</h2>{}</section>\n",
            error_block(error)
        ));
    }
    if !record.skipped.is_empty() {
        out.push_str("<section id=\"skipped\"><h2>Skipped hosts</h2><ul>");
        for skipped in &record.skipped {
            out.push_str(&format!(
                "<li><b>{}</b>: {}</li>",
                text(&skipped.host),
                text(&skipped.reason)
            ));
        }
        out.push_str("</ul></section>\n");
    }
    let rows: String = record
        .hosts
        .iter()
        .map(|h| build_host_row(&record.repo, h))
        .collect();
    let running = record.status == RecordStatus::Running;
    let waiting = if running {
        "No host has finished yet."
    } else {
        "No host was built."
    };
    out.push_str(&format!(
        "<section id=\"hosts\"><h2>Hosts</h2>{}\n<div id=\"host-details\">",
        table(
            " id=\"host-table\"",
            "<th>Host</th><th>Status</th><th class=\"num\">Duration</th><th>Built on</th>\
             <th>Cached</th><th>Out path</th><th class=\"num\">Closure</th>",
            &rows,
            "host-rows",
            waiting,
        ),
    ));
    for host in &record.hosts {
        out.push_str(&host_details(host));
    }
    out.push_str("</div></section>\n</main>");
    page(
        &format!("Build {} · homelab-deploy", text(&record.build_id)),
        &format!(
            " data-page=\"build\" data-build-id=\"{}\" data-status=\"{status}\" \
             data-repo=\"{}\"",
            text(&record.build_id),
            text(&record.repo)
        ),
        &out,
        running,
    )
}

/// Where a host's derivations were built: `localhost ×3, ssh-ng://b1 ×5`.
fn machines(machines: &BTreeMap<String, u64>) -> String {
    if machines.is_empty() {
        return "–".to_owned();
    }
    let each: Vec<String> = machines
        .iter()
        .map(|(machine, count)| format!("{} ×{count}", text(machine)))
        .collect();
    each.join(", ")
}

fn build_host_row(repo: &str, host: &HostRecord) -> String {
    let status = host.status.as_str();
    format!(
        "<tr data-host=\"{}\" data-status=\"{status}\"><td class=\"host\">{}</td>{}\
         <td class=\"duration num\">{}</td><td class=\"machines\">{}</td>\
         <td class=\"cached\">{}</td><td class=\"out\">{}</td><td class=\"closure num\">{}</td>\
         </tr>\n",
        text(&host.host),
        host_link(repo, &host.host),
        status_cell(status),
        duration(host.duration_ms),
        machines(&host.machines),
        if host.cached { "cached" } else { "–" },
        maybe_code(host.out_path.as_deref()),
        closure(host.closure_size, host.closure_size_delta),
    )
}

/// A host's changed packages and error, folded; open when it failed.
fn host_details(host: &HostRecord) -> String {
    if host.changes.is_none() && host.error.is_none() {
        return String::new();
    }
    let open = if host.error.is_some() { " open" } else { "" };
    let mut summary = text(&host.host);
    if let Some(changes) = &host.changes {
        summary.push_str(&format!(": {}", changes_count(changes)));
    }
    if let Some(error) = &host.error {
        summary.push_str(&format!(": {}", text(error.code.as_str())));
    }
    let mut out = format!(
        "<details data-host-details=\"{}\"{open}><summary>{summary}</summary>",
        text(&host.host)
    );
    if let Some(changes) = &host.changes {
        out.push_str(&changes_block(changes));
    }
    if let Some(error) = &host.error {
        out.push_str(&error_block(error));
    }
    out.push_str("</details>\n");
    out
}

/// `3 packages changed`.
fn changes_count(changes: &Changes) -> String {
    match changes.changed_packages() {
        0 => "no packages changed".to_owned(),
        1 => "1 package changed".to_owned(),
        n => format!("{n} packages changed"),
    }
}

/// Versions as people read them; a path without a version shows as `∅`.
fn versions(list: &[String]) -> String {
    let shown: Vec<String> = list
        .iter()
        .map(|v| {
            if v.is_empty() {
                "∅".to_owned()
            } else {
                text(v)
            }
        })
        .collect();
    shown.join(", ")
}

/// Every listed package's versions before and after, its size change,
/// then what is not listed and what was compared with.
fn changes_block(changes: &Changes) -> String {
    let mut out = String::new();
    if !changes.packages.is_empty() {
        out.push_str(
            "<table class=\"packages\"><thead><tr><th>Package</th><th>Before</th><th>After</th>\
             <th class=\"num\">Size</th></tr></thead><tbody>",
        );
        for package in &changes.packages {
            let before = if package.before.is_empty() {
                "<i>added</i>".to_owned()
            } else {
                versions(&package.before)
            };
            let after = if package.after.is_empty() {
                "<i>removed</i>".to_owned()
            } else {
                versions(&package.after)
            };
            out.push_str(&format!(
                "<tr><td>{}</td><td>{before}</td><td>→ {after}</td><td class=\"num\">{}</td></tr>",
                text(&package.name),
                size_delta(package.size_delta)
            ));
        }
        out.push_str("</tbody></table>");
    }
    let mut notes = Vec::new();
    if changes.more > 0 {
        notes.push(format!(
            "and {} more with smaller size changes",
            changes.more
        ));
    }
    if changes.rebuilt.packages > 0 {
        notes.push(format!(
            "{} rebuilt at the same version ({})",
            changes.rebuilt.packages,
            size_delta(changes.rebuilt.size_delta)
        ));
    }
    notes.push(format!(
        "closure {} ({}), compared with {} at rev <code>{}</code>",
        size(changes.closure_size),
        size_delta(changes.closure_size_delta),
        code(&changes.against.out_path),
        short_rev(changes.against.rev.as_deref())
    ));
    out.push_str(&format!("<p class=\"muted\">{}</p>", notes.join("; ")));
    out
}

/// An error's code and its message (the end of what Nix said).
fn error_block(error: &ErrorBody) -> String {
    format!(
        "<p><b>{}</b></p><pre class=\"error\">{}</pre>",
        text(error.code.as_str()),
        text(&error.message)
    )
}

/// `/hosts/<repo>/<host>`: newest first.
pub fn host(repo: &str, host: &str, entries: &[HostHistoryEntry]) -> String {
    let mut out = format!(
        "<header><a href=\"/\">homelab-deploy</a></header>\n<main>\n\
         <h1>{} <small>{}</small></h1>\n<section id=\"closure\"><h2>Closure size</h2>{}</section>\n",
        text(host),
        text(repo),
        closure_size_chart(entries).unwrap_or_else(|| {
            "<p class=\"empty\">No closure sizes recorded yet.</p>".to_owned()
        }),
    );
    let rows: String = entries.iter().map(history_row).collect();
    out.push_str(&format!(
        "<section id=\"history\"><h2>History</h2>{}</section>\n</main>",
        table(
            "",
            "<th>Build</th><th>Rev</th><th>Status</th><th>Finished</th>\
             <th class=\"num\">Duration</th><th class=\"num\">Closure</th><th>Changes</th>",
            &rows,
            "history-rows",
            "No build of this host recorded yet.",
        )
    ));
    page(
        &format!("{} · {} · homelab-deploy", text(host), text(repo)),
        &format!(
            " data-page=\"host\" data-repo=\"{}\" data-host=\"{}\"",
            text(repo),
            text(host)
        ),
        &out,
        false,
    )
}

fn history_row(entry: &HostHistoryEntry) -> String {
    let status = entry.status.as_str();
    let mut changes = match &entry.changes {
        Some(changes) => format!(
            "<details><summary>{}</summary>{}</details>",
            changes_count(changes),
            changes_block(changes)
        ),
        None => String::new(),
    };
    if let Some(error) = &entry.error {
        changes.push_str(&format!(
            "<details><summary>{}</summary><pre class=\"error\">{}</pre></details>",
            text(error.code.as_str()),
            text(&error.message)
        ));
    }
    if changes.is_empty() {
        changes.push('–');
    }
    format!(
        "<tr data-build-id=\"{}\" data-status=\"{status}\"><td class=\"build\">{}</td>\
         <td class=\"rev\"><code>{}</code></td>{}<td class=\"when\">{}</td>\
         <td class=\"duration num\">{}</td><td class=\"closure num\">{}</td>\
         <td class=\"changes\">{changes}</td></tr>\n",
        text(&entry.build_id),
        build_link(&entry.build_id),
        short_rev(entry.rev.as_deref()),
        status_cell(status),
        time(&entry.finished_at),
        duration(entry.duration_ms),
        closure(
            entry.closure_size,
            entry.changes.as_ref().map(|c| c.closure_size_delta)
        ),
    )
}

/// A page for a missing build or host.
pub fn not_found(what: &str) -> String {
    let content = format!(
        "<header><a href=\"/\">homelab-deploy</a></header>\n<main>\n<h1>Not found</h1>\n\
         <p>{}</p>\n<p><a href=\"/\">Back to the status page</a></p>\n</main>",
        text(what)
    );
    page(
        "Not found · homelab-deploy",
        " data-page=\"not-found\"",
        &content,
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::HostState;
    use crate::protocol::{
        Against, ChangedPackage, ErrorCode, QueuedBuild, Rebuilt, RepoInfo, RunningHost,
        SkippedHost,
    };

    const REV: &str = "609da7ab2bec60c568928f7e8d760a36e14805b0";
    const HOSTILE: &str = "error: <script>alert('x')</script> & \"quoted\" from \
                           https://oauth2:glpat-SECRET@git.example/r.git";

    fn status(running: bool) -> BuilderStatus {
        BuilderStatus {
            builder: None,
            version: "1.4.0".into(),
            repos: vec![
                RepoInfo {
                    name: "nixos-servers".into(),
                    git_ref: None,
                },
                RepoInfo {
                    name: "laptops".into(),
                    git_ref: Some("main".into()),
                },
            ],
            running: running.then(|| RunningBuild {
                rev: None,
                build_id: "a1b2c3d4e5f60718".into(),
                repo: "nixos-servers".into(),
                target: "all".into(),
                git_ref: Some("main".into()),
                owner: None,
                resumed: false,
                hosts: vec![RunningHost {
                    host: "web-01".into(),
                    index: 3,
                    done: 12,
                    expected: 40,
                }],
                finished: 2,
                waiting_for_memory: vec![],
                total: Some(6),
                started_at: "2026-12-07T02:00:00Z".into(),
            }),
            queue: vec![QueuedBuild {
                build_id: "ffee000011112222".into(),
                repo: "laptops".into(),
                target: "x1".into(),
                git_ref: None,
                owner: None,
                resumed: false,
                queued_at: "2026-12-07T02:01:00Z".into(),
            }],
            last_results: vec![],
            machines: vec![],
            omitted_results: 0,
            web_url: None,
        }
    }

    fn changes() -> Changes {
        Changes {
            against: Against {
                out_path: "/nix/store/aaaa-nixos-system-web-01".into(),
                rev: Some(REV.into()),
            },
            packages: vec![ChangedPackage {
                name: "<img src=x onerror=alert(1)>".into(),
                before: vec!["3.0.14".into()],
                after: vec!["3.0.15<b>".into()],
                size_delta: 12 * 1024 * 1024,
            }],
            more: 4,
            rebuilt: Rebuilt {
                packages: 7,
                size_delta: -2048,
            },
            closure_size: 1_288_490_189,
            closure_size_delta: 12 * 1024 * 1024,
        }
    }

    fn latest(repo: &str, host: String, status: HostStatus) -> LatestHost {
        LatestHost {
            repo: repo.into(),
            host,
            status,
            finished_at: "2026-12-06T23:10:00Z".into(),
            rev: Some(REV.into()),
            build_id: Some("0011223344556677".into()),
            closure_size: Some(1_288_490_189),
            changed_packages: Some(5),
        }
    }

    /// 12 hosts over 2 repos.
    fn twelve_hosts() -> Vec<LatestHost> {
        (0..12)
            .map(|i| {
                let repo = if i < 8 { "nixos-servers" } else { "laptops" };
                let status = if i == 5 {
                    HostStatus::Failed
                } else {
                    HostStatus::Success
                };
                latest(repo, format!("host-{i:02}"), status)
            })
            .collect()
    }

    fn summaries(count: usize) -> Vec<BuildSummary> {
        (0..count)
            .map(|i| BuildSummary {
                build_id: format!("{i:016x}"),
                repo: "nixos-servers".into(),
                target: "all".into(),
                git_ref: None,
                rev: Some(REV.into()),
                status: if i == 2 {
                    RecordStatus::Failed
                } else {
                    RecordStatus::Success
                },
                accepted_at: "2026-12-06T22:00:00Z".into(),
                finished_at: Some("2026-12-06T22:05:00Z".into()),
                duration_ms: Some(300_000),
                hosts: (0..8)
                    .map(|h| HostState {
                        host: format!("host-{h:02}"),
                        status: if i == 2 && h == 5 {
                            HostStatus::Failed
                        } else {
                            HostStatus::Success
                        },
                    })
                    .collect(),
            })
            .collect()
    }

    fn host_record(host: &str, status: HostStatus) -> HostRecord {
        let failed = status != HostStatus::Success;
        HostRecord {
            host: host.into(),
            status,
            duration_ms: 72_000,
            out_path: (!failed).then(|| format!("/nix/store/bbbb-nixos-system-{host}")),
            cached: false,
            machines: [("localhost".to_owned(), 3), ("ssh-ng://b1".to_owned(), 5)]
                .into_iter()
                .collect(),
            closure_size: (!failed).then_some(1_288_490_189),
            closure_size_delta: (!failed).then_some(12 * 1024 * 1024),
            changes: (!failed).then(changes),
            error: failed.then(|| ErrorBody {
                code: ErrorCode::BuildFailed,
                message: HOSTILE.into(),
            }),
            finished_at: "2026-12-07T02:03:00Z".into(),
        }
    }

    fn record(status: RecordStatus) -> BuildRecord {
        BuildRecord {
            build_id: "a1b2c3d4e5f60718".into(),
            repo: "nixos-servers".into(),
            target: "all".into(),
            git_ref: Some("main".into()),
            rev: Some(REV.into()),
            owner: Some("UABC".into()),
            status,
            error: (status == RecordStatus::Failed).then(|| ErrorBody {
                code: ErrorCode::FetchFailed,
                message: HOSTILE.into(),
            }),
            accepted_at: "2026-12-07T02:00:00Z".into(),
            started_at: Some("2026-12-07T02:00:01Z".into()),
            finished_at: (status != RecordStatus::Running).then(|| "2026-12-07T02:05:00Z".into()),
            duration_ms: (status != RecordStatus::Running).then_some(300_000),
            hosts: vec![
                host_record("web-01", HostStatus::Success),
                host_record("db-01", HostStatus::Failed),
            ],
            skipped: vec![SkippedHost {
                host: "bad.host<i>".into(),
                reason: "name is not [A-Za-z0-9_-]+".into(),
            }],
        }
    }

    fn history() -> Vec<HostHistoryEntry> {
        vec![
            HostHistoryEntry {
                build_id: "0000000000000002".into(),
                rev: Some(REV.into()),
                status: HostStatus::Failed,
                finished_at: "2026-12-07T02:00:00Z".into(),
                duration_ms: 5_000,
                out_path: None,
                closure_size: None,
                changes: None,
                error: Some(ErrorBody {
                    code: ErrorCode::EvalFailed,
                    message: HOSTILE.into(),
                }),
            },
            HostHistoryEntry {
                build_id: "0000000000000001".into(),
                rev: Some(REV.into()),
                status: HostStatus::Success,
                finished_at: "2026-12-06T02:00:00Z".into(),
                duration_ms: 72_000,
                out_path: Some("/nix/store/cccc-nixos-system-web-01".into()),
                closure_size: Some(1_288_490_189),
                changes: Some(changes()),
                error: None,
            },
        ]
    }

    /// Every page checked for what any page must be.
    fn check_page(html: &str, page: &str) {
        assert!(html.starts_with("<!DOCTYPE html>"), "{html}");
        assert!(
            html.contains(&format!("<body data-page=\"{page}\"")),
            "{html}"
        );
        assert!(html.contains("<meta name=\"viewport\""));
        assert!(html.contains("<title>"));
        assert!(html.contains("<style>") && html.contains("<script>"));
        // Nothing loaded from elsewhere.
        for outside in [
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "href=\"//",
            "url(",
            "@import",
            "<link",
            "<img",
            "<script src",
            "src='",
        ] {
            assert!(!html.contains(outside), "{outside} in {page}");
        }
        // Hostile data stays text, credentials stay masked.
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(!html.contains("SECRET"), "{html}");
        assert_eq!(
            html.matches("<script>").count(),
            1,
            "only the page's own script"
        );
    }

    #[test]
    fn the_index_lists_everything_with_its_dom_contract() {
        let html = index(&status(true), &twelve_hosts(), &summaries(10));
        check_page(&html, "index");
        assert!(html.contains(
            "<section id=\"running\" data-build-id=\"a1b2c3d4e5f60718\" data-repo=\"nixos-servers\" data-rev=\"\">"
        ));
        assert!(html.contains("<tr data-running-host=\"web-01\">"));
        assert!(html.contains("<progress value=\"12\" max=\"40\"></progress> 12/40"));
        assert!(html.contains("<a href=\"/builds/a1b2c3d4e5f60718\">"));
        assert!(!html.contains("<p class=\"empty\">Nothing is building."));
        assert!(html.contains("<tr data-queued=\"ffee000011112222\">"));
        assert_eq!(html.matches("<tr data-repo=").count(), 12);
        assert!(html.contains(
            "<tr data-repo=\"nixos-servers\" data-host=\"host-05\" data-status=\"failed\">\
             <td class=\"host\"><a href=\"/hosts/nixos-servers/host-05\">host-05</a></td>\
             <td class=\"status\">failed</td>"
        ));
        assert!(
            html.contains(
                "<tr data-repo=\"laptops\" data-host=\"host-11\" data-status=\"success\">"
            )
        );
        assert!(html.contains("<h3>laptops</h3>") && html.contains("<h3>nixos-servers</h3>"));
        assert!(html.contains("<td class=\"rev\"><code>609da7ab2bec</code></td>"));
        assert!(html.contains("1.2 GiB"));
        assert_eq!(html.matches("<tr data-build-id=").count(), 10);
        assert!(html.contains("8 <small>(1 failed)</small>"));
        assert!(html.contains("<td class=\"duration num\">5m 00s</td>"));
        for id in ["running", "queue", "hosts", "recent"] {
            assert!(html.contains(&format!("<section id=\"{id}\"")), "{id}");
        }
        assert!(html.contains("<template id=\"running-template\">"));
        assert!(html.contains("<template id=\"repo-template\">"));
        assert!(html.contains("<footer>"));
    }

    #[test]
    fn an_idle_index_says_nothing_is_building() {
        let mut idle = status(false);
        idle.queue.clear();
        let html = index(&idle, &[], &[]);
        check_page(&html, "index");
        assert!(html.contains(
            "<section id=\"running\"><h2>Building now</h2><p class=\"empty\">Nothing is building.</p>"
        ));
        assert!(!html.contains("<tr data-running-host"));
        assert!(html.contains("The queue is empty."));
        assert!(html.contains("No build has been recorded yet."));
        // A configured repo without results still has its (hidden) table.
        assert!(html.contains("<div class=\"table\" hidden><table data-repo=\"laptops\">"));
    }

    #[test]
    fn the_index_stays_small() {
        let html = index(&status(true), &twelve_hosts(), &summaries(10));
        assert!(html.len() < 30 * 1024, "{} bytes", html.len());
    }

    #[test]
    fn hostile_names_are_escaped_on_the_index() {
        let mut hosts = twelve_hosts();
        hosts.push(latest(
            "r\"><script>alert(1)</script>",
            "h'<b>".into(),
            HostStatus::Timeout,
        ));
        let html = index(&status(false), &hosts, &[]);
        check_page(&html, "index");
        assert!(html.contains("data-repo=\"r&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;\""));
        assert!(html.contains("data-host=\"h&#39;&lt;b&gt;\" data-status=\"timeout\""));
        assert!(html.contains(
            "href=\"/hosts/r%22%3E%3Cscript%3Ealert%281%29%3C%2Fscript%3E/h%27%3Cb%3E\""
        ));
    }

    #[test]
    fn a_build_page_has_every_host_and_its_details() {
        let html = build(&record(RecordStatus::Failed));
        check_page(&html, "build");
        assert!(html.contains(
            "<body data-page=\"build\" data-build-id=\"a1b2c3d4e5f60718\" data-status=\"failed\""
        ));
        assert!(html.contains(
            "<tr data-host=\"web-01\" data-status=\"success\"><td class=\"host\">\
             <a href=\"/hosts/nixos-servers/web-01\">web-01</a></td><td class=\"status\">success</td>"
        ));
        assert!(html.contains("<tr data-host=\"db-01\" data-status=\"failed\">"));
        assert!(html.contains("localhost ×3, ssh-ng://b1 ×5"));
        assert!(html.contains("1.2 GiB <small>+12.0 MiB</small>"));
        assert!(html.contains("<td class=\"duration num\">1m 12s</td>"));
        // Changed packages, hostile names escaped.
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(html.contains("→ 3.0.15&lt;b&gt;"));
        assert!(html.contains("and 4 more"));
        assert!(html.contains("7 rebuilt at the same version (-2.0 KiB)"));
        // The errors, masked and escaped, in <pre>.
        assert!(html.contains(
            "<pre class=\"error\">error: &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; \
             &quot;quoted&quot; from https://***@git.example/r.git</pre>"
        ));
        assert!(html.contains("<b>fetch_failed</b>") && html.contains("build_failed"));
        assert!(html.contains("<li><b>bad.host&lt;i&gt;</b>: name is not [A-Za-z0-9_-]+</li>"));
        assert!(
            html.contains("<span class=\"status\" id=\"build-status\" data-status=\"failed\">")
        );
        // A finished build does not claim to update.
        assert!(!html.contains("<footer>"));
    }

    #[test]
    fn a_running_build_page_is_live() {
        let mut running = record(RecordStatus::Running);
        running.hosts.clear();
        let html = build(&running);
        check_page(&html, "build");
        assert!(html.contains("data-status=\"running\""));
        assert!(html.contains("<tbody id=\"host-rows\"></tbody>"));
        assert!(html.contains("No host has finished yet."));
        assert!(html.contains("<footer>"));
    }

    #[test]
    fn a_host_page_has_its_history_and_chart() {
        let html = host("nixos-servers", "web-01", &history());
        check_page(&html, "host");
        assert!(html.contains("data-repo=\"nixos-servers\" data-host=\"web-01\""));
        assert!(html.contains("class=\"closure-chart\""));
        assert_eq!(html.matches("<circle class=\"point\"").count(), 1);
        let newer = html.find("/builds/0000000000000002").unwrap();
        let older = html.find("/builds/0000000000000001").unwrap();
        assert!(newer < older, "newest first");
        assert!(html.contains("<summary>5 packages changed</summary>"));
        assert!(html.contains("<summary>eval_failed</summary>"));

        let without = host("nixos-servers", "web-01", &history()[..1]);
        check_page(&without, "host");
        assert!(without.contains("No closure sizes recorded yet."));
        assert!(!without.contains("closure-chart\""));
    }

    #[test]
    fn the_not_found_page_links_home() {
        let html = not_found("No build <b>x</b> in the history.");
        check_page(&html, "not-found");
        assert!(html.contains("No build &lt;b&gt;x&lt;/b&gt; in the history."));
        assert!(html.contains("<a href=\"/\">"));
    }
}
