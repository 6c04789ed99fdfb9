//! Closure changes against real Nix: two results of one host built from
//! plain derivations, read with `nix path-info` by Nix 2.8 and (when it is
//! set up, see scripts/lib/nix-versions.sh) Nix 2.26, whose JSON differs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use homelab_deploy::changes::compare;
use homelab_deploy::protocol::{Against, ChangedPackage, Changes};

/// A host's system: a top-level referencing `packages` (name, content).
fn system_expression(packages: &[(&str, &str)]) -> String {
    let deps = packages
        .iter()
        .map(|(name, content)| format!("(drv \"{name}\" \"echo {content} > $out\" [ ])"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        r#"let
  drv = name: script: deps: derivation {{
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  }};
in drv "nixos-system-ns1" "echo $deps > $out" [ {deps} ]"#
    )
}

fn build(dir: &Path, name: &str, packages: &[(&str, &str)]) -> String {
    nix_build_expression(dir, name, &system_expression(packages))
}

/// A `nix` that runs `real` with the test's Nix settings (the builder
/// passes its own environment to Nix).
fn nix_wrapper(dir: &Path, name: &str, real: &str) -> String {
    let path = dir.join(name);
    let config = format!(
        "{}build-users-group =\nbuild-hook =\nbuilders =\n",
        nix_config()
    );
    std::fs::write(
        &path,
        format!("#!/bin/sh\nNIX_CONFIG='{config}' exec '{real}' \"$@\"\n"),
    )
    .unwrap();
    let mut permissions = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&path, permissions).unwrap();
    path.to_string_lossy().into_owned()
}

/// Nix 2.8 (`nix` on PATH) and, when set up, Nix 2.26.
fn nix_versions(dir: &Path) -> Vec<String> {
    let mut programs = vec![nix_wrapper(dir, "nix-2.8", "nix")];
    let nix_2_26 = std::env::var("NIX_2_26_BIN").map_or_else(
        |_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/nix-2.26/bin"),
        PathBuf::from,
    );
    let nix_2_26 = nix_2_26.join("nix");
    if nix_2_26.exists() {
        programs.push(nix_wrapper(dir, "nix-2.26", &nix_2_26.to_string_lossy()));
    } else {
        eprintln!(
            "Nix 2.26 is not set up ({}): only Nix 2.8 is tested",
            nix_2_26.display()
        );
    }
    programs
}

async fn changes(program: &str, out_path: &str, against: &str) -> Changes {
    let against = Against {
        out_path: against.to_owned(),
        rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".to_owned()),
    };
    compare(program, out_path, against, Duration::from_secs(60))
        .await
        .unwrap_or_else(|err| panic!("{program}: {err}"))
}

#[tokio::test]
async fn a_bump_an_addition_and_a_removal_are_named_on_each_nix() {
    let dir = tempfile::tempdir().unwrap();
    let before = build(
        dir.path(),
        "before",
        &[
            ("openssl-3.0.14", "a"),
            ("nano-8.0", "n"),
            ("glibc-2.39", "g"),
        ],
    );
    let after = build(
        dir.path(),
        "after",
        &[
            ("openssl-3.0.15", "a-longer-build-of-openssl"),
            ("htop-3.3.0", "h"),
            ("glibc-2.39", "g"),
        ],
    );
    for program in nix_versions(dir.path()) {
        let changes = changes(&program, &after, &before).await;
        let mut names: Vec<(&str, Vec<&str>, Vec<&str>)> = changes
            .packages
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.before.iter().map(String::as_str).collect(),
                    p.after.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ("htop", vec![], vec!["3.3.0"]),
                ("nano", vec!["8.0"], vec![]),
                ("openssl", vec!["3.0.14"], vec!["3.0.15"]),
            ],
            "{program}: {changes:?}"
        );
        let delta = |name: &str| {
            changes
                .packages
                .iter()
                .find(|p| p.name == name)
                .map(|p: &ChangedPackage| p.size_delta)
                .unwrap()
        };
        assert!(delta("htop") > 0 && delta("nano") < 0, "{changes:?}");
        assert_ne!(delta("openssl"), 0, "{changes:?}");
        // The top-level keeps its name and (empty) version: rebuilt.
        assert_eq!(changes.rebuilt.packages, 1, "{changes:?}");
        assert_eq!(changes.more, 0);
        assert_eq!(changes.against.out_path, before);
        assert!(changes.closure_size > 0);
        assert_ne!(changes.closure_size_delta, 0, "{changes:?}");
    }
}

#[tokio::test]
async fn an_unchanged_result_has_no_changes_on_each_nix() {
    let dir = tempfile::tempdir().unwrap();
    let out = build(
        dir.path(),
        "same",
        &[("htop-3.3.0", "h"), ("glibc-2.39", "g")],
    );
    for program in nix_versions(dir.path()) {
        let changes = changes(&program, &out, &out).await;
        assert!(changes.packages.is_empty(), "{program}: {changes:?}");
        assert_eq!(changes.rebuilt.packages, 0);
        assert_eq!(changes.closure_size_delta, 0);
        assert!(changes.closure_size > 0);
    }
}

#[tokio::test]
async fn a_path_not_in_the_store_is_an_error_not_a_download() {
    let dir = tempfile::tempdir().unwrap();
    let out = build(dir.path(), "real", &[("htop-3.3.0", "h")]);
    for program in nix_versions(dir.path()) {
        let against = Against {
            out_path: "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-gone".to_owned(),
            rev: None,
        };
        let err = compare(&program, &out, against, Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("-gone"), "{program}: {err}");
    }
}
