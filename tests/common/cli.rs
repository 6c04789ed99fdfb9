//! The `homelab-deploy` command line, run against the test's NATS server.

use std::process::{Output, Stdio};

use super::nix::test_path;
use super::wait::WAIT;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_homelab-deploy");

/// `homelab-deploy <args>` against the test's NATS URL, with no key or
/// builder key from the environment.
fn cli_command(nats_url: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env("HOMELAB_DEPLOY_NATS_URL", nats_url)
        .env("PATH", test_path())
        .env_remove("HOMELAB_DEPLOY_NKEY_FILE")
        .env_remove("HOMELAB_DEPLOY_CREDS_FILE")
        .env_remove("HOMELAB_DEPLOY_BUILDER_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Starts the CLI with the test's NATS URL, its output piped, without
/// waiting.
pub fn spawn_cli(nats_url: &str, args: &[&str]) -> tokio::process::Child {
    cli_command(nats_url, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the CLI with the test's NATS URL; bounded by [`WAIT`].
pub async fn run_cli(nats_url: &str, args: &[&str]) -> Output {
    let output = cli_command(nats_url, args).output();
    tokio::time::timeout(WAIT, output)
        .await
        .unwrap_or_else(|_| panic!("CLI {args:?} did not exit in time"))
        .unwrap()
}

/// Stdout and stderr of a CLI run, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "exit {:?}
--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
