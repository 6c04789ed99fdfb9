//! `homelab-deploy nkey`: create an NKey user identity for the builder or a
//! deployer, without needing NATS's own tools.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::Exit;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to write the new seed (created with mode 0600; never overwritten).
    #[arg(long, value_name = "PATH")]
    seed_file: PathBuf,
}

/// Writes a fresh user seed and prints its public key, which goes into the
/// NATS server's config.
pub fn run(args: &Args) -> Exit {
    let pair = nkeys::KeyPair::new_user();
    let seed = match pair.seed() {
        Ok(seed) => seed,
        Err(err) => {
            eprintln!("error: cannot encode the seed: {err}");
            return Exit::Failed;
        }
    };
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&args.seed_file)
        .and_then(|mut file| writeln!(file, "{seed}"));
    if let Err(err) = written {
        eprintln!("error: cannot create {}: {err}", args.seed_file.display());
        return Exit::Usage;
    }
    println!("{}", pair.public_key());
    Exit::Success
}
