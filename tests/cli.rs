//! The `homelab-deploy` command line: output and exit codes, against a real
//! builder, nats-server and Nix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::builder::{Builder, BuilderOptions, start_service};
use common::cli::{describe, run_cli};
use common::flake::{Flake, Host};
use common::identity::nkey_user;
use common::nats::NatsServer;
use common::replies::{event_names, terminal};
use homelab_deploy::protocol::{Event, Reply};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn exit_0_when_every_host_succeeds() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let out = run_cli(&nats.url(), &["build", "homelab", "ns1", "ns2"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    // Two targets are two requests, one after the other.
    assert_eq!(text.matches(" accepted ").count(), 2, "{text}");
    assert!(text.contains("[1/1] ns1: success in"), "{text}");
    assert!(text.contains("[1/1] ns2: success in"), "{text}");
    assert_eq!(
        text.matches("success: 1 succeeded, 0 failed").count(),
        2,
        "{text}"
    );
}

#[tokio::test]
async fn exit_1_when_a_host_fails_with_its_error_shown() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let out = run_cli(&nats.url(), &["build", "homelab", "--all"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("[1/4] broken-build: FAILED"), "{text}");
    assert!(text.contains("error detail from broken-build"), "{text}");
    assert!(text.contains("[2/4] broken-eval: FAILED"), "{text}");
    assert!(text.contains("(eval_failed)"), "{text}");
    assert!(
        text.contains("failed: 2 succeeded, 2 failed")
            && text.contains("not built: broken-build, broken-eval"),
        "{text}"
    );
    // Not a terminal: no status-line escape codes.
    assert!(!text.contains('\u{1b}'), "{text:?}");
}

#[tokio::test]
async fn exit_1_when_the_request_fails_before_building() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let out = run_cli(&nats.url(), &["build", "homelab", "nope"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(stdout(&out).contains("unknown_host"), "{}", describe(&out));
}

#[tokio::test]
async fn exit_2_when_rejected_or_given_bad_arguments() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;

    for args in [
        &["build", "homelab"][..],
        &["build", "homelab", "--ref", "a..b", "ns1"],
        &["build", "homelab", "--rev", "xyz", "ns1"],
        &["build", "homelab", "bad.host"],
        &["build", "homelab", "--all", "ns1"],
        &["build", "homelab", "ns1", "--timeout", "soon"],
    ] {
        let out = run_cli(&nats.url(), args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        assert!(!stderr(&out).is_empty());
    }
}

#[tokio::test]
async fn exit_3_when_no_builder_answers() {
    let nats = NatsServer::start().await;
    let out = run_cli(&nats.url(), &["build", "homelab", "ns1"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no builder serves repo homelab (nobody is subscribed to build.homelab.ns1)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let out = run_cli(&nats.url(), &["status"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        stderr(&out).contains("no builder is listening on build.status"),
        "{}",
        describe(&out)
    );

    // No NATS server at all.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let out = run_cli(
        &format!("nats://127.0.0.1:{port}"),
        &["build", "homelab", "ns1"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        stderr(&out).contains("cannot connect to NATS"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn exit_3_when_no_builder_serves_the_repo() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    // The builder is not subscribed to repos it does not serve: NATS
    // answers "no responders", and the remaining targets are not asked.
    let out = run_cli(&nats.url(), &["build", "nope", "ns1", "ns2"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no builder serves repo nope (nobody is subscribed to build.nope.ns1)"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(stdout(&out).is_empty(), "{}", describe(&out));
}

#[tokio::test]
async fn exit_1_when_no_builder_has_the_build_to_cancel() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    for json in [false, true] {
        let mut args = vec!["cancel", "0123456789abcdef", "--timeout", "2s"];
        if json {
            args.push("--json");
        }
        let started = std::time::Instant::now();
        let out = run_cli(&nats.url(), &args).await;
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(
            stderr(&out).contains("no builder has a running or waiting build 0123456789abcdef"),
            "{}",
            describe(&out)
        );
        assert!(stdout(&out).is_empty(), "{}", describe(&out));
        // Silence is the answer: it takes the whole wait.
        assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    }
}

#[tokio::test]
async fn status_shows_every_builder_told_apart_by_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let signer = nkey_user(dir.path(), "builder");
    let flake = Flake::homelab();
    // Two builders of the same name: one signs its answers, one does not.
    let (nats, _signed) = start_service(&flake, |o| {
        o.signing_with(&signer.seed_file).builder("name = \"twin\"")
    })
    .await;
    let _unsigned = Builder::start(
        &nats,
        &BuilderOptions::new(&flake).builder("name = \"twin\""),
    )
    .await;

    let out = run_cli(&nats.url(), &["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    let headings: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("builder "))
        .collect();
    let signed = format!("builder twin (key {}, signed)", signer.public_key);
    assert_eq!(
        headings,
        [signed.as_str(), "builder twin (unsigned)"],
        "{text}"
    );
    assert_eq!(text.matches("repos: homelab").count(), 2, "{text}");
    assert!(
        text.starts_with(&format!("{signed}\nhomelab-deploy builder ")),
        "{text}"
    );

    // One JSON object per builder and line, in the same order.
    let out = run_cli(&nats.url(), &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let answers: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{}", describe(&out));
    for answer in &answers {
        assert_eq!(answer["event"], "status");
        assert_eq!(answer["builder"], "twin");
    }

    // With --builder-key, only the builder signing with it counts.
    let out = run_cli(
        &nats.url(),
        &["status", "--builder-key", &signer.public_key],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.starts_with(&signed), "{text}");
    assert!(!text.contains("(unsigned)"), "{text}");
}

#[tokio::test]
async fn exit_3_when_the_client_timeout_passes() {
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let out = run_cli(
        &nats.url(),
        &["build", "homelab", "slow", "--timeout", "5s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(stderr(&out).contains("gave up after"), "{}", describe(&out));
    flake.open_gate();
}

#[tokio::test]
async fn json_prints_every_event_exactly_as_received() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let out = run_cli(&nats.url(), &["build", "homelab", "ns1", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let replies: Vec<Reply> = stdout(&out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let names: Vec<_> = event_names(&replies)
        .into_iter()
        .filter(|n| *n != "progress")
        .collect();
    assert_eq!(
        names,
        [
            "accepted",
            "started",
            "host_started",
            "host_finished",
            "finished"
        ]
    );
    assert!(matches!(terminal(&replies), Event::Finished { .. }));
}

#[tokio::test]
async fn ref_flag_builds_the_branch() {
    let flake = Flake::homelab();
    flake.branch("flake-update");
    let rev = flake.commit_change("updated");
    flake.checkout("master");
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let out = run_cli(
        &nats.url(),
        &["build", "homelab", "ns1", "--ref", "flake-update", "--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let last: Reply = serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert!(matches!(last.event, Event::Finished { rev: Some(r), .. } if r == rev));
}

#[tokio::test]
async fn check_config_accepts_the_example_and_names_what_is_wrong() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let out = run_cli("nats://unused:1", &["check-config", "--config", example]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(stdout(&out), "ok\n");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let check = async |config: &str| {
        std::fs::write(&bad, config).unwrap();
        run_cli(
            "nats://unused:1",
            &["check-config", "--config", bad.to_str().unwrap()],
        )
        .await
    };
    let out = check(
        "[nats]\nurl = \"nats://x:4222\"\n[builder]\nqueue_limt = 3\n[repos.a]\nurl = \"git+file:///a\"\n",
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("queue_limt"), "{}", describe(&out));

    let out =
        check("[nats]\nurl = \"nats://x:4222\"\n[repos.responses]\nurl = \"git+file:///a\"\n")
            .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("reserved"), "{}", describe(&out));

    let out = run_cli(
        "nats://unused:1",
        &["check-config", "--config", "/nonexistent.toml"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[tokio::test]
async fn builder_refuses_to_start_with_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[nats]\nurl = \"nats://x:4222\"\n").unwrap();
    let out = run_cli(
        "nats://unused:1",
        &["builder", "--config", bad.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("repos"), "{}", describe(&out));
}

#[tokio::test]
async fn logs_flag_prints_the_build_output() {
    let flake = Flake::new(&[("noisy", Host::Noisy { lines: 5 })]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let out = run_cli(&nats.url(), &["build", "homelab", "noisy", "--logs"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = stdout(&out);
    for i in 0..5 {
        assert!(
            text.contains(&format!("  noisy | log line {i} of noisy\n")),
            "{text}"
        );
    }

    // A new commit, so the host really builds again, this time quietly.
    flake.commit_change("again");
    let out = run_cli(&nats.url(), &["build", "homelab", "noisy"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        stdout(&out).contains("noisy: success in"),
        "{}",
        describe(&out)
    );
    assert!(!stdout(&out).contains(" | "), "{}", describe(&out));
}
