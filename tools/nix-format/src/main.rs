//! `nix-format --check FILE...` lists the Nix files that are not formatted
//! the way alejandra formats them (exit 1); `nix-format --write FILE...`
//! rewrites them. A thin front end to the alejandra library, which has no
//! installable command of its own on crates.io.

use std::process::ExitCode;

use alejandra::format::{Status, in_memory};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let write = match args.next().as_deref() {
        Some("--check") => false,
        Some("--write") => true,
        _ => {
            eprintln!("usage: nix-format (--check | --write) FILE...");
            return ExitCode::from(2);
        }
    };
    let mut unformatted = 0;
    for path in args {
        let before = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("{path}: {err}");
                return ExitCode::from(2);
            }
        };
        match in_memory(path.clone(), before) {
            (Status::Error(err), _) => {
                eprintln!("{path}: {err}");
                return ExitCode::from(2);
            }
            (Status::Changed(false), _) => {}
            (Status::Changed(true), after) if write => {
                if let Err(err) = std::fs::write(&path, after) {
                    eprintln!("{path}: {err}");
                    return ExitCode::from(2);
                }
                println!("formatted {path}");
            }
            (Status::Changed(true), _) => {
                println!("not formatted: {path}");
                unformatted += 1;
            }
        }
    }
    if unformatted > 0 {
        eprintln!("{unformatted} file(s) need formatting: run scripts/check-nix --fix");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
