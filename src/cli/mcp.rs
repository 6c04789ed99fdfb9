//! `homelab-deploy mcp`: the MCP server for assistants (see docs/mcp.md).

use std::time::Duration;

use rmcp::ServiceExt;

use super::{Exit, NatsArgs};
use crate::client::Timeouts;
use crate::mcp::BuildTools;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Offer the `build` and `cancel_build` tools (without it, only
    /// `build_status`).
    #[arg(long)]
    enable_builds: bool,
    /// Give up following a build after this long.
    #[arg(long, default_value = "3h", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    nats: NatsArgs,
}

pub async fn run(args: Args) -> Exit {
    // Start even when NATS is not reachable yet: tools report it instead.
    let settings = crate::nats::ConnectSettings {
        retry_initial_connect: true,
        ..args.nats.settings("homelab-deploy-mcp")
    };
    let client = match super::connect_with(&args.nats, &settings).await {
        Ok(client) => client,
        // Without a server to wait for, only local configuration fails.
        Err(_) => return Exit::Usage,
    };
    let timeouts = Timeouts {
        total: args.timeout,
        ..Timeouts::default()
    };
    let tools = BuildTools::new(client, args.enable_builds, timeouts);
    let service = match tools.serve(rmcp::transport::stdio()).await {
        Ok(service) => service,
        Err(err) => {
            eprintln!("error: MCP session failed to start: {err}");
            return Exit::Failed;
        }
    };
    match service.waiting().await {
        Ok(_) => Exit::Success,
        Err(err) => {
            eprintln!("error: MCP session ended abnormally: {err}");
            Exit::Failed
        }
    }
}
