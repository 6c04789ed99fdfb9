//! `homelab-deploy check-config`: validate a config file without starting.

use std::path::PathBuf;

use super::Exit;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Path to the builder's TOML config.
    #[arg(long, short)]
    config: PathBuf,
}

pub fn run(args: &Args) -> Exit {
    match Config::load(&args.config) {
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
