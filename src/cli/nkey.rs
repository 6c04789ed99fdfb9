//! `homelab-deploy nkey`: create an NKey user identity for the builder or a
//! deployer, without needing NATS's own tools.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::Exit;

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Args {
    /// Where to write the new seed (created with mode 0600; never overwritten).
    #[arg(long, value_name = "PATH")]
    seed_file: Option<PathBuf>,
    /// Print the public key of an existing seed or `.creds` file instead
    /// (e.g. the builder's, for clients' `--builder-key`).
    #[arg(long, value_name = "PATH")]
    public_key_of: Option<PathBuf>,
}

/// Writes a fresh user seed and prints its public key, which goes into the
/// NATS server's config; or prints the public key of an existing one.
pub fn run(args: &Args) -> Exit {
    match (&args.seed_file, &args.public_key_of) {
        (Some(seed_file), _) => create(seed_file),
        (None, Some(path)) => show(path),
        (None, None) => Exit::Usage,
    }
}

fn show(path: &std::path::Path) -> Exit {
    let seed = crate::nats::read_seed(path).or_else(|_| crate::nats::read_credentials_seed(path));
    match seed.map(|seed| nkeys::KeyPair::from_seed(&seed)) {
        Ok(Ok(pair)) => {
            println!("{}", pair.public_key());
            Exit::Success
        }
        Ok(Err(err)) => {
            eprintln!("error: {}: {err}", path.display());
            Exit::Usage
        }
        Err(err) => {
            eprintln!("error: {err}");
            Exit::Usage
        }
    }
}

fn create(seed_file: &std::path::Path) -> Exit {
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
        .open(seed_file)
        .and_then(|mut file| writeln!(file, "{seed}"));
    if let Err(err) = written {
        eprintln!("error: cannot create {}: {err}", seed_file.display());
        return Exit::Usage;
    }
    println!("{}", pair.public_key());
    Exit::Success
}
