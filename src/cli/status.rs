//! `homelab-deploy status`: what the builder is doing and how every host
//! last went.

use super::{Exit, QueryArgs, client_exit, connect, print_raw};
use crate::protocol::BuilderStatus;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    query: QueryArgs,
}

pub async fn run(args: Args) -> Exit {
    let query = &args.query;
    let client = match connect(&query.nats, "homelab-deploy-status").await {
        Ok(client) => client,
        Err(exit) => return exit,
    };
    match client.status(query.timeout).await {
        Ok((_, raw)) if query.json => print_raw(&raw),
        Ok((status, _)) => print!("{}", render(&status)),
        Err(err) => {
            eprintln!("error: {err}");
            return client_exit(&err);
        }
    }
    Exit::Success
}

/// The status as people read it.
pub fn render(status: &BuilderStatus) -> String {
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
    match &status.running {
        Some(running) => {
            let host = match (&running.host, running.index, running.total) {
                (Some(host), Some(index), Some(total)) => {
                    format!(", host {index} of {total}: {host}")
                }
                _ => ", fetching".to_owned(),
            };
            text.push_str(&format!(
                "running: {} {}/{}{host}, since {}\n",
                running.build_id, running.repo, running.target, running.started_at
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
                "  {} {}/{} (ref {}), since {}\n",
                queued.build_id,
                queued.repo,
                queued.target,
                queued.git_ref.as_deref().unwrap_or("default"),
                queued.queued_at
            ));
        }
    }
    if status.last_results.is_empty() {
        text.push_str("last results: none yet\n");
    } else {
        text.push_str("last results:\n");
        let width = status
            .last_results
            .iter()
            .map(|r| r.repo.len() + r.host.len() + 1)
            .max()
            .unwrap_or(0);
        for result in &status.last_results {
            let name = format!("{}/{}", result.repo, result.host);
            let rev = result
                .rev
                .as_deref()
                .map_or("-", |r| r.get(..12).unwrap_or(r));
            text.push_str(&format!(
                "  {name:<width$}  {:<9} rev {rev:<12}  {}  {}\n",
                result.status.as_str(),
                result.finished_at,
                result.out_path.as_deref().unwrap_or("-")
            ));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{HostStatus, LastResult, QueuedBuild, RepoInfo, RunningBuild};

    #[test]
    fn status_reads_as_a_summary() {
        let status = BuilderStatus {
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
                build_id: "b1".into(),
                repo: "nixos-servers".into(),
                target: "all".into(),
                git_ref: Some("master".into()),
                host: Some("ns1".into()),
                index: Some(3),
                total: Some(16),
                started_at: "2026-11-28T01:00:00Z".into(),
            }),
            queue: vec![QueuedBuild {
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
            }],
        };
        let text = render(&status);
        assert!(
            text.contains("repos: nixos-servers (ref master), nixos (default branch)"),
            "{text}"
        );
        assert!(
            text.contains(
                "running: b1 nixos-servers/all, host 3 of 16: ns1, since 2026-11-28T01:00:00Z"
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
}
