//! GC roots against the real garbage collector: nothing the builder
//! evaluated or built is lost to a `nix-collect-garbage`, builds of other
//! refs never unroot the default ref's results, and side roots expire or,
//! past `side_roots_max`, are evicted.
//!
//! A real collection deletes every unrooted path of the one shared store,
//! so these tests live in their own binary (cargo runs test binaries one
//! after another) and take turns inside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::output_ok;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::builder::start_service;
use common::cli::describe;
use common::flake::{Flake, Host};
use common::nix::{NixRecorder, nix_command, nix_config};
use common::process::processes_matching;
use common::replies::{host_outcomes, terminal};
use common::requester::Requester;
use common::wait::{WAIT, wait_for};
use homelab_deploy::protocol::{BuildStatus, Event, HostStatus, Reply};

/// One collection at a time, and no build of another test meanwhile.
static STORE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs the garbage collector (the `nix-collect-garbage` beside `nix` on
/// PATH) and checks that it ran.
fn collect_garbage() {
    output_ok(std::process::Command::new("nix-collect-garbage").env("NIX_CONFIG", nix_config()));
}

fn roots_option(roots: &Path, extra: &str) -> String {
    format!("gc_roots_dir = \"{}\"\n{extra}", roots.display())
}

fn out_paths(replies: &[Reply]) -> Vec<(String, String)> {
    host_outcomes(replies)
        .into_iter()
        .map(|o| {
            assert_eq!(o.status, HostStatus::Success, "{}: {}", o.host, o.message);
            (o.host, o.out_path.unwrap())
        })
        .collect()
}

fn finished(replies: &[Reply]) -> BuildStatus {
    match terminal(replies) {
        Event::Finished { status, .. } => *status,
        other => panic!("not finished: {other:?}"),
    }
}

/// Where the link at `link` finally points, if it still resolves.
fn resolved(link: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(link).ok()
}

#[tokio::test]
async fn a_collection_during_an_all_build_loses_no_host() {
    let _store = STORE.lock().await;
    let flake = Flake::new(&[
        ("a-early", Host::Gated),
        ("b", Host::Ok),
        ("c", Host::Ok),
        ("d", Host::Ok),
    ]);
    let roots = tempfile::tempdir().unwrap();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder(&roots_option(roots.path(), "eval_workers = 2"))
    })
    .await;
    let client = Requester::new(&nats).await;
    let (mut pending, events) = client.send_until_started("build.homelab.all").await;
    let build_id = events[0].reply.build_id.clone();

    // Every host is evaluated (its derivation rooted for the request) while
    // the first one still builds; the evaluators have exited.
    let request = roots.path().join(".requests").join(&build_id);
    wait_for("every derivation to be rooted", WAIT, || {
        ["b", "c", "d"]
            .iter()
            .all(|h| request.join(format!("{h}.drv")).exists())
    })
    .await;
    let gate = flake.gate().display().to_string();
    wait_for("the evaluators to exit", WAIT, || {
        processes_matching("@homelab-deploy-eval").is_empty()
    })
    .await;
    wait_for("a-early to be building", WAIT, || {
        !processes_matching(&gate).is_empty()
    })
    .await;

    collect_garbage();
    flake.open_gate();

    let mut replies: Vec<Reply> = events.into_iter().map(|t| t.reply).collect();
    replies.extend(pending.until_terminal().await.into_iter().map(|t| t.reply));
    let built = out_paths(&replies);
    assert_eq!(finished(&replies), BuildStatus::Success);
    assert_eq!(built.len(), 4);
    // Every result is rooted as the host's current generation, and the
    // request's own roots are gone.
    for (host, out_path) in &built {
        let root = roots.path().join("homelab").join(host);
        assert_eq!(
            resolved(&root).as_deref(),
            Some(Path::new(out_path)),
            "{host}"
        );
    }
    assert!(!request.exists(), "the request's roots were left behind");
    collect_garbage();
    for (host, out_path) in &built {
        assert!(Path::new(out_path).exists(), "{host}: {out_path} collected");
    }
}

