//! `homelab-deploy build`: request builds and follow them to the end.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use super::output::View;
use super::{Exit, NatsArgs, client_exit, connect, print_raw};
use crate::client::{BuildClient, ClientError, Timeouts, validate};
use crate::printable::printable;
use crate::protocol::{ALL_TARGET, BuildRequest, BuildStatus, Event};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Repo name as configured on the builder (e.g. nixos-servers).
    repo: String,
    /// Hosts to build; each is its own request, run one after the other.
    targets: Vec<String>,
    /// Build every host of the repo (target "all").
    #[arg(long, conflicts_with = "targets")]
    all: bool,
    /// Build this branch or tag instead of the repo's default.
    #[arg(long = "ref", value_name = "REF")]
    git_ref: Option<String>,
    /// Build this exact commit (40 hex digits).
    #[arg(long, value_name = "SHA")]
    rev: Option<String>,
    /// Print every event as received, one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Stream the build log of each host.
    #[arg(long)]
    logs: bool,
    /// Under each host, list every changed package, not only the summary.
    #[arg(long)]
    changes: bool,
    /// Give up on a request after this long (e.g. 90m, 3h).
    #[arg(long, default_value = "3h", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// After the builder says it is restarting, wait this long for it to
    /// resume the build.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    resume_timeout: Duration,
    /// While no builder serves the repo (NATS "no responders", e.g. it
    /// is restarting), keep asking for this long (e.g. 5m) instead of
    /// giving up at once.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    wait_for_builder: Option<Duration>,
    #[command(flatten)]
    nats: NatsArgs,
}

pub async fn run(args: Args) -> Exit {
    let targets = if args.all {
        vec![ALL_TARGET.to_owned()]
    } else if args.targets.is_empty() {
        eprintln!("error: name at least one host to build, or pass --all");
        return Exit::Usage;
    } else {
        args.targets.clone()
    };
    let request = BuildRequest {
        git_ref: args.git_ref.clone(),
        rev: args.rev.clone(),
        logs: args.logs,
    };
    for target in &targets {
        if let Err(err) = validate(&args.repo, target, &request) {
            eprintln!("error: {err}");
            return Exit::Usage;
        }
    }

    let client = match connect(&args.nats, "homelab-deploy-build").await {
        Ok(client) => client,
        Err(exit) => return exit,
    };
    let timeouts = Timeouts {
        total: args.timeout,
        resume: args.resume_timeout,
        wait_for_builder: args.wait_for_builder,
        ..Timeouts::default()
    };
    let mut worst = Exit::Success;
    for target in &targets {
        let exit = follow(&client, &args, target, &request, timeouts).await;
        worst = worst.max(exit);
        if exit == Exit::NoBuilder {
            // The remaining requests would go unanswered the same way.
            break;
        }
    }
    worst
}

/// Sends one request and shows its events; returns its exit code.
async fn follow(
    client: &BuildClient,
    args: &Args,
    target: &str,
    request: &BuildRequest,
    timeouts: Timeouts,
) -> Exit {
    let stdout = std::io::stdout();
    let live = !args.json && stdout.is_terminal();
    let mut view = View::new(stdout.lock(), live).with_all_changes(args.changes);
    let mut events = match client.request(&args.repo, target, request, timeouts).await {
        Ok(events) => events,
        Err(err) => return report_error(&mut view, &err),
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            _ = ticker.tick() => {
                view.tick();
                continue;
            }
        };
        let received = match next {
            Ok(Some(received)) => received,
            Ok(None) => return report_error(&mut view, &ClientError::Closed),
            Err(err) => return report_error(&mut view, &err),
        };
        if args.json {
            print_raw(&received.raw);
        } else {
            view.event(&received.reply);
        }
        match &received.reply.event {
            Event::Finished { status, .. } => {
                return match status {
                    BuildStatus::Success => Exit::Success,
                    BuildStatus::Failed | BuildStatus::Cancelled => Exit::Failed,
                };
            }
            Event::Rejected { .. } => return Exit::Usage,
            _ => {}
        }
    }
}

fn report_error<W: Write>(view: &mut View<W>, err: &ClientError) -> Exit {
    view.finish();
    eprintln!("error: {}", printable(&err.to_string()));
    client_exit(err)
}
