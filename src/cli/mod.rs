//! The command line: one module per subcommand, each owning its arguments.

mod build;
mod builder;
mod check_config;
mod output;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::nats::{Auth, ConnectSettings};

/// Exit codes shared by all subcommands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exit {
    /// Everything succeeded.
    Success = 0,
    /// A host or the request failed.
    Failed = 1,
    /// Rejected by the builder, bad arguments or bad config.
    Usage = 2,
    /// No builder answered, or the client gave up waiting.
    NoBuilder = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "homelab-deploy",
    version,
    about = "Build a homelab's NixOS flakes on request over NATS"
)]
struct Cli {
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the build service (the daemon).
    Builder(builder::Args),
    /// Ask the builder to build hosts and follow the build.
    Build(build::Args),
    /// Show what the builder is doing and how every host last went.
    Status(status::Args),
    /// Validate a builder config file.
    CheckConfig(check_config::Args),
}

/// NATS connection options shared by the client subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "HOMELAB_DEPLOY_NATS_URL", value_name = "URL")]
    nats_url: String,
    /// NKey user seed file.
    #[arg(long, env = "HOMELAB_DEPLOY_NKEY_FILE", value_name = "PATH")]
    nkey_file: Option<PathBuf>,
    /// NATS .creds file (alternative to --nkey-file).
    #[arg(
        long,
        env = "HOMELAB_DEPLOY_CREDS_FILE",
        value_name = "PATH",
        conflicts_with = "nkey_file"
    )]
    creds_file: Option<PathBuf>,
    /// CA certificate for tls:// servers not signed by a system root.
    #[arg(long, env = "HOMELAB_DEPLOY_TLS_CA_FILE", value_name = "PATH")]
    tls_ca_file: Option<PathBuf>,
}

impl NatsArgs {
    /// Connection settings for a short-lived client.
    pub fn settings(&self, name: &str) -> ConnectSettings {
        ConnectSettings {
            urls: self
                .nats_url
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect(),
            auth: match (&self.nkey_file, &self.creds_file) {
                (Some(seed), _) => Auth::NkeySeedFile(seed.clone()),
                (None, Some(creds)) => Auth::CredentialsFile(creds.clone()),
                (None, None) => Auth::None,
            },
            tls: crate::nats::TlsFiles {
                ca: self.tls_ca_file.clone(),
                client: None,
            },
            name: name.to_owned(),
            retry_initial_connect: false,
            subscription_capacity: None,
        }
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Builder(_) => "info",
        Command::Build(_) | Command::Status(_) | Command::CheckConfig(_) => "warn",
    };
    init_logging(cli.log_format, default_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return Exit::Failed.into();
        }
    };
    let exit = runtime.block_on(async {
        match cli.command {
            Command::Builder(args) => builder::run(args).await,
            Command::Build(args) => build::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::CheckConfig(args) => check_config::run(&args),
        }
    });
    exit.into()
}

fn init_logging(format: LogFormat, default_level: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