#[tokio::test]
async fn unchanged_hosts_stay_rooted_by_their_generation_through_a_collection() {
    let _store = STORE.lock().await;
    let flake = Flake::new(&[("a-gated", Host::Gated), ("b", Host::Ok), ("c", Host::Ok)]);
    let roots = tempfile::tempdir().unwrap();
    let recorder = NixRecorder::new();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder(&roots_option(roots.path(), "parallel_hosts = 2"))
            .path_prefix(recorder.path())
    })
    .await;
    let client = Requester::new(&nats).await;
    let mut before = Vec::new();
    for host in ["b", "c"] {
        before.extend(out_paths(
            &client.build(&format!("build.homelab.{host}"), "").await,
        ));
    }

    // `b` and `c` finish unchanged while `a-gated` still builds.
    recorder.clear();
    let (mut pending, events) = client.send_until_started("build.homelab.all").await;
    let build_id = events[0].reply.build_id.clone();
    let mut replies: Vec<Reply> = events.into_iter().map(|t| t.reply).collect();
    let unchanged_finished = |replies: &[Reply]| {
        ["b", "c"].iter().all(|host| {
            replies
                .iter()
                .any(|r| matches!(&r.event, Event::HostFinished { host: h, .. } if h == host))
        })
    };
    while !unchanged_finished(&replies) {
        replies.push(pending.next().await.reply);
    }
    // Their outputs got no link of the request, nor their remembered
    // derivations: their generations root the outputs.
    let request = roots.path().join(".requests").join(&build_id);
    for host in ["b", "c"] {
        for link in [host.to_owned(), format!("{host}.drv")] {
            assert!(
                std::fs::symlink_metadata(request.join(&link)).is_err(),
                "{link} was linked into the request"
            );
        }
    }
    assert!(request.join("a-gated.drv").exists());
    collect_garbage();
    flake.open_gate();
    replies.extend(pending.until_terminal().await.into_iter().map(|t| t.reply));
    assert_eq!(finished(&replies), BuildStatus::Success);

    let built = out_paths(&replies);
    for (host, out_path) in &before {
        assert!(
            built.contains(&(host.clone(), out_path.clone())),
            "{host}: {built:?}"
        );
        assert!(Path::new(out_path).exists(), "{host}: {out_path} collected");
        let current = roots.path().join("homelab").join(host);
        assert_eq!(resolved(&current).as_deref(), Some(Path::new(out_path)));
        // Not built into the request's link either.
        let link = request.join(host).display().to_string();
        assert!(
            recorder.with_arg(&link).is_empty(),
            "{host}: {:?}",
            recorder.invocations()
        );
    }
    let generations = std::fs::read_dir(roots.path().join("homelab/.gen"))
        .unwrap()
        .count();
    assert_eq!(generations, 3, "an unchanged host got a new generation");
}

