//! `scripts/bench`: the cost of a host's closure changes — reading two
//! closures of about 3000 paths each with `nix path-info` and diffing them —
//! on two synthetic closures built offline from plain derivations
//! (`builder = /bin/sh`). Closure B bumps one package, adds one and removes
//! one. With `NIX_2_26_BIN` set (scripts/lib/nix-versions.sh), also with
//! that Nix. Not a test: it prints numbers for docs/performance.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use homelab_deploy::changes::compare;
use homelab_deploy::protocol::Against;

/// Leaves per group and groups: 3000 leaves, plus the groups and the top.
const GROUPS: usize = 60;
const PER_GROUP: usize = 50;
/// Leaves every other leaf references, like glibc: their paths fill each
/// path's `references`, as in a real system closure.
const BASE: usize = 10;
const RUNS: usize = 5;

/// A closure of `GROUPS * PER_GROUP` leaves under `GROUPS` groups under one
/// top; `variant` "b" bumps pkg0100 to 1.1, adds newpkg-2.0 and drops pkg0200.
fn expression(variant: &str) -> String {
    format!(
        r#"
let
  system = builtins.currentSystem;
  drv = name: script: deps: derivation {{
    inherit name system deps;
    builder = "/bin/sh";
    args = [ "-c" script ];
  }};
  base = builtins.genList (i: drv "base${{toString i}}-1.0" "echo base > $out" [ ]) {BASE};
  version = i: if "{variant}" == "b" && i == 100 then "1.1" else "1.0";
  pad = i: let s = toString i; in builtins.substring 0 (4 - builtins.stringLength s) "0000" + s;
  leaf = i: drv "pkg${{pad i}}-${{version i}}" "echo $deps > $out" base;
  keep = i: !("{variant}" == "b" && i == 200);
  group = g:
    let leaves = map leaf (builtins.filter keep (builtins.genList (j: g * {PER_GROUP} + j) {PER_GROUP}));
    in drv "group${{toString g}}-1.0" "echo $deps > $out" leaves;
  extra = if "{variant}" == "b" then [ (drv "newpkg-2.0" "echo new > $out" base) ] else [ ];
in drv "nixos-system-bench" "echo $deps > $out" (builtins.genList group {GROUPS} ++ extra)
"#
    )
}

fn build(dir: &std::path::Path, variant: &str) -> String {
    common::nix::nix_build_expression(dir, variant, &expression(variant))
}

async fn measure(program: &str, a: &str, b: &str) {
    let version = Command::new(program).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let against = Against {
            out_path: a.to_owned(),
            rev: None,
        };
        let started = Instant::now();
        let changes = compare(program, b, against, Duration::from_secs(60))
            .await
            .unwrap();
        times.push(started.elapsed());
        last = Some(changes);
    }
    let changes = last.unwrap();
    let names: Vec<String> = changes
        .packages
        .iter()
        .map(|p| format!("{} {:?} -> {:?}", p.name, p.before, p.after))
        .collect();
    times.sort();
    println!("{version}:");
    println!(
        "  read both closures + diff: median {:.0} ms, max {:.0} ms ({RUNS} runs, version check included)",
        times[RUNS / 2].as_secs_f64() * 1e3,
        times[RUNS - 1].as_secs_f64() * 1e3
    );
    println!(
        "  {} packages changed: {}; closure {} bytes, {:+} bytes",
        changes.changed_packages(),
        names.join(", "),
        changes.closure_size,
        changes.closure_size_delta
    );
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "closure changes benchmark: {} leaves per closure, {cpus} CPUs",
        GROUPS * PER_GROUP
    );
    let started = Instant::now();
    let a = build(dir.path(), "a");
    let b = build(dir.path(), "b");
    println!(
        "  (building the closures took {:.1} s; already built ones are reused)",
        started.elapsed().as_secs_f64()
    );
    // `compare` starts Nix with this process's environment.
    let config = std::env::var("NIX_CONFIG").unwrap_or_default();
    assert!(
        config.contains("build-users-group =") && config.contains("build-hook ="),
        "run this through scripts/bench, which sets NIX_CONFIG"
    );
    measure("nix", &a, &b).await;
    if let Ok(bin) = std::env::var("NIX_2_26_BIN") {
        measure(&format!("{bin}/nix"), &a, &b).await;
    }
}
