//! Closure changes against real Nix: two results of one host built from
//! plain derivations, read with `nix path-info` by Nix 2.8 and (when it is
//! set up, see scripts/lib/nix-versions.sh) Nix 2.26, whose JSON differs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::builder::start_service;
use common::flake::{commit_packages, package_flake};
use common::net::http_get;
use common::nix::{NixRecorder, nix_build_expression, nix_config, which};
use common::replies::terminal;
use common::requester::Requester;
use homelab_deploy::changes::{compare, unchanged};
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

// ---------------------------------------------------------------------------
// Through the builder

/// The `changes` of the one `host_finished`, and the `finished` host line's
/// counts.
fn reported_changes(
    replies: &[homelab_deploy::protocol::Reply],
) -> (Option<Changes>, Option<usize>, Option<i64>) {
    use homelab_deploy::protocol::Event;
    let changes = replies
        .iter()
        .find_map(|r| match &r.event {
            Event::HostFinished { changes, .. } => Some(changes.clone()),
            _ => None,
        })
        .expect("no host_finished");
    match terminal(replies) {
        Event::Finished { hosts, status, .. } => {
            assert_eq!(
                *status,
                homelab_deploy::protocol::BuildStatus::Success,
                "{replies:?}"
            );
            (changes, hosts[0].changed_packages, hosts[0].size_delta)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn every_result_says_what_it_changes_against_the_default_ref() {
    let flake = package_flake();
    commit_packages(
        &flake,
        &[
            ("openssl-3.0.14", "ssl"),
            ("nano-7.2", "an editor"),
            ("zlib-1.3", "z"),
        ],
        false,
        "first",
    );
    let roots = tempfile::tempdir().unwrap();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder(&format!("gc_roots_dir = \"{}\"", roots.path().display()))
    })
    .await;
    let client = Requester::new(&nats).await;

    // The first build has nothing to compare with.
    let first = client.build("build.homelab.ns1", "").await;
    let first_rev = flake.head();
    assert_eq!(reported_changes(&first), (None, None, None));

    // Unchanged: an empty list, no size change.
    let again = client.build("build.homelab.ns1", "").await;
    let (changes, count, delta) = reported_changes(&again);
    let changes = changes.expect("no changes for an unchanged rebuild");
    assert!(changes.packages.is_empty(), "{changes:?}");
    assert_eq!(
        (changes.closure_size_delta, count, delta),
        (0, Some(0), Some(0))
    );
    assert_eq!(changes.against.rev.as_deref(), Some(first_rev.as_str()));

    // A bump, an addition and a removal, named with their versions.
    commit_packages(
        &flake,
        &[
            ("openssl-3.0.15", "a longer ssl build"),
            ("htop-3.3.0", "a process viewer"),
            ("zlib-1.3", "z"),
        ],
        false,
        "update",
    );
    let updated = client.build("build.homelab.ns1", "").await;
    let (changes, count, delta) = reported_changes(&updated);
    let changes = changes.expect("no changes");
    let named: Vec<(&str, Vec<String>, Vec<String>)> = changes
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.before.clone(), p.after.clone()))
        .collect();
    let mut named = named;
    named.sort();
    assert_eq!(
        named,
        [
            ("htop", vec![], vec!["3.3.0".to_owned()]),
            ("nano", vec!["7.2".to_owned()], vec![]),
            (
                "openssl",
                vec!["3.0.14".to_owned()],
                vec!["3.0.15".to_owned()]
            ),
        ]
    );
    assert!(
        changes.packages.iter().all(|p| p.size_delta != 0),
        "{changes:?}"
    );
    assert_ne!(changes.closure_size_delta, 0);
    assert_eq!(count, Some(3));
    assert_eq!(delta, Some(changes.closure_size_delta));
    assert_eq!(changes.against.rev.as_deref(), Some(first_rev.as_str()));

    // A branch compares against the default ref's current result.
    let updated_rev = flake.head();
    flake.branch("feature");
    commit_packages(
        &flake,
        &[
            ("openssl-3.0.15", "a longer ssl build"),
            ("htop-3.3.0", "a process viewer"),
            ("zlib-1.3.1", "zz"),
        ],
        false,
        "feature",
    );
    let branch = client
        .build("build.homelab.ns1", r#"{"ref":"feature"}"#)
        .await;
    let (changes, count, _) = reported_changes(&branch);
    let changes = changes.expect("no changes for the branch");
    assert_eq!(changes.against.rev.as_deref(), Some(updated_rev.as_str()));
    assert_eq!(changes.packages.len(), 1, "{changes:?}");
    assert_eq!(changes.packages[0].name, "zlib");
    assert_eq!(changes.packages[0].before, ["1.3"]);
    assert_eq!(changes.packages[0].after, ["1.3.1"]);
    assert_eq!(count, Some(1));
}

#[tokio::test]
async fn an_unchanged_rebuild_reports_its_closure_size_without_reading_closures() {
    let flake = package_flake();
    commit_packages(
        &flake,
        &[("htop-3.3.0", "h"), ("zlib-1.3", "z")],
        false,
        "first",
    );
    let roots = tempfile::tempdir().unwrap();
    let recorder = NixRecorder::new();
    let (nats, mut builder) = start_service(&flake, |o| {
        o.builder(&format!("gc_roots_dir = \"{}\"", roots.path().display()))
            .path_prefix(recorder.path())
    })
    .await;
    let client = Requester::new(&nats).await;
    let first = client.build("build.homelab.ns1", "").await;
    let out_path = match terminal(&first) {
        homelab_deploy::protocol::Event::Finished { hosts, .. } => hosts[0].out_path.clone(),
        other => panic!("{other:?}"),
    }
    .expect("no out path");
    let dir = tempfile::tempdir().unwrap();
    let nix = nix_wrapper(dir.path(), "nix", &which("nix").unwrap());
    let size = changes(&nix, &out_path, &out_path).await.closure_size;

    // The first result's closure size is the host's gauge already.
    let (_, metrics) = http_get(&builder.metrics_addr().await, "/metrics").await;
    let gauge = format!(
        "homelab_deploy_builder_host_closure_size_bytes{{host=\"ns1\",repo=\"homelab\"}} {size}\n"
    );
    assert!(metrics.contains(&gauge), "{metrics}");

    recorder.clear();
    let again = client.build("build.homelab.ns1", "").await;
    let against = Against {
        out_path: out_path.clone(),
        rev: Some(flake.head()),
    };
    assert_eq!(
        reported_changes(&again),
        (Some(unchanged(against, size)), Some(0), Some(0))
    );
    assert!(
        recorder.with_arg("path-info").is_empty(),
        "closures were read: {:?}",
        recorder.invocations()
    );
    let request = roots.path().join(".requests").join(&again[0].build_id);
    let link = request.join("ns1").display().to_string();
    assert!(
        recorder.with_arg(&link).is_empty(),
        "the unchanged output was linked again: {:?}",
        recorder.invocations()
    );
}
