//! Evaluation ahead of builds, cached outputs, progress and log streaming,
//! against a real builder, nats-server and Nix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::builder::start_service;
use common::flake::{Flake, Host};
use common::nix::NixRecorder;
use common::process::processes_matching;
use common::replies::{event_names, host_outcomes, log_lines, terminal, untimed};
use common::requester::Requester;
use common::wait::{WAIT, wait_for};
use homelab_deploy::protocol::{
    BuildStatus, ErrorCode, Event, HostStatus, MAX_LOG_EVENT_BYTES, Reply,
};

/// `nix eval ... --apply` invocations: one per evaluator process.
fn evaluator_processes(recorder: &NixRecorder) -> usize {
    recorder
        .with_arg("--apply")
        .iter()
        .filter(|argv| !argv.iter().any(|a| a == "builtins.attrNames"))
        .count()
}

#[tokio::test]
async fn a_host_builds_while_a_later_host_is_still_evaluating() {
    // "z-last" cannot finish evaluating until the gate opens; "a-first"
    // must build (and finish) in the meantime.
    let flake = Flake::new(&[("a-first", Host::Ok), ("z-last", Host::EvalGated)]);
    let (nats, builder) = start_service(&flake, |o| o.builder("eval_workers = 1")).await;
    let client = Requester::new(&nats).await;

    let mut pending = client.send("build.homelab.all", "").await;
    let early = tokio::time::timeout(
        Duration::from_secs(30),
        pending.until(|e| matches!(e, Event::HostFinished { .. })),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the first host did not build while the last was still evaluating:\n{}",
            builder.log_text()
        )
    });
    let first = host_outcomes(&early.into_iter().map(|t| t.reply).collect::<Vec<_>>());
    assert_eq!(first[0].host, "a-first");
    assert_eq!(first[0].status, HostStatus::Success);
    // The gate is still closed: z-last cannot have been evaluated yet.
    assert!(!flake.gate().exists());

    flake.open_gate();
    let rest: Vec<Reply> = untimed(pending.until_terminal().await);
    let last = host_outcomes(&rest);
    assert_eq!(last[0].host, "z-last");
    assert_eq!(last[0].status, HostStatus::Success, "{}", last[0].message);
    assert!(matches!(
        terminal(&rest),
        Event::Finished {
            status: BuildStatus::Success,
            succeeded: 2,
            ..
        }
    ));
}

#[tokio::test]
async fn evaluation_failures_stay_with_their_host() {
    let flake = Flake::new(&[
        ("a", Host::Ok),
        ("b", Host::FailEval),
        ("c", Host::Ok),
        ("d", Host::FailEvalHard),
        ("e", Host::Ok),
    ]);
    let recorder = NixRecorder::new();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder("eval_workers = 1").path_prefix(recorder.path())
    })
    .await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.all", "").await;
    let hosts = host_outcomes(&replies);
    let statuses: Vec<(&str, HostStatus)> =
        hosts.iter().map(|h| (h.host.as_str(), h.status)).collect();
    assert_eq!(
        statuses,
        [
            ("a", HostStatus::Success),
            ("b", HostStatus::Failed),
            ("c", HostStatus::Success),
            ("d", HostStatus::Failed),
            ("e", HostStatus::Success),
        ]
    );
    assert_eq!(hosts[1].code, Some(ErrorCode::EvalFailed));
    assert!(
        hosts[1].message.contains("host b does not evaluate"),
        "{}",
        hosts[1].message
    );
    assert_eq!(hosts[3].code, Some(ErrorCode::EvalFailed));
    assert!(!hosts[3].message.is_empty());
    assert!(
        !hosts[3].message.contains("host b"),
        "d got b's error: {}",
        hosts[3].message
    );
    // One evaluator for a..b, a fresh one after each failure: c..d, then e.
    assert_eq!(evaluator_processes(&recorder), 3);
}

#[tokio::test]
async fn hosts_share_one_evaluator_unless_it_outgrows_eval_max_memory() {
    let flake = Flake::new(&[("a", Host::Ok), ("b", Host::Ok), ("c", Host::Ok)]);
    let recorder = NixRecorder::new();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder("eval_workers = 1").path_prefix(recorder.path())
    })
    .await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    assert!(matches!(
        terminal(&replies),
        Event::Finished {
            status: BuildStatus::Success,
            ..
        }
    ));
    assert_eq!(evaluator_processes(&recorder), 1);

    // Every evaluator is over a 1 KiB bound after its first host. "b"
    // cannot finish evaluating until the gate opens, so only a replacement
    // process can get past it: the first one must be stopped after "a".
    let flake = Flake::new(&[("a", Host::Ok), ("b", Host::EvalGated), ("c", Host::Ok)]);
    let recorder = NixRecorder::new();
    let (nats, builder) = start_service(&flake, |o| {
        o.builder("eval_workers = 1\neval_max_memory = \"1KiB\"")
            .path_prefix(recorder.path())
    })
    .await;
    let client = Requester::new(&nats).await;
    let mut pending = client.send("build.homelab.all", "").await;
    wait_for("a second evaluator process", WAIT, || {
        evaluator_processes(&recorder) >= 2
    })
    .await;
    flake.open_gate();
    let replies: Vec<Reply> = untimed(pending.until_terminal().await);
    assert!(
        matches!(
            terminal(&replies),
            Event::Finished {
                status: BuildStatus::Success,
                succeeded: 3,
                ..
            }
        ),
        "{replies:?}\n{}",
        builder.log_text()
    );
}

