//! Hardening: permissions and credentials, bounded resources, cancellation,
//! shutdown, NATS outages and hostile input — against a real builder,
//! nats-server and Nix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::process::output_ok;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::builder::{Builder, BuilderOptions, start_service};
use common::cli::{describe, run_cli, spawn_cli};
use common::flake::{Flake, Host};
use common::flood::Flood;
use common::identity::{Identities, nkey_user};
use common::nats::NatsServer;
use common::net::{free_port, http_get, metric};
use common::nix::{NixRecorder, which};
use common::process::{child_pids, memory_kib, processes_matching};
use common::replies::{event_names, finished, host_outcomes, log_lines, terminal, untimed};
use common::requester::{Requester, connect_as};
use common::wait::{WAIT, wait_for};
use futures_util::StreamExt;
use homelab_deploy::protocol::{BuildStatus, ErrorCode, Event, HostStatus, Reply};

// ---------------------------------------------------------------------------
// Permissions

async fn builds_work_under(config_file: &str) {
    let ids = Identities::new();
    let nats = NatsServer::start_with_config(&ids.server_config(config_file)).await;
    let flake = Flake::homelab();
    let options = BuilderOptions::new(&flake);
    let config = options.config_text(&nats.url()).replace(
        "[metrics]",
        &format!(
            "nkey_seed_file = \"{}\"\n\n[metrics]",
            ids.builder.seed_file.display()
        ),
    );
    let mut builder = Builder::spawn_with(&config, &options);
    builder.wait_serving().await;

    // The CLI as the test deployer, end to end.
    let seed = ids.test_deployer.seed_arg();
    let out = run_cli(
        &nats.url(),
        &["build", "homelab", "ns1", "--nkey-file", seed],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{config_file}: {}",
        describe(&out)
    );
    let admin = ids.admin.seed_arg();
    let out = run_cli(&nats.url(), &["status", "--nkey-file", admin]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{config_file}: {}",
        describe(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("homelab/ns1"));

    // A user without build.> publish rights cannot start a build, and a
    // three-token build.responses.x is never a build.
    let outsider = connect_as(&nats, &ids.outsider).await;
    let mut refused = outsider.send("build.homelab.ns2", "").await;
    let deployer = connect_as(&nats, &ids.test_deployer).await;
    let mut not_a_build = deployer.send("build.responses.ns2", "").await;
    let answered = deployer.build("build.homelab.broken-build", "").await;
    assert!(matches!(terminal(&answered), Event::Finished { .. }));
    assert!(
        refused.try_next().is_none(),
        "{config_file}: the outsider got an answer"
    );
    assert!(
        not_a_build.try_next().is_none(),
        "{config_file}: build.responses.* was answered"
    );
    let log = builder.log_text();
    assert_eq!(
        log.matches("request accepted").count(),
        2,
        "{config_file}:\n{log}"
    );
    assert!(!log.contains("target=ns2"), "{config_file}:\n{log}");
}

/// The flood tests take turns: each measures how the builder keeps up,
/// and two at once on 2 cores would measure each other.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn builds_work_with_exactly_the_plans_permissions() {
    builds_work_under("nats-server.example.conf").await;
}

#[tokio::test]
async fn builds_work_with_the_strict_permissions() {
    builds_work_under("nats-server.strict.example.conf").await;
}

