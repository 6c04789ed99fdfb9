//! Restarts lose nothing: requests running or waiting when the builder
//! stops (SIGTERM) or crashes (SIGKILL) are picked up from the journal at
//! the next start, under the same build ids, at the same rev, without
//! building again the hosts that finished — against a real builder,
//! nats-server and Nix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::builder::{Builder, BuilderOptions};
use common::cli::{BIN, describe};
use common::flake::{Flake, Host};
use common::nats::NatsServer;
use common::replies::{host_outcomes, terminal, untimed};
use common::requester::Requester;
use common::wait::{WAIT, poll};
use homelab_deploy::protocol::{BuildStatus, Event, HostStatus, Reply};

/// Options for a builder journaling into `dir`; the same options start
/// the same builder again.
fn journaled(flake: &Flake, dir: &std::path::Path) -> BuilderOptions {
    BuilderOptions::new(flake).builder(&format!(
        "journal_file = \"{}\"",
        dir.join("journal").display()
    ))
}

/// The hosts that got `host_started` in `replies`.
fn started_hosts(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter_map(|r| match &r.event {
            Event::HostStarted { host, .. } => Some(host.clone()),
            _ => None,
        })
        .collect()
}

async fn a_stopped_builder_resumes(crash: bool) {
    let dir = tempfile::tempdir().unwrap();
    let flake = Flake::new(&[("a", Host::Ok), ("b", Host::Gated), ("c", Host::Ok)]);
    let nats = NatsServer::start().await;
    let options = journaled(&flake, dir.path());
    let mut builder = Builder::start(&nats, &options).await;
    let client = Requester::new(&nats).await;

    let mut all = client.send("build.homelab.all", "").await;
    let before = all
        .until(|e| matches!(e, Event::HostStarted { host, .. } if host == "b"))
        .await;
    let build_id = before[0].reply.build_id.clone();
    let built_a = host_outcomes(&untimed(before.clone()));
    assert_eq!(built_a.len(), 1);
    assert_eq!(built_a[0].status, HostStatus::Success);
    let mut waiting = client.send("build.homelab.c", "").await;
    let waiting_id = waiting.next().await.reply.build_id;

    if crash {
        builder.kill();
    } else {
        let stopping = Instant::now();
        assert!(builder.terminate().await.success());
        assert!(stopping.elapsed() < homelab_deploy::SHUTDOWN_BUDGET);
        for pending in [&mut all, &mut waiting] {
            let event = pending
                .until(|e| matches!(e, Event::Interrupted { .. }))
                .await;
            assert!(
                matches!(
                    event.last().unwrap().reply.event,
                    Event::Interrupted { resume: true }
                ),
                "{event:?}"
            );
        }
    }
    // The builder is back with the same configuration.
    let _builder = Builder::start(&nats, &options).await;
    flake.open_gate();

    let after = untimed(all.until_terminal().await);
    assert!(after.iter().all(|r| r.build_id == build_id), "{after:?}");
    match &after[0].event {
        Event::Resumed { done, .. } => assert_eq!(done, &["a"]),
        other => panic!("not resumed first: {other:?}"),
    }
    assert_eq!(
        started_hosts(&after),
        ["b", "c"],
        "host a must not build again"
    );
    assert_eq!(after.iter().filter(|r| r.is_terminal()).count(), 1);
    match terminal(&after) {
        Event::Finished {
            status, hosts, rev, ..
        } => {
            assert_eq!(*status, BuildStatus::Success, "{after:?}");
            let names: Vec<&str> = hosts.iter().map(|h| h.host.as_str()).collect();
            assert_eq!(names, ["a", "b", "c"]);
            assert_eq!(hosts[0].out_path, built_a[0].out_path);
            assert_eq!(rev.as_deref(), Some(flake.head().as_str()));
        }
        other => panic!("{other:?}"),
    }

    let rest = untimed(waiting.until_terminal().await);
    assert!(rest.iter().all(|r| r.build_id == waiting_id), "{rest:?}");
    assert!(matches!(rest[0].event, Event::Resumed { .. }), "{rest:?}");
    assert_eq!(rest.iter().filter(|r| r.is_terminal()).count(), 1);
    assert!(
        matches!(
            terminal(&rest),
            Event::Finished {
                status: BuildStatus::Success,
                ..
            }
        ),
        "{rest:?}"
    );
}

