//! `homelab-deploy check-config`: validate a config file without starting,
//! or print the defaults the builder takes for what a config leaves out.

use std::path::PathBuf;

use serde::Serialize;

use super::Exit;
use crate::config::{AuthConfig, BuilderConfig, Config, MetricsConfig, WebConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path to the builder's TOML config.
    #[arg(long, short, required_unless_present = "print_defaults")]
    config: Option<PathBuf>,
    /// Print, as JSON, the value of every key a config may leave out, and
    /// the time the builder takes at most to stop after SIGTERM; then exit.
    /// nix/defaults.nix, the NixOS module's defaults, must agree with it.
    #[arg(long, conflicts_with = "config")]
    print_defaults: bool,
}

/// What `--print-defaults` prints: the shape of nix/defaults.nix.
#[derive(Serialize)]
struct Defaults {
    /// The sections a config may leave out, each with every key.
    settings: DefaultSettings,
    /// [`crate::SHUTDOWN_BUDGET`], in seconds.
    shutdown_budget_secs: u64,
}

#[derive(Serialize)]
struct DefaultSettings {
    metrics: MetricsConfig,
    web: WebConfig,
    builder: BuilderConfig,
    auth: AuthConfig,
}

fn defaults() -> Defaults {
    Defaults {
        settings: DefaultSettings {
            metrics: MetricsConfig::default(),
            web: WebConfig::default(),
            builder: BuilderConfig::default(),
            auth: AuthConfig::default(),
        },
        shutdown_budget_secs: crate::SHUTDOWN_BUDGET.as_secs(),
    }
}

pub fn run(args: &Args) -> Exit {
    if args.print_defaults {
        return match serde_json::to_string_pretty(&defaults()) {
            Ok(json) => {
                println!("{json}");
                Exit::Success
            }
            Err(err) => {
                super::print_error(&err);
                Exit::Failed
            }
        };
    }
    let Some(path) = &args.config else {
        super::print_error(&"give --config <path> or --print-defaults");
        return Exit::Usage;
    };
    match Config::load(path) {
        Ok(_) => {
            println!("ok");
            Exit::Success
        }
        Err(err) => {
            super::print_error(&err);
            Exit::Usage
        }
    }
}
