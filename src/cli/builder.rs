//! `homelab-deploy builder`: the long-running build service.

use std::path::PathBuf;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use super::Exit;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path to the builder's TOML config.
    #[arg(long, short)]
    config: PathBuf,
    /// On stop, cancel running and waiting requests instead of leaving them
    /// in the journal for the next start (`[builder] resume = false`).
    #[arg(long)]
    no_resume: bool,
}

pub async fn run(args: Args) -> Exit {
    let mut config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            super::print_error(&err);
            return Exit::Usage;
        }
    };
    if args.no_resume {
        config.builder.resume = false;
    }
    let shutdown = CancellationToken::new();
    if let Err(err) = watch_signals(shutdown.clone()) {
        eprintln!("error: cannot install signal handlers: {err}");
        return Exit::Failed;
    }
    match crate::builder::run(config, shutdown).await {
        Ok(()) => Exit::Success,
        Err(err) => {
            tracing::error!(%err, "builder failed");
            super::print_error(&err);
            Exit::Failed
        }
    }
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
fn watch_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            () = shutdown.cancelled() => return,
        };
        tracing::info!(signal = name, "received signal");
        shutdown.cancel();
    });
    Ok(())
}