#[tokio::test]
async fn requests_stopped_by_sigterm_resume_after_a_restart() {
    a_stopped_builder_resumes(false).await;
}

#[tokio::test]
async fn requests_cut_off_by_a_crash_resume_after_a_restart() {
    a_stopped_builder_resumes(true).await;
}

#[tokio::test]
async fn a_journal_with_a_torn_last_record_still_starts_and_resumes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    let nats = NatsServer::start().await;
    let options = journaled(&flake, dir.path());
    let mut builder = Builder::start(&nats, &options).await;
    let client = Requester::new(&nats).await;
    let (mut running, _) = client.send_until_started("build.homelab.slow").await;
    builder.kill();
    // A write cut short by the crash.
    let journal = dir.path().join("journal");
    let mut text = std::fs::read_to_string(&journal).unwrap();
    text.push_str("{\"record\":\"accepted\",\"build_id\":\"00");
    std::fs::write(&journal, text).unwrap();

    let builder = Builder::start(&nats, &options).await;
    assert!(
        builder
            .log_text()
            .contains("skipped unreadable journal lines")
    );
    flake.open_gate();
    let rest = untimed(running.until_terminal().await);
    assert!(matches!(rest[0].event, Event::Resumed { .. }), "{rest:?}");
    assert!(
        matches!(
            terminal(&rest),
            Event::Finished {
                status: BuildStatus::Success,
                ..
            }
        ),
        "{rest:?}"
    );
}

#[tokio::test]
async fn without_resume_a_stop_cancels_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let nats = NatsServer::start().await;
    let options = journaled(&flake, dir.path()).arg("--no-resume");
    let mut builder = Builder::start(&nats, &options).await;
    let client = Requester::new(&nats).await;
    let (mut running, _) = client.send_until_started("build.homelab.slow").await;
    assert!(builder.terminate().await.success());
    let rest = untimed(running.until_terminal().await);
    assert!(
        matches!(
            terminal(&rest),
            Event::Finished {
                status: BuildStatus::Cancelled,
                ..
            }
        ),
        "{rest:?}"
    );
    flake.open_gate();
    // Nothing is left for the next start.
    let _builder = Builder::start(&nats, &options).await;
    assert!(running.try_next().is_none());
}