#[tokio::test]
async fn under_strict_permissions_deployers_cannot_forge_replies() {
    let ids = Identities::new();
    let nats =
        NatsServer::start_with_config(&ids.server_config("nats-server.strict.example.conf")).await;
    let admin = connect_as(&nats, &ids.admin).await;
    let mut victim = admin
        .nats
        .subscribe("build.responses.victim.1")
        .await
        .unwrap();
    let mut marker = admin.nats.subscribe("deploy.test.marker").await.unwrap();
    admin.nats.flush().await.unwrap();

    let forger = connect_as(&nats, &ids.test_deployer).await;
    forger
        .nats
        .publish("build.responses.victim.1", r#"{"event":"finished"}"#.into())
        .await
        .unwrap();
    // Then something it may publish: messages from one connection arrive
    // in order, so once this is here the forgery would be too.
    forger
        .nats
        .publish("deploy.test.marker", "".into())
        .await
        .unwrap();
    forger.nats.flush().await.unwrap();
    tokio::time::timeout(WAIT, marker.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        futures_util::FutureExt::now_or_never(victim.next()).is_none(),
        "a deployer published under build.responses."
    );
}

#[tokio::test]
async fn seed_files_must_exist_and_be_private() {
    let dir = tempfile::tempdir().unwrap();
    let flake = Flake::homelab();
    let nats = NatsServer::start().await;
    let config_with = |seed: &Path| {
        BuilderOptions::new(&flake)
            .config_text(&nats.url())
            .replace(
                "[metrics]",
                &format!("nkey_seed_file = \"{}\"\n\n[metrics]", seed.display()),
            )
    };
    let run_builder = async |config: String| {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        run_cli(
            &nats.url(),
            &["builder", "--config", path.to_str().unwrap()],
        )
        .await
    };

    let missing = dir.path().join("missing.nk");
    let out = run_builder(config_with(&missing)).await;
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("NKey seed file") && err.contains("missing.nk"),
        "{err}"
    );

    let seed = nkey_user(dir.path(), "open").seed_file;
    std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_builder(config_with(&seed)).await;
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("readable by every user"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn tls_servers_are_reached_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    let openssl = |args: &[&str]| {
        output_ok(std::process::Command::new("openssl").args(args));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        &path("ca.key"),
        "-out",
        &path("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &path("server.key"),
        "-out",
        &path("server.csr"),
    ]);
    std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &path("san.ext"),
        "-out",
        &path("server.pem"),
    ]);
    let nats = NatsServer::start_with_config(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        path("server.pem"),
        path("server.key")
    ))
    .await;
    let url = format!("tls://127.0.0.1:{}", nats.port);

    let flake = Flake::homelab();
    let options = BuilderOptions::new(&flake);
    let config = options.config_text(&url).replace(
        "[metrics]",
        &format!("tls_ca_file = \"{}\"\n\n[metrics]", path("ca.pem")),
    );
    let mut builder = Builder::spawn_with(&config, &options);
    builder.wait_serving().await;
    let out = run_cli(
        &url,
        &["build", "homelab", "ns1", "--tls-ca-file", &path("ca.pem")],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // Without the CA the server's certificate is not trusted.
    let out = run_cli(&url, &["build", "homelab", "ns1"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

// ---------------------------------------------------------------------------
// Bounded resources

#[tokio::test]
async fn a_200_mb_log_flood_keeps_the_builder_under_64_mb() {
    let _alone = FLOODS.lock().await;
    let flake = Flake::new(&[("flood", Host::Flood { lines: 200_000 })]);
    let (nats, builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let replies = client
        .build("build.homelab.flood", r#"{"logs":true}"#)
        .await;
    assert_eq!(finished(&replies).status, BuildStatus::Success);
    let lines = log_lines(&replies);
    assert!(!lines.is_empty());
    assert!(
        lines.iter().any(|l| l.contains("lines skipped")),
        "the flood was not thinned"
    );
    let peak = memory_kib(builder.pid(), "VmHWM:");
    eprintln!("builder peak RSS during a 200 MB log: {} KiB", peak);
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB");
}

#[tokio::test]
async fn identical_waiting_requests_are_coalesced() {
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    let (nats, builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let (mut running, _) = client.send_until_started("build.homelab.slow").await;

    let mut first = client.send("build.homelab.ns1", "").await;
    let first_accepted = first.next().await.reply;
    let mut second = client.send("build.homelab.ns1", "").await;
    let second_accepted = second.next().await.reply;
    assert_eq!(second_accepted.build_id, first_accepted.build_id);
    assert!(matches!(
        second_accepted.event,
        Event::Accepted {
            queue_position: 1,
            ..
        }
    ));
    // A different request is not coalesced.
    let mut other = client.send("build.homelab.ns1", r#"{"logs":true}"#).await;
    let other_accepted = other.next().await.reply;
    assert_ne!(other_accepted.build_id, first_accepted.build_id);

    flake.open_gate();
    running.until_terminal().await;
    let a = untimed(first.until_terminal().await);
    let b = untimed(second.until_terminal().await);
    let names = |r: &[Reply]| {
        event_names(r)
            .into_iter()
            .filter(|n| *n != "progress")
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&a),
        ["started", "host_started", "host_finished", "finished"]
    );
    assert_eq!(names(&a), names(&b));
    assert!(b.iter().all(|r| r.build_id == first_accepted.build_id));
    assert_eq!(finished(&b).status, BuildStatus::Success);
    other.until_terminal().await;
    assert_eq!(
        builder
            .log_text()
            .matches("joined an identical waiting build")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_flood_of_malformed_requests_is_rejected_without_nix_or_growth() {
    let _alone = FLOODS.lock().await;
    const FLOOD: usize = 10_000;
    let flake = Flake::homelab();
    let recorder = NixRecorder::new();
    let (nats, builder) = start_service(&flake, |o| o.path_prefix(recorder.path())).await;
    let client = Requester::new(&nats).await;
    let mut replies = client
        .nats
        .subscribe("build.responses.flood.*")
        .await
        .unwrap();
    client.nats.flush().await.unwrap();
    let before = memory_kib(builder.pid(), "VmRSS:");

    let started = Instant::now();
    let bodies = [
        "{",
        "[]",
        r#"{"ref":"--x"}"#,
        r#"{"rev":"nope"}"#,
        r#"{"what":1}"#,
    ];
    for i in 0..FLOOD {
        client
            .nats
            .publish_with_reply(
                "build.homelab.ns1",
                format!("build.responses.flood.{i}"),
                bodies[i % bodies.len()].into(),
            )
            .await
            .unwrap();
    }
    client.nats.flush().await.unwrap();
    let mut rejected = 0;
    while rejected < FLOOD {
        let Ok(message) = tokio::time::timeout(Duration::from_secs(20), replies.next()).await
        else {
            panic!(
                "only {rejected} of {FLOOD} answered:\n{}",
                builder
                    .log_text()
                    .lines()
                    .filter(|l| !l.contains("request rejected"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        };
        let message = message.unwrap();
        let reply: Reply = serde_json::from_slice(&message.payload).unwrap();
        match reply.event {
            Event::Rejected { error, .. } => assert_eq!(error.code, ErrorCode::InvalidRequest),
            other => panic!("{other:?}"),
        }
        rejected += 1;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{FLOOD} malformed requests rejected in {:.2} s ({:.0}/s)",
        elapsed.as_secs_f64(),
        FLOOD as f64 / elapsed.as_secs_f64()
    );
    let after = memory_kib(builder.pid(), "VmRSS:");
    assert!(
        after < before + 10 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    // Only the version check and the look at Nix's remote builders ran;
    // no request reached Nix.
    let invocations = recorder.invocations();
    assert!(
        invocations.iter().all(|argv| argv
            .iter()
            .any(|a| a == "--version" || a == "show-config" || a == "config")),
        "{invocations:?}"
    );
}

/// Messages in each flood below: at least the million the bound is set for.
const FLOOD_MESSAGES: usize = 1_000_000;

/// The builder's `requests_ignored_total` and `requests_rejected_total`,
/// summed over their labels.
async fn turned_away(metrics_addr: &str) -> (f64, f64) {
    let (_, text) = http_get(metrics_addr, "/metrics").await;
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|line| line.starts_with(name))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum("homelab_deploy_builder_requests_ignored_total"),
        sum("homelab_deploy_builder_requests_rejected_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_status_requests_leaves_memory_flat_and_builds_answered() {
    let _alone = FLOODS.lock().await;
    let flake = Flake::homelab();
    let (nats, mut builder) = start_service(&flake, |o| o).await;
    let metrics_addr = builder.metrics_addr().await;
    let client = Requester::new(&nats).await;
    client.status().await;
    let before = memory_kib(builder.pid(), "VmRSS:");

    // The attacker reads the answers too: the server must deliver them.
    let flood = Flood::start(
        &nats,
        FLOOD_MESSAGES,
        "build.status",
        "build.responses.flood",
        &[b""],
        true,
    )
    .await;
    flood.wait_sent(FLOOD_MESSAGES * 3 / 10, WAIT).await;
    let asked = Instant::now();
    let mut pending = client.send("build.homelab.ns1", "").await;
    let first = pending.next().await;
    let latency = first.at - asked;
    let (sent, flood_time) = flood.finish().await;
    let rest = untimed(pending.until_terminal().await);
    let peak = memory_kib(builder.pid(), "VmHWM:");
    let after = memory_kib(builder.pid(), "VmRSS:");
    let (ignored, rejected) = turned_away(&metrics_addr).await;
    eprintln!(
        "{sent} status requests in {:.2} s; accepted after {:.0} ms; RSS {before} KiB before, \
         peak {peak} KiB, {after} KiB after; ignored {ignored}, rejected {rejected}",
        flood_time.as_secs_f64(),
        latency.as_secs_f64() * 1000.0,
    );

    assert!(
        matches!(first.reply.event, Event::Accepted { .. }),
        "{first:?}"
    );
    assert!(
        latency < Duration::from_secs(2),
        "accepted only after {latency:?} during the flood"
    );
    assert_eq!(finished(&rest).status, BuildStatus::Success, "{rest:?}");
    assert!(
        peak < before + 64 * 1024,
        "RSS grew from {before} KiB to a peak of {peak} KiB"
    );
    // The builder kept up: never cut off by the server as a slow consumer.
    assert!(
        !builder.log_text().contains("disconnected from NATS"),
        "{}",
        builder.log_text()
    );
}

/// A flood on the very subject of a build outpaces the builder on 2 cores:
/// what its subscription cannot hold is dropped in the NATS client, and a
/// build request dropped there is accepted when the CLI sends it again
/// (the schedule, every half second for 4 s then less often, is a unit
/// test in src/client.rs; here: accepted while the CLI still re-sends).
/// Memory stays bounded either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_flood_of_malformed_requests_a_build_is_accepted_while_the_client_resends() {
    let _alone = FLOODS.lock().await;
    let flake = Flake::homelab();
    let (nats, mut builder) = start_service(&flake, |o| o).await;
    let metrics_addr = builder.metrics_addr().await;
    let before = memory_kib(builder.pid(), "VmRSS:");

    let bodies: [&[u8]; 4] = [b"{", b"[]", br#"{"rev":"nope"}"#, br#"{"what":1}"#];
    let flood = Flood::start(
        &nats,
        FLOOD_MESSAGES,
        "build.homelab.ns1",
        "build.responses.flood",
        &bodies,
        true,
    )
    .await;
    flood.wait_sent(FLOOD_MESSAGES * 3 / 10, WAIT).await;

    // The real CLI, as another user would run it.
    let asked = Instant::now();
    let mut cli = spawn_cli(&nats.url(), &["build", "homelab", "ns1"]);
    let stdout = cli.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut printed = Vec::new();
    let latency = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let accepted = line.contains(" accepted ");
            printed.push(line);
            if accepted {
                return Some(asked.elapsed());
            }
        }
        None
    })
    .await
    .expect("the CLI printed nothing in time");
    let (sent, flood_time) = flood.finish().await;
    while let Some(line) = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the CLI did not finish in time")
        .unwrap()
    {
        printed.push(line);
    }
    let status = tokio::time::timeout(WAIT, cli.wait())
        .await
        .expect("the CLI did not exit in time")
        .unwrap();
    let peak = memory_kib(builder.pid(), "VmHWM:");
    let (ignored, rejected) = turned_away(&metrics_addr).await;
    eprintln!(
        "{sent} malformed requests in {:.2} s; accepted after {latency:?}; RSS {before} KiB \
         before, peak {peak} KiB; ignored {ignored}, rejected {rejected}",
        flood_time.as_secs_f64(),
    );

    let latency = latency.unwrap_or_else(|| panic!("never accepted: {printed:?}"));
    // The last re-send goes out 19 s after the request.
    assert!(
        latency < Duration::from_secs(20),
        "accepted only after {latency:?}"
    );
    assert_eq!(status.code(), Some(0), "{printed:?}");
    assert!(
        peak < before + 64 * 1024,
        "RSS grew from {before} KiB to a peak of {peak} KiB"
    );
}

// ---------------------------------------------------------------------------
// Cancellation, timeouts and shutdown

#[tokio::test]
async fn cancel_stops_a_waiting_and_a_running_build() {
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    // Unsigned builds are cancelled by an admin (see tests/verdicts.rs for
    // who else may cancel what).
    let ids = Identities::new();
    let (nats, _builder) = start_service(&flake, |o| {
        o.auth(&format!("admins = [\"{}\"]", ids.admin.public_key))
    })
    .await;
    let admin = ids.admin.seed_arg();
    let client = Requester::new(&nats).await;
    let (mut running, events) = client.send_until_started("build.homelab.slow").await;
    let running_id = events[0].reply.build_id.clone();
    let mut waiting = client.send("build.homelab.ns1", "").await;
    let waiting_id = waiting.next().await.reply.build_id;

    let out = run_cli(&nats.url(), &["cancel", &waiting_id, "--nkey-file", admin]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled while queued"));
    let rest = untimed(waiting.until_terminal().await);
    assert_eq!(event_names(&rest), ["finished"]);
    assert_eq!(
        finished(&rest).status_and_message(),
        (BuildStatus::Cancelled, Some("cancelled by request".into()))
    );

    let out = run_cli(
        &nats.url(),
        &["cancel", &running_id, "--json", "--nkey-file", admin],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["event"], "cancel");
    assert_eq!(reply["found"], true);
    assert_eq!(reply["state"], "running");
    let rest = untimed(running.until_terminal().await);
    assert_eq!(host_outcomes(&rest)[0].status, HostStatus::Cancelled);
    assert_eq!(host_outcomes(&rest)[0].code, Some(ErrorCode::Cancelled));
    assert_eq!(
        finished(&rest).status_and_message(),
        (BuildStatus::Cancelled, Some("cancelled by request".into()))
    );
    let gate = flake.gate().display().to_string();
    wait_for("the cancelled build's processes to be gone", WAIT, || {
        processes_matching(&gate).is_empty()
    })
    .await;

    let out = run_cli(&nats.url(), &["cancel", &running_id, "--nkey-file", admin]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let out = run_cli(&nats.url(), &["cancel", "$(id)"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    // A bad id is a usage error even with no NATS to ask.
    let out = run_cli(
        &format!("nats://127.0.0.1:{}", free_port()),
        &["cancel", "$(id)"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    // The builder carries on.
    let after = client.build("build.homelab.ns1", "").await;
    assert_eq!(finished(&after).status, BuildStatus::Success);
}

#[tokio::test]
async fn max_silent_time_stops_a_silent_build() {
    let flake = Flake::new(&[("quiet", Host::Gated)]);
    let (nats, _builder) = start_service(&flake, |o| o.builder("max_silent_time = \"2s\"")).await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.quiet", "").await;
    let host = &host_outcomes(&replies)[0];
    assert_eq!(host.status, HostStatus::Timeout, "{}", host.message);
    assert_eq!(host.code, Some(ErrorCode::Timeout));
    assert!(host.message.contains("max_silent_time"), "{}", host.message);
}

/// A misbehaving `nix`: for builds it runs the real one, but on SIGTERM it
/// takes three seconds to exit, so a shutdown has something to wait for.
fn slow_to_stop_nix() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let real = which("nix").expect("nix not found");
    let script = format!(
        "#!/bin/sh\ncase \" $* \" in\n  *\" build \"*) trap '/bin/sleep 3; exit 143' TERM; {real} \"$@\" & child=$!; wait $child; status=$?; wait $child 2>/dev/null; exit $status ;;\n  *) exec {real} \"$@\" ;;\nesac\n",
        real = real.trim()
    );
    let path = dir.path().join("nix");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn sigterm_drains_in_time_refuses_new_work_and_leaves_no_nix() {
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    let slow = slow_to_stop_nix();
    let (nats, mut builder) =
        start_service(&flake, |o| o.path_prefix(slow.path().to_owned())).await;
    let client = Requester::new(&nats).await;
    let (mut running, _) = client.send_until_started("build.homelab.slow").await;
    let mut waiting = client.send("build.homelab.ns1", "").await;
    waiting.next().await;
    // Wait for the build itself (not only its evaluation) to be running.
    let gate = flake.gate().display().to_string();
    wait_for("the build to run", WAIT, || {
        !processes_matching(&gate).is_empty()
    })
    .await;
    let children = child_pids(builder.pid());

    let pid = builder.pid();
    let started = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    builder.wait_stopping().await;
    // While the running build stops, new requests are refused.
    let refused = client.build("build.homelab.ns1", r#"{"logs":true}"#).await;
    match terminal(&refused) {
        Event::Rejected { error, .. } => assert_eq!(error.code, ErrorCode::ShuttingDown),
        other => panic!("{other:?}"),
    }
    let status = builder.terminate().await;
    let took = started.elapsed();
    eprintln!("shutdown took {:.2} s", took.as_secs_f64());
    assert!(status.success(), "{status:?}");
    assert!(
        took < homelab_deploy::SHUTDOWN_BUDGET,
        "shutdown took {took:?}"
    );

    let rest = untimed(running.until_terminal().await);
    assert_eq!(finished(&rest).status, BuildStatus::Cancelled);
    let rest = untimed(waiting.until_terminal().await);
    assert_eq!(
        finished(&rest).status_and_message(),
        (
            BuildStatus::Cancelled,
            Some("the builder is shutting down".into())
        )
    );
    for child in children {
        assert!(
            !Path::new(&format!("/proc/{child}")).exists()
                || std::fs::read_to_string(format!("/proc/{child}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "child {child} survived the builder"
        );
    }
}

// ---------------------------------------------------------------------------
// NATS outages

#[tokio::test]
async fn a_nats_outage_mid_build_loses_no_events() {
    let flake = Flake::new(&[("slow", Host::Gated), ("after", Host::Ok)]);
    let (mut nats, mut builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let (mut pending, _) = client.send_until_started("build.homelab.all").await;

    nats.stop();
    builder.wait_nats_disconnected().await;
    nats.restart().await;
    wait_for("the requester to reconnect", WAIT, || {
        client.nats.connection_state() == async_nats::connection::State::Connected
    })
    .await;
    flake.open_gate();
    let rest = untimed(pending.until_terminal().await);
    let hosts: Vec<(String, HostStatus)> = host_outcomes(&rest)
        .into_iter()
        .map(|h| (h.host, h.status))
        .collect();
    assert_eq!(
        hosts,
        [
            ("after".into(), HostStatus::Success),
            ("slow".into(), HostStatus::Success)
        ]
    );
    assert_eq!(finished(&rest).status, BuildStatus::Success);
}

#[tokio::test]
async fn a_terminal_event_outlives_an_outage_longer_than_the_build() {
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let (mut nats, mut builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let (mut pending, _) = client.send_until_started("build.homelab.slow").await;

    nats.stop();
    builder.wait_nats_disconnected().await;
    flake.open_gate();
    builder.wait_builds_finished(1.0).await;
    nats.restart().await;
    let rest = untimed(pending.until_terminal().await);
    assert_eq!(host_outcomes(&rest)[0].status, HostStatus::Success);
    assert_eq!(finished(&rest).status, BuildStatus::Success);
    let addr = builder.metrics_addr().await;
    let (_, text) = http_get(&addr, "/metrics").await;
    assert!(metric(&text, "homelab_deploy_builder_nats_reconnects_total").unwrap() >= 1.0);
}

#[tokio::test]
async fn the_builder_starts_before_nats_is_reachable() {
    let flake = Flake::homelab();
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let options = BuilderOptions::new(&flake);
    let mut builder = Builder::spawn_with(&options.config_text(&url), &options);
    let addr = builder.metrics_addr().await;
    let (status, body) = http_get(&addr, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("disconnected"), "{body}");

    let nats = NatsServer::start_on(port, None).await;
    builder.wait_serving().await;
    let (status, body) = http_get(&addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.ns1", "").await;
    assert_eq!(finished(&replies).status, BuildStatus::Success);
}

#[tokio::test]
async fn a_builder_waiting_for_nats_still_stops_on_sigterm() {
    let flake = Flake::homelab();
    let url = format!("nats://127.0.0.1:{}", free_port());
    let options = BuilderOptions::new(&flake);
    let mut builder = Builder::spawn_with(&options.config_text(&url), &options);
    builder.metrics_addr().await;
    let started = Instant::now();
    assert!(builder.terminate().await.success());
    assert!(started.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// Hostile input

#[tokio::test]
async fn hostile_targets_and_refs_never_reach_nix() {
    let flake = Flake::homelab();
    let recorder = NixRecorder::new();
    let (nats, _builder) = start_service(&flake, |o| o.path_prefix(recorder.path())).await;
    let client = Requester::new(&nats).await;

    let hostile = [
        "--option",
        "-x",
        "ns1#foo",
        "$(id)",
        "`id`",
        "\"quoted\"",
        "'q'",
        "ñandú",
        "ns1;reboot",
        "a\u{202e}b",
        "%2e%2e",
    ];
    for target in hostile {
        let replies = client.build(&format!("build.homelab.{target}"), "").await;
        match terminal(&replies) {
            Event::Rejected { error, .. } => {
                assert_eq!(error.code, ErrorCode::InvalidRequest, "{target}")
            }
            other => panic!("{target}: {other:?}"),
        }
    }
    let long = "x".repeat(64 * 1024);
    let hostile_refs: Vec<&str> = hostile
        .iter()
        .copied()
        .chain([
            "../x",
            "a/../../etc",
            "master\nrev=1",
            "master&dir=..",
            long.as_str(),
        ])
        .collect();
    for git_ref in &hostile_refs {
        let body = serde_json::json!({ "ref": git_ref }).to_string();
        let replies = client.build("build.homelab.ns1", &body).await;
        match terminal(&replies) {
            Event::Rejected { error, .. } => assert_eq!(error.code, ErrorCode::InvalidRequest),
            other => panic!("ref {git_ref:?}: {other:?}"),
        }
    }
    // A well-formed host that does not exist is checked against the flake,
    // not passed to Nix.
    let replies = client.build("build.homelab.no-such-host", "").await;
    match terminal(&replies) {
        Event::Finished {
            error: Some(error), ..
        } => assert_eq!(error.code, ErrorCode::UnknownHost),
        other => panic!("{other:?}"),
    }

    let invocations = recorder.invocations();
    assert!(!invocations.is_empty());
    for argv in &invocations {
        for arg in argv {
            for bad in hostile_refs.iter().chain(["no-such-host"].iter()) {
                assert!(!arg.contains(bad), "{bad:?} reached nix: {argv:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// .creds files (operator mode, JWTs signed here)

fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": homelab_deploy::protocol::random_hex::<16>().to_uppercase(),
        "iat": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let payload = b64.encode(claims.to_string());
    let signature = issuer
        .sign(format!("{header}.{payload}").as_bytes())
        .unwrap();
    format!("{header}.{payload}.{}", b64.encode(signature))
}

fn creds_file(dir: &Path, name: &str, account: &nkeys::KeyPair) -> std::path::PathBuf {
    let user = nkeys::KeyPair::new_user();
    let token = jwt(
        account,
        &user.public_key(),
        name,
        serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
    );
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    let path = dir.join(format!("{name}.creds"));
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[tokio::test]
async fn creds_files_authenticate_builder_and_client() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "homelab",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "DEPLOY",
        serde_json::json!({
            "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                       "wildcards": true, "conn": -1, "leaf": -1},
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account", "version": 2
        }),
    );
    let nats = NatsServer::start_with_config(&format!(
        "operator: \"{operator_jwt}\"\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{account_jwt}\"\n}}\n",
        account.public_key()
    )).await;
    let builder_creds = creds_file(dir.path(), "builder", &account);
    let deployer_creds = creds_file(dir.path(), "deployer", &account);

    // Without credentials the server refuses the connection.
    let out = run_cli(&nats.url(), &["status"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        describe(&out)
    );

    let flake = Flake::homelab();
    let options = BuilderOptions::new(&flake);
    let config = options.config_text(&nats.url()).replace(
        "[metrics]",
        &format!(
            "credentials_file = \"{}\"\n\n[metrics]",
            builder_creds.display()
        ),
    );
    let mut builder = Builder::spawn_with(&config, &options);
    builder.wait_serving().await;
    let creds = deployer_creds.to_str().unwrap();
    let out = run_cli(
        &nats.url(),
        &["build", "homelab", "ns1", "--creds-file", creds],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}