#[tokio::test]
async fn parallel_evaluators_split_the_hosts() {
    let flake = Flake::new(&[
        ("a", Host::Ok),
        ("b", Host::Ok),
        ("c", Host::Ok),
        ("d", Host::Ok),
    ]);
    let recorder = NixRecorder::new();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder("eval_workers = 2").path_prefix(recorder.path())
    })
    .await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    assert!(matches!(
        terminal(&replies),
        Event::Finished {
            status: BuildStatus::Success,
            succeeded: 4,
            ..
        }
    ));
    let evaluators = recorder.with_arg("--apply");
    let batches: Vec<String> = evaluators
        .iter()
        .filter_map(|argv| argv.last().cloned())
        .filter(|e| e.contains("builtins.foldl'"))
        .map(|e| e.rsplit_once('[').unwrap().1.to_owned())
        .collect();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert!(
        batches.iter().any(|b| b.contains(r#""a" "c""#)),
        "{batches:?}"
    );
    assert!(
        batches.iter().any(|b| b.contains(r#""b" "d""#)),
        "{batches:?}"
    );
}

#[tokio::test]
async fn outputs_already_in_the_store_are_reported_without_building() {
    let flake = Flake::homelab();
    let recorder = NixRecorder::new();
    let (nats, _builder) = start_service(&flake, |o| {
        o.repo("exclude = [\"broken-build\", \"broken-eval\"]")
            .path_prefix(recorder.path())
    })
    .await;
    let client = Requester::new(&nats).await;

    let first = client.build("build.homelab.all", "").await;
    assert!(
        host_outcomes(&first)
            .iter()
            .all(|h| h.status == HostStatus::Success && !h.cached)
    );
    recorder.clear();

    let second = client.build("build.homelab.all", "").await;
    let hosts = host_outcomes(&second);
    assert_eq!(hosts.len(), 2);
    assert!(
        hosts
            .iter()
            .all(|h| h.status == HostStatus::Success && h.cached),
        "{hosts:?}"
    );
    match terminal(&second) {
        Event::Finished { hosts, status, .. } => {
            assert_eq!(*status, BuildStatus::Success);
            assert!(hosts.iter().all(|h| h.cached && h.out_path.is_some()));
        }
        other => panic!("{other:?}"),
    }
    // Nothing was built or evaluated again: the flake did not change.
    assert!(
        recorder.with_arg("build").is_empty(),
        "{:?}",
        recorder.invocations()
    );
    assert_eq!(
        evaluator_processes(&recorder),
        0,
        "{:?}",
        recorder.invocations()
    );
}

#[tokio::test]
async fn logs_are_streamed_in_bounded_batches_when_asked_for() {
    let flake = Flake::new(&[("noisy", Host::Noisy { lines: 3000 }), ("quiet", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let mut pending = client.send("build.homelab.noisy", r#"{"logs":true}"#).await;
    let mut lines = Vec::new();
    let mut events = 0;
    loop {
        let message =
            tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut pending.subscriber))
                .await
                .unwrap()
                .unwrap();
        let reply: Reply = serde_json::from_slice(&message.payload).unwrap();
        if let Event::Log { host, lines: batch } = &reply.event {
            assert_eq!(host, "noisy");
            assert!(
                message.payload.len() <= MAX_LOG_EVENT_BYTES,
                "{} bytes",
                message.payload.len()
            );
            events += 1;
            lines.extend(batch.iter().cloned());
        }
        if reply.is_terminal() {
            break;
        }
    }
    assert!(events >= 2, "3000 lines should not fit one event");
    assert!(
        lines.iter().any(|l| l.contains("building '")),
        "{:?}",
        &lines[..5]
    );
    let built: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("log line "))
        .collect();
    assert_eq!(built.len(), 3000);
    assert_eq!(built[0], "log line 0 of noisy");
    assert_eq!(built[2999], "log line 2999 of noisy");

    // Nix's own error, which quotes the build log over several lines,
    // arrives line by line too.
    let flake = Flake::new(&[("broken", Host::FailBuild)]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let replies = client
        .build("build.homelab.broken", r#"{"logs":true}"#)
        .await;
    let lines = log_lines(&replies);
    assert!(
        lines.iter().any(|l| l.contains("failed with exit code 3")),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| !l.contains('\n')), "{lines:?}");

    // Without the flag there are no log events.
    let flake = Flake::new(&[("noisy", Host::Noisy { lines: 100 })]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.noisy", "").await;
    assert!(!event_names(&replies).contains(&"log"));
}

#[tokio::test]
async fn a_hung_evaluation_times_out_alone() {
    // The IFD never finishes within host_timeout; the next host still
    // builds. The timeout leaves a loaded machine room to fetch, start a
    // fresh evaluator and build the next host, each under it.
    let flake = Flake::new(&[("a-hung", Host::EvalGated), ("b-fine", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| {
        o.host_timeout("10s").builder("eval_workers = 1")
    })
    .await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    let hosts = host_outcomes(&replies);
    assert_eq!(hosts[0].host, "a-hung");
    assert_eq!(hosts[0].status, HostStatus::Timeout, "{}", hosts[0].message);
    assert_eq!(hosts[0].code, Some(ErrorCode::Timeout));
    assert_eq!(
        (hosts[1].host.as_str(), hosts[1].status),
        ("b-fine", HostStatus::Success)
    );
    // Nix starts the IFD's builder in a session of its own, so in
    // single-user mode it outlives its killed evaluator (under the daemon,
    // the daemon stops it). Let it finish rather than run on into later tests.
    flake.open_gate();
    let gate = flake.gate().display().to_string();
    wait_for("the hung evaluation's build to be gone", WAIT, || {
        processes_matching(&gate).is_empty()
    })
    .await;
}