#[tokio::test]
async fn a_client_waiting_for_the_builder_succeeds_once_one_starts() {
    let dir = tempfile::tempdir().unwrap();
    let flake = Flake::homelab();
    let nats = NatsServer::start().await;
    let client = tokio::process::Command::new(BIN)
        .args(["build", "homelab", "ns1", "--wait-for-builder", "60s"])
        .env("HOMELAB_DEPLOY_NATS_URL", nats.url())
        .env_remove("HOMELAB_DEPLOY_BUILDER_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // NATS answers "no responders" while no builder listens: the client
    // keeps asking. Start one only after the client has been refused.
    let probe = nats.connect().await;
    poll(
        "NATS to report no responders",
        async || probe.request("build.homelab.ns1", "".into()).await.is_err(),
        |refused| *refused,
    )
    .await;
    let _builder = Builder::start(&nats, &journaled(&flake, dir.path())).await;
    let out = tokio::time::timeout(WAIT, client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// Kills the builder at 20 moments of a scripted sequence of requests and
/// checks, each time, that every accepted request gets its terminal event
/// once a builder is back, with one outcome (a replay of it is allowed).
#[tokio::test]
async fn every_accepted_request_gets_its_one_outcome_across_kills() {
    let dir = tempfile::tempdir().unwrap();
    let flake = Flake::new(&[("a", Host::Ok), ("b", Host::Ok), ("c", Host::FailBuild)]);
    let nats = NatsServer::start().await;
    let options = journaled(&flake, dir.path());
    let client = Requester::new(&nats).await;
    // HOMELAB_DEPLOY_TEST_SEED replays the moments of an earlier run.
    let seed: u64 = match std::env::var("HOMELAB_DEPLOY_TEST_SEED") {
        Ok(seed) => seed.parse().expect("HOMELAB_DEPLOY_TEST_SEED is a number"),
        Err(_) => u64::from_str_radix(&homelab_deploy::protocol::random_hex::<4>(), 16).unwrap(),
    };
    eprintln!("kill moments from seed {seed} (HOMELAB_DEPLOY_TEST_SEED replays them)");
    let mut state = seed | 1;
    let mut next_delay = || {
        // xorshift: a reproducible spread of moments from the seed.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        Duration::from_millis(state % 1500)
    };
    let started = Instant::now();
    let (mut accepted_total, mut resumed_total, mut replayed) = (0, 0, 0);
    let mut builder = Builder::start(&nats, &options).await;
    for round in 0..20 {
        let mut pending = Vec::new();
        let mut first = Vec::new();
        for subject in ["build.homelab.all", "build.homelab.a", "build.homelab.c"] {
            let mut request = client.send(subject, "{\"logs\":true}").await;
            // Accepted (so on disk) before the kill can come.
            first.push(request.next().await.reply);
            pending.push(request);
        }
        tokio::time::sleep(next_delay()).await;
        if round % 2 == 0 {
            builder.kill();
        } else {
            assert!(builder.terminate().await.success());
        }
        let stopped_log = builder.log_text();
        builder = Builder::start(&nats, &options).await;
        for (i, (request, first)) in pending.iter_mut().zip(first).enumerate() {
            let mut events = vec![first];
            if !events[0].is_terminal() {
                // Within Pending's own wait, so the logs can be shown.
                let rest = tokio::time::timeout(WAIT / 2, request.until_terminal()).await;
                let Ok(rest) = rest else {
                    let id = &events[0].build_id;
                    panic!(
                        "round {round}, request {i}: no terminal event after {events:?}\n\
                         stopped builder, lines of {id}:\n{}\n\
                         new builder, lines of {id} and its last lines:\n{}\n...\n{}",
                        lines_of(&stopped_log, id),
                        lines_of(&builder.log_text(), id),
                        last_lines(&builder.log_text(), 30),
                    );
                };
                events.extend(untimed(rest));
            }
            let id = &events[0].build_id;
            assert!(
                events.iter().all(|r| &r.build_id == id),
                "round {round}: {events:?}"
            );
            let terminals = events.iter().filter(|r| r.is_terminal()).count();
            assert_eq!(terminals, 1, "round {round}, request {i}: {events:?}");
            accepted_total += usize::from(
                events
                    .iter()
                    .any(|r| matches!(r.event, Event::Accepted { .. })),
            );
            resumed_total += usize::from(
                events
                    .iter()
                    .any(|r| matches!(r.event, Event::Resumed { .. })),
            );
            // Only a replay may follow the terminal event: a builder killed
            // between sending `finished` and recording it sends the same
            // outcome again after `resumed`.
            let outcome = |event: &Event| match event {
                Event::Finished { status, .. } => Some(*status),
                _ => None,
            };
            let first_outcome = outcome(&events.last().unwrap().event);
            while let Some(late) = request.try_next() {
                assert_eq!(late.build_id, *id, "round {round}: {late:?}");
                if late.is_terminal() {
                    assert_eq!(
                        outcome(&late.event),
                        first_outcome,
                        "round {round}: {late:?} after the terminal one of {events:?}"
                    );
                    replayed += 1;
                }
            }
        }
    }
    eprintln!(
        "20 kills in {:?}: {accepted_total} requests accepted, {resumed_total} resumed after a restart, {replayed} terminal events replayed",
        started.elapsed()
    );
    assert!(resumed_total > 0, "no kill caught a request in flight");
}

/// The lines of `log` that mention `needle`.
fn lines_of(log: &str, needle: &str) -> String {
    log.lines()
        .filter(|line| line.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The last `count` lines of `log`.
fn last_lines(log: &str, count: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}
