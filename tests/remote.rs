//! Nix's distributed builds against a second store on this machine (see
//! [`common::RemoteStore`]): derivations build where Nix sends them, come
//! back rooted, and every `host_finished` says where they were built.
//!
//! Remote builds need Nix's build hook, which only the system Nix (2.8)
//! can run here; with the private Nix 2.26 these tests say why they skip.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::builder::start_service;
use common::cli::describe;
use common::flake::{Flake, Host};
use common::net::{http_get, metric};
use common::nix::{nix_command, nix_config};
use common::remote::RemoteStore;
use common::replies::{finished, host_outcomes, terminal, untimed};
use common::requester::Requester;
use common::wait::poll;
use homelab_deploy::protocol::{BuildStatus, ErrorCode, Event, HostStatus};

/// The remote's URI as events name it: the key path masked.
const REMOTE: &str = "ssh-ng://root@127.0.0.1?ssh-key=***";

fn skip_without_remote_builds() -> bool {
    match RemoteStore::unsupported() {
        Some(reason) => {
            eprintln!("skipped: remote builds cannot run here: {reason}");
            true
        }
        None => false,
    }
}

/// The GC roots of `path` in the builder's store.
fn roots_of(path: &str) -> String {
    let out = nix_command("nix-store")
        .args(["--query", "--roots", path])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn without_local_builds_every_host_builds_remotely_and_comes_back_rooted() {
    if skip_without_remote_builds() {
        return;
    }
    let remote = RemoteStore::start().await;
    let roots = tempfile::tempdir().unwrap();
    let flake = Flake::new(&[("ns1", Host::Ok), ("ns2", Host::Ok)]);
    let (nats, mut builder) = start_service(&flake, |o| {
        o.builder(&format!("gc_roots_dir = \"{}\"", roots.path().display()))
            .env("NIX_CONFIG", &remote.nix_config(Some(0)))
            .env("NIX_SSHOPTS", &remote.ssh_opts())
    })
    .await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.all", "").await;

    assert_eq!(
        finished(&replies).status,
        BuildStatus::Success,
        "{replies:?}"
    );
    let outcomes = host_outcomes(&replies);
    assert_eq!(outcomes.len(), 2);
    let mut remote_builds = 0;
    for outcome in outcomes {
        let out = outcome.out_path.clone().unwrap();
        assert!(remote.has(&out), "{out} is not in the remote store");
        assert!(
            std::path::Path::new(&out).exists(),
            "{out} did not come back"
        );
        assert!(
            roots_of(&out).contains(&roots.path().display().to_string()),
            "{out} is not rooted in the builder's store"
        );
        let built_remotely = outcome.machines.get(REMOTE).copied().unwrap_or(0);
        assert!(
            built_remotely >= 1,
            "{}: {:?}",
            outcome.host,
            outcome.machines
        );
        assert_eq!(
            outcome.machines.keys().collect::<Vec<_>>(),
            [REMOTE],
            "{}: nothing builds locally with max-jobs = 0",
            outcome.host
        );
        remote_builds += built_remotely;
    }

    let metrics = http_get(&builder.metrics_addr().await, "/metrics").await.1;
    let series = format!("homelab_deploy_builder_remote_builds_total{{machine=\"{REMOTE}\"}}");
    assert_eq!(
        metric(&metrics, &series),
        Some(remote_builds as f64),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_remote_machine_that_is_down_falls_back_to_local_builds() {
    if skip_without_remote_builds() {
        return;
    }
    let mut remote = RemoteStore::start().await;
    remote.stop();
    let flake = Flake::new(&[("ns1", Host::Ok), ("ns2", Host::Ok)]);
    let (nats, mut builder) = start_service(&flake, |o| {
        o.env("NIX_CONFIG", &remote.nix_config(None))
            .env("NIX_SSHOPTS", &remote.ssh_opts())
    })
    .await;
    let client = Requester::new(&nats).await;
    let addr = builder.metrics_addr().await;
    let up = format!("homelab_deploy_builder_machine_up{{machine=\"{REMOTE}\"}}");
    poll(
        "the first check to find the machine down",
        async || metric(&http_get(&addr, "/metrics").await.1, &up),
        |value| value.is_some(),
    )
    .await;
    let status = client.status().await;
    assert_eq!(status.machines.len(), 1, "{:?}", status.machines);
    assert_eq!(status.machines[0].up, Some(false));
    assert!(status.machines[0].error.is_some());
    assert_eq!(metric(&http_get(&addr, "/metrics").await.1, &up), Some(0.0));

    let replies = client.build("build.homelab.all", "").await;

    assert_eq!(
        finished(&replies).status,
        BuildStatus::Success,
        "{replies:?}"
    );
    for outcome in host_outcomes(&replies) {
        assert!(!remote.has(outcome.out_path.as_deref().unwrap()));
        assert_eq!(
            outcome.machines.keys().collect::<Vec<_>>(),
            ["localhost"],
            "{}: {:?}",
            outcome.host,
            outcome.machines
        );
    }
}

#[tokio::test]
async fn without_local_builds_and_every_machine_down_hosts_fail_naming_the_machine() {
    if skip_without_remote_builds() {
        return;
    }
    let mut remote = RemoteStore::start().await;
    remote.stop();
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| {
        o.env("NIX_CONFIG", &remote.nix_config(Some(0)))
            .env("NIX_SSHOPTS", &remote.ssh_opts())
    })
    .await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.ns1", "").await;

    let outcomes = host_outcomes(&replies);
    assert_eq!(outcomes.len(), 1);
    let outcome = &outcomes[0];
    assert_eq!(outcome.status, HostStatus::Failed);
    assert_eq!(outcome.code, Some(ErrorCode::BuildFailed));
    assert!(
        outcome
            .message
            .contains(&format!("cannot build on '{REMOTE}'")),
        "{}",
        outcome.message
    );
    assert!(
        outcome.message.contains("max-jobs = 0"),
        "{}",
        outcome.message
    );
    assert_eq!(outcome.machines, BTreeMap::new());
}

/// Hosts of the capacity tests: each build takes 1.5 s.
const SLOW_HOSTS: [&str; 4] = ["h1", "h2", "h3", "h4"];
const SLOW_MILLIS: u32 = 1500;

/// Builds `all` of a fresh flake of [`SLOW_HOSTS`] with `parallel_hosts`
/// and `nix_env`; returns the replies and the request's duration.
async fn build_slow_hosts(
    parallel_hosts: usize,
    nix_env: &[(&str, String)],
) -> (Vec<homelab_deploy::protocol::Reply>, u64) {
    let hosts: Vec<(&str, Host)> = SLOW_HOSTS
        .iter()
        .map(|h| {
            (
                *h,
                Host::Slow {
                    millis: SLOW_MILLIS,
                },
            )
        })
        .collect();
    let flake = Flake::new(&hosts);
    let (nats, _builder) = start_service(&flake, |mut o| {
        // Enough evaluators that evaluation never waits: what is measured
        // is building.
        o = o.builder(&format!(
            "parallel_hosts = {parallel_hosts}\neval_workers = 4"
        ));
        for (key, value) in nix_env {
            o = o.env(key, value);
        }
        o
    })
    .await;
    let client = Requester::new(&nats).await;
    let timed = client
        .send("build.homelab.all", "")
        .await
        .until_terminal()
        .await;
    let replies: Vec<_> = timed.into_iter().map(|t| t.reply).collect();
    let duration = match terminal(&replies) {
        Event::Finished {
            status,
            duration_ms,
            hosts,
            ..
        } => {
            assert_eq!(*status, BuildStatus::Success, "{replies:?}");
            let order: Vec<&str> = hosts.iter().map(|h| h.host.as_str()).collect();
            assert_eq!(order, SLOW_HOSTS, "finished lists hosts in order");
            *duration_ms
        }
        other => panic!("not finished: {other:?}"),
    };
    (replies, duration)
}

/// The host events in the order sent: `+host` started (with its index),
/// `-host` finished.
fn host_events(replies: &[homelab_deploy::protocol::Reply]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| match &r.event {
            Event::HostStarted { host, index, .. } => Some(format!("+{host}@{index}")),
            Event::HostFinished { host, .. } => Some(format!("-{host}")),
            _ => None,
        })
        .collect()
}

/// Whether a host started before the one before it finished.
fn interleaved(events: &[String]) -> bool {
    events
        .windows(2)
        .any(|pair| pair[0].starts_with('+') && pair[1].starts_with('+'))
}

async fn parallel_hosts_is_faster_than_one_at_a_time(nix_env: &[(&str, String)], what: &str) {
    let (one, sequential) = build_slow_hosts(1, nix_env).await;
    let (two, parallel) = build_slow_hosts(2, nix_env).await;
    eprintln!(
        "{what}: {} hosts of {SLOW_MILLIS} ms: parallel_hosts = 1 took {sequential} ms, 2 took {parallel} ms",
        SLOW_HOSTS.len()
    );

    let one = host_events(&one);
    assert_eq!(
        one,
        [
            "+h1@1", "-h1", "+h2@2", "-h2", "+h3@3", "-h3", "+h4@4", "-h4"
        ],
        "one at a time by default"
    );
    let two = host_events(&two);
    assert!(interleaved(&two), "{two:?}");
    let started: Vec<&String> = two.iter().filter(|e| e.starts_with('+')).collect();
    assert_eq!(started, ["+h1@1", "+h2@2", "+h3@3", "+h4@4"]);
    assert!(
        parallel * 10 < sequential * 8,
        "parallel_hosts = 2 took {parallel} ms, 1 took {sequential} ms"
    );
}

#[tokio::test]
async fn parallel_hosts_builds_hosts_at_once_in_their_order() {
    // Without a daemon every `nix build` has its own max-jobs, so two
    // hosts build at once on this machine alone.
    // Hosts share a derivation: the second waits for the first to build it,
    // looking again every build-poll-interval (5 s by default).
    let env = [(
        "NIX_CONFIG",
        format!("{}build-poll-interval = 1\n", nix_config()),
    )];
    parallel_hosts_is_faster_than_one_at_a_time(&env, "local").await;
}

#[tokio::test]
async fn parallel_hosts_uses_a_remote_builders_capacity() {
    if skip_without_remote_builds() {
        return;
    }
    let remote = RemoteStore::start().await;
    let env = [
        (
            "NIX_CONFIG",
            format!("{}build-poll-interval = 1\n", remote.nix_config(Some(0))),
        ),
        ("NIX_SSHOPTS", remote.ssh_opts()),
    ];
    parallel_hosts_is_faster_than_one_at_a_time(&env, "remote").await;
}

#[tokio::test]
async fn with_parallel_hosts_the_status_shows_every_host_building() {
    let hosts = [
        ("h1", Host::Slow { millis: 5000 }),
        ("h2", Host::Slow { millis: 5000 }),
    ];
    let flake = Flake::new(&hosts);
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder("parallel_hosts = 2\neval_workers = 2").env(
            "NIX_CONFIG",
            &format!("{}build-poll-interval = 1\n", nix_config()),
        )
    })
    .await;
    let client = Requester::new(&nats).await;
    let mut request = client.send("build.homelab.all", "").await;
    let mut started = 0;
    while started < 2 {
        if let Event::HostStarted { .. } = request.next().await.reply.event {
            started += 1;
        }
    }
    // Both hosts build for seconds after both `host_started`.
    let status = client.status().await;
    let running = status.running.expect("a build is running");
    let building: Vec<(&str, usize)> = running
        .hosts
        .iter()
        .map(|h| (h.host.as_str(), h.index))
        .collect();
    assert_eq!(building, [("h1", 1), ("h2", 2)], "{running:?}");
    assert_eq!((running.finished, running.total), (0, Some(2)));

    let replies: Vec<_> = untimed(request.until_terminal().await);
    assert_eq!(finished(&replies).status, BuildStatus::Success);
    assert!(client.status().await.running.is_none());
}