#[tokio::test]
async fn other_refs_never_unroot_the_default_refs_result() {
    let _store = STORE.lock().await;
    let flake = Flake::homelab();
    let roots = tempfile::tempdir().unwrap();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder(&roots_option(roots.path(), "keep_roots = 2"))
            .repo("ref = \"master\"")
    })
    .await;
    let client = Requester::new(&nats).await;
    let deployed = out_paths(&client.build("build.homelab.ns1", "").await)[0]
        .1
        .clone();

    // Four builds of other refs (branches, and a rev), each a new output.
    let mut side = Vec::new();
    for i in 0..3 {
        let branch = format!("flake-update/{i}");
        flake.checkout("master");
        flake.branch(&branch);
        flake.commit_change(&format!("update {i}"));
        let body = format!(r#"{{"ref": "{branch}"}}"#);
        let replies = client.build("build.homelab.ns1", &body).await;
        side.push((
            format!("ref-flake-update%2F{i}"),
            out_paths(&replies)[0].1.clone(),
        ));
    }
    let rev = flake.commit_change("experiment");
    let body = format!(r#"{{"ref": "flake-update/2", "rev": "{rev}"}}"#);
    let replies = client.build("build.homelab.ns1", &body).await;
    side.push((format!("rev-{rev}"), out_paths(&replies)[0].1.clone()));

    let current = roots.path().join("homelab/ns1");
    assert_eq!(resolved(&current).as_deref(), Some(Path::new(&deployed)));
    collect_garbage();
    assert!(
        Path::new(&deployed).exists(),
        "the deployed output was collected"
    );
    assert_eq!(resolved(&current).as_deref(), Some(Path::new(&deployed)));
    // Each side ref keeps its latest result, apart from the default's.
    for (key, out_path) in &side {
        let link = roots.path().join("homelab/.refs").join(key).join("ns1");
        assert_eq!(
            resolved(&link).as_deref(),
            Some(Path::new(out_path)),
            "{key}"
        );
    }

    // Only the default ref's results are per-host series; the side results
    // show in `build.status` with their ref.
    let status = client.status().await;
    let refs: Vec<(Option<&str>, bool)> = status
        .last_results
        .iter()
        .map(|r| (r.git_ref.as_deref(), r.pinned))
        .collect();
    assert_eq!(refs.len(), 5, "{refs:?}");
    assert!(refs.contains(&(None, false)));
    assert!(refs.contains(&(Some("flake-update/0"), false)));
    assert!(refs.contains(&(Some("flake-update/2"), true)));
}

#[tokio::test]
async fn side_roots_expire_after_their_ttl_and_crashed_requests_are_swept() {
    let _store = STORE.lock().await;
    let flake = Flake::homelab();
    let roots = tempfile::tempdir().unwrap();
    // What a crash leaves behind: a request's roots.
    let stale = roots.path().join(".requests/0123456789abcdef");
    std::fs::create_dir_all(&stale).unwrap();
    std::os::unix::fs::symlink("/nix/store/nothing", stale.join("ns1")).unwrap();

    let (nats, _builder) = start_service(&flake, |o| {
        o.builder(&roots_option(roots.path(), "side_roots_ttl = \"2s\""))
    })
    .await;
    assert!(
        !stale.exists(),
        "the crashed request's roots were not swept"
    );
    let client = Requester::new(&nats).await;
    flake.branch("feature");
    flake.commit_change("feature");
    let replies = client
        .build("build.homelab.ns1", r#"{"ref": "feature"}"#)
        .await;
    let side_out = out_paths(&replies)[0].1.clone();
    let side = roots.path().join("homelab/.refs/ref-feature");
    assert_eq!(
        resolved(&side.join("ns1")).as_deref(),
        Some(Path::new(&side_out))
    );

    // Once the TTL has passed, the next request's end removes it.
    let stamp = side.join(".last-build");
    wait_for("the side root to outlive its TTL", WAIT, || {
        std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age > Duration::from_secs(2))
            })
    })
    .await;
    flake.checkout("master");
    client.build("build.homelab.ns2", "").await;
    assert!(!side.exists(), "the side root outlived its TTL");
    let status = client.status().await;
    assert!(
        status.last_results.iter().all(|r| r.git_ref.is_none()),
        "{:?}",
        status.last_results
    );
    collect_garbage();
    assert!(
        !Path::new(&side_out).exists(),
        "the expired output is still rooted"
    );
}

