//! The command line: one module per subcommand, each owning its arguments.

mod build;
mod builder;
mod cancel;
mod check_config;
mod mcp;
mod nkey;
pub(crate) mod output;
pub(crate) mod status;

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
    /// Cancel a running or waiting build.
    Cancel(cancel::Args),
    /// Create an NKey user seed file and print its public key.
    Nkey(nkey::Args),
    /// Serve MCP over stdio: build status (and builds, with --enable-builds).
    Mcp(mcp::Args),
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
    /// The builder's NKey public key (`U…`): replies not validly signed by
    /// it are ignored, so nobody else can forge a result.
    #[arg(long, env = "HOMELAB_DEPLOY_BUILDER_KEY", value_name = "KEY")]
    builder_key: Option<String>,
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

/// Options shared by the subcommands that ask the builders one question.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryArgs {
    /// Print each builder's reply as received, one JSON object per line.
    #[arg(long)]
    json: bool,
    /// How long to wait for an answer (a cancel of a build no builder
    /// has hears none, and takes this long to say so).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    #[command(flatten)]
    nats: NatsArgs,
}

/// Connects a client, or says why not: exit 2 for a local configuration
/// error (a key file, a URL, `--builder-key`), 3 when no server answers.
pub async fn connect(nats: &NatsArgs, name: &str) -> Result<crate::client::BuildClient, Exit> {
    connect_with(nats, &nats.settings(name)).await
}

/// [`connect`] with adjusted settings.
pub async fn connect_with(
    nats: &NatsArgs,
    settings: &ConnectSettings,
) -> Result<crate::client::BuildClient, Exit> {
    crate::client::BuildClient::connect(settings, nats.builder_key.as_deref())
        .await
        .map_err(|err| {
            eprintln!("error: {err}");
            client_exit(&err)
        })
}

/// The exit code for a request that got no (usable) answer.
pub fn client_exit(err: &crate::client::ClientError) -> Exit {
    use crate::client::ClientError;
    match err {
        ClientError::Invalid(_) | ClientError::InvalidRepo(_) | ClientError::BadBuilderKey(_) => {
            Exit::Usage
        }
        ClientError::NoSuchBuild { .. } => Exit::Failed,
        ClientError::Connect(err) if err.is_local() => Exit::Usage,
        ClientError::Connect(_)
        | ClientError::NoResponders { .. }
        | ClientError::NoBuilderServesRepo { .. }
        | ClientError::NotAcknowledged { .. }
        | ClientError::TimedOut { .. }
        | ClientError::BuilderSilent { .. }
        | ClientError::NotResumed { .. }
        | ClientError::Nats(_)
        | ClientError::Closed => Exit::NoBuilder,
    }
}

/// Writes a reply exactly as received, on its own line.
pub fn print_raw(raw: &[u8]) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&crate::printable::printable_json(raw));
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Builder(_) => "info",
        Command::Build(_)
        | Command::Status(_)
        | Command::Cancel(_)
        | Command::Nkey(_)
        | Command::Mcp(_)
        | Command::CheckConfig(_) => "warn",
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
            Command::Cancel(args) => cancel::run(args).await,
            Command::Nkey(args) => nkey::run(&args),
            Command::Mcp(args) => mcp::run(args).await,
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
        .with_writer(RedactedStderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

/// The log's writer: each event is formatted whole into a buffer, then
/// written to stderr with credentials masked ([`crate::redact`]), so no
/// log line, whatever its fields, carries a token from a repo URL.
struct RedactedStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactedStderr {
    type Writer = Redacting<std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        Redacting::new(std::io::stderr())
    }
}

/// Collects one log event and writes it, redacted, to `inner` when
/// dropped (the formatter drops the writer after each event).
struct Redacting<W: std::io::Write> {
    buffer: Vec<u8>,
    inner: W,
}

impl<W: std::io::Write> Redacting<W> {
    fn new(inner: W) -> Self {
        Self {
            buffer: Vec::new(),
            inner,
        }
    }
}

impl<W: std::io::Write> std::io::Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: std::io::Write> Drop for Redacting<W> {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.buffer);
        // Nowhere to report a failing stderr.
        let _ = self
            .inner
            .write_all(crate::redact::redact(&text).as_bytes());
        let _ = self.inner.flush();
    }
}

/// Prints `error: …` for a failed command, credentials masked (a config
/// error may quote a repo URL).
pub(crate) fn print_error(err: &dyn std::fmt::Display) {
    let text = err.to_string();
    eprintln!(
        "error: {}",
        crate::printable::printable(&crate::redact::redact(&text))
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn log_lines_are_written_without_credentials() {
        let mut out = Vec::new();
        {
            let mut writer = Redacting::new(&mut out);
            // Split the way a formatter might; the secret spans both writes.
            writer
                .write_all(b"pinning url=git+https://oauth2:SEC")
                .unwrap();
            writer.write_all(b"RET@git.example/r.git\n").unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "pinning url=git+https://***@git.example/r.git\n");
    }
}
