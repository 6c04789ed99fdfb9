//! Every command line of `NixCli` run against the real Nix the suite uses
//! (scripts/test runs this once per Nix version), so a version-dependent
//! form such as `drv^*` is proven on the binary, not only in unit tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Output;

use common::flake::{Flake, Host};
use common::nix::{nix_command, which};
use homelab_deploy::nix::argv::{EVAL_MARKER, Invocation};
use homelab_deploy::nix::{NixCli, NixVersion};
use serde_json::Value;

/// The CLI builder for the selected `nix`, by full path so that
/// `nix-store` is taken from beside it.
fn cli() -> NixCli {
    let nix = which("nix").expect("nix not found");
    let out = nix_command(&nix).arg("--version").output().unwrap();
    let version = NixVersion::parse(&String::from_utf8_lossy(&out.stdout)).unwrap();
    NixCli::new(nix, version)
}

fn run(invocation: &Invocation) -> Output {
    nix_command(&invocation.program)
        .args(&invocation.args)
        .output()
        .unwrap()
}

fn run_ok(invocation: &Invocation) -> Output {
    let out = run(invocation);
    assert!(
        out.status.success(),
        "{invocation} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Pins the flake and evaluates `host`; returns (locked URL, drv, out).
fn pin_and_eval(cli: &NixCli, flake: &Flake, host: &str) -> (String, String, String) {
    let metadata = json(&run_ok(&cli.flake_metadata(&flake.url())));
    let locked = metadata["url"].as_str().unwrap().to_owned();
    assert!(locked.contains("rev="), "{metadata}");

    let hosts = json(&run_ok(&cli.list_hosts(&locked)));
    assert!(
        hosts.as_array().unwrap().contains(&Value::from(host)),
        "{hosts}"
    );

    let out = run_ok(&cli.eval_hosts(&locked, &[host.to_owned()]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let done = stderr
        .split(EVAL_MARKER)
        .skip(1)
        .filter_map(|rest| {
            // The trace is JSON inside a JSON log message: unescape first.
            let rest = rest.replace("\\\"", "\"");
            let end = rest.find('}')?;
            serde_json::from_str::<Value>(&rest[..=end]).ok()
        })
        .find(|v| v["done"] == host)
        .unwrap_or_else(|| panic!("no done trace for {host} in:\n{stderr}"));
    (
        locked,
        done["drv"].as_str().unwrap().to_owned(),
        done["out"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn every_command_line_works_on_this_nix() {
    let cli = cli();
    eprintln!("nix version detected: {}", cli.version());
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (_, drv, out_path) = pin_and_eval(&cli, &flake, "ns1");

    // Not built yet: the validity check lists it.
    let invalid = run_ok(&cli.check_validity(&[&out_path]));
    assert_eq!(
        String::from_utf8_lossy(&invalid.stdout).trim(),
        out_path,
        "a fresh output must be invalid"
    );

    let built = json(&run_ok(&cli.build_drv(&drv, None)));
    assert_eq!(built[0]["drvPath"], drv.as_str(), "{built}");
    assert_eq!(built[0]["outputs"]["out"], out_path.as_str(), "{built}");

    let valid = run_ok(&cli.check_validity(&[&out_path]));
    assert_eq!(String::from_utf8_lossy(&valid.stdout).trim(), "");

    let roots = tempfile::tempdir().unwrap();
    let link = roots.path().join("ns1");
    run_ok(&cli.add_root(&out_path, link.to_str().unwrap()));
    assert_eq!(
        std::fs::canonicalize(&link).unwrap().to_str(),
        Some(out_path.as_str())
    );
    // The derivation file itself is rooted, not its output.
    let drv_link = roots.path().join("ns1.drv");
    run_ok(&cli.root_drv(&drv, drv_link.to_str().unwrap()));
    assert_eq!(
        std::fs::canonicalize(&drv_link).unwrap().to_str(),
        Some(drv.as_str())
    );
}

/// The form `drv_outputs_installable` does not choose is wrong on this Nix:
/// from 2.15 a bare `.drv` means the file itself (nothing is built, and the
/// JSON has no outputs); before, `drv^*` is not understood.
#[test]
fn the_other_derivation_installable_form_is_wrong_on_this_nix() {
    let cli = cli();
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (_, drv, out_path) = pin_and_eval(&cli, &flake, "ns1");
    let other = if cli.version().drv_needs_output_selector() {
        drv.clone()
    } else {
        format!("{drv}^*")
    };
    let wrong = Invocation {
        program: cli.build_drv(&drv, None).program,
        args: cli
            .build_drv(&drv, None)
            .args
            .into_iter()
            .map(|a| {
                if a == cli.drv_outputs_installable(&drv) {
                    other.clone()
                } else {
                    a
                }
            })
            .collect(),
    };
    let out = run(&wrong);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || !stdout.contains(&out_path),
        "{wrong} built the outputs on Nix {}:\n{stdout}",
        cli.version()
    );
    let valid = run_ok(&cli.check_validity(&[&out_path]));
    assert_eq!(
        String::from_utf8_lossy(&valid.stdout).trim(),
        out_path,
        "{wrong} built {out_path}"
    );
}

/// Builds read `--json` because `--print-out-paths` only exists from
/// Nix 2.9: the claim behind that choice, checked on the real binary.
#[test]
fn print_out_paths_exists_only_from_nix_2_9() {
    let cli = cli();
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (_, drv, out_path) = pin_and_eval(&cli, &flake, "ns1");
    let installable = cli.drv_outputs_installable(&drv);
    let invocation = Invocation {
        program: cli.build_drv(&drv, None).program,
        args: [
            "--extra-experimental-features",
            "nix-command flakes",
            "build",
            "--no-link",
            "--print-out-paths",
            &installable,
        ]
        .map(str::to_owned)
        .to_vec(),
    };
    let out = run(&invocation);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if cli.version() >= NixVersion::new(2, 9, 0) {
        assert!(out.status.success(), "{invocation}:\n{stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), out_path);
    } else {
        assert!(
            !out.status.success(),
            "{invocation} worked on {}",
            cli.version()
        );
        assert!(stderr.contains("print-out-paths"), "{stderr}");
    }
}