#[tokio::test]
async fn distinct_revs_past_side_roots_max_evict_the_oldest() {
    let _store = STORE.lock().await;
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let roots = tempfile::tempdir().unwrap();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder(&roots_option(roots.path(), "side_roots_max = 2"))
    })
    .await;
    let client = Requester::new(&nats).await;
    let mut built = Vec::new();
    for i in 0..3 {
        let rev = flake.commit_change(&format!("rev {i}"));
        let body = format!(r#"{{"ref": "master", "rev": "{rev}"}}"#);
        let replies = client.build("build.homelab.ns1", &body).await;
        built.push((rev, out_paths(&replies)[0].1.clone()));
    }

    let side = |rev: &str| roots.path().join(format!("homelab/.refs/rev-{rev}"));
    let (oldest, oldest_out) = &built[0];
    assert!(!side(oldest).exists(), "the oldest rev is still rooted");
    for (rev, out_path) in &built[1..] {
        assert_eq!(
            resolved(&side(rev).join("ns1")).as_deref(),
            Some(Path::new(out_path)),
            "{rev}"
        );
    }
    let status = client.status().await;
    let revs: Vec<Option<&str>> = status
        .last_results
        .iter()
        .filter(|r| r.pinned)
        .map(|r| r.rev.as_deref())
        .collect();
    assert_eq!(revs.len(), 2, "{revs:?}");
    assert!(!revs.contains(&Some(oldest.as_str())), "{revs:?}");
    collect_garbage();
    assert!(
        !Path::new(oldest_out).exists(),
        "the evicted output is still rooted"
    );
}

#[tokio::test]
async fn a_host_named_like_a_generation_takes_no_other_hosts_root() {
    let _store = STORE.lock().await;
    // `web-1-link` is a valid host name, and the name of `web`'s first
    // generation in a layout that kept both side by side.
    let flake = Flake::new(&[("web", Host::Ok), ("web-1-link", Host::Ok)]);
    let roots = tempfile::tempdir().unwrap();
    let (nats, _builder) =
        start_service(&flake, |o| o.builder(&roots_option(roots.path(), ""))).await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    assert_eq!(finished(&replies), BuildStatus::Success);
    let built = out_paths(&replies);
    assert_eq!(built.len(), 2);

    collect_garbage();
    for (host, out_path) in &built {
        assert!(Path::new(out_path).exists(), "{host}: {out_path} collected");
        let current = roots.path().join("homelab").join(host);
        assert_eq!(
            resolved(&current).as_deref(),
            Some(Path::new(out_path)),
            "{host}'s current link points elsewhere"
        );
    }
}

#[tokio::test]
async fn roots_of_the_earlier_layout_move_into_gen_without_being_unrooted() {
    let _store = STORE.lock().await;
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    // A result, rooted only where an earlier builder put it: a generation
    // beside the host's current link.
    let first = tempfile::tempdir().unwrap();
    let out_path = {
        let (nats, _builder) =
            start_service(&flake, |o| o.builder(&roots_option(first.path(), ""))).await;
        let client = Requester::new(&nats).await;
        out_paths(&client.build("build.homelab.ns1", "").await)[0]
            .1
            .clone()
    };
    let roots = tempfile::tempdir().unwrap();
    let repo = roots.path().join("homelab");
    std::fs::create_dir_all(&repo).unwrap();
    let old_generation = repo.join("ns1-1-link");
    let out = nix_command("nix")
        .args(["build", "--out-link"])
        .arg(&old_generation)
        .arg(&out_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    std::os::unix::fs::symlink("ns1-1-link", repo.join("ns1")).unwrap();
    drop(first);
    collect_garbage();
    assert!(
        Path::new(&out_path).exists(),
        "the earlier root does not hold"
    );

    let (_nats, _builder) =
        start_service(&flake, |o| o.builder(&roots_option(roots.path(), ""))).await;
    assert_eq!(
        std::fs::read_link(repo.join("ns1")).unwrap(),
        Path::new(".gen/ns1-1-link")
    );
    assert!(
        std::fs::symlink_metadata(&old_generation).is_err(),
        "the old link is left"
    );
    collect_garbage();
    assert!(
        Path::new(&out_path).exists(),
        "the moved root does not hold"
    );
    assert_eq!(
        resolved(&repo.join("ns1")).as_deref(),
        Some(Path::new(&out_path))
    );
}
