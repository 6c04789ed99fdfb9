//! Operating the builder: metrics, health, `build.status`, systemd
//! notifications, logs and the monitoring files, against a real builder,
//! nats-server and Nix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::builder::{Builder, BuilderOptions, start_service};
use common::cli::{describe, run_cli};
use common::flake::{Flake, Host};
use common::nats::NatsServer;
use common::net::{free_port, http_get, metric};
use common::replies::{event_names, terminal};
use common::requester::Requester;
use common::wait::{WAIT, poll};
use homelab_deploy::protocol::{BuildStatus, Event, HostStatus, StatusEvent};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn series(name: &str, labels: &str) -> String {
    format!("homelab_deploy_builder_{name}{{{labels}}}")
}

async fn scrape(builder: &mut Builder) -> String {
    let addr = builder.metrics_addr().await;
    let (status, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    body
}

fn promtool(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is not installed; ./scripts/test installs it (Debian: prometheus)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn metrics_count_builds_hosts_and_rejections_and_pass_promtool() {
    let flake = Flake::homelab();
    let (nats, mut builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    client.build("build.homelab.ns1", "").await;
    client.build("build.homelab.broken-build", "").await;
    client.build("build.homelab.ns1", "{").await;
    client.build("build.homelab.ns1", r#"{"ref":"-x"}"#).await;

    let text = scrape(&mut builder).await;
    let value = |name: &str, labels: &str| {
        metric(&text, &series(name, labels))
            .unwrap_or_else(|| panic!("no {name}{{{labels}}} in\n{text}"))
    };
    let expected = [
        (
            "host_builds_total",
            r#"host="ns1",repo="homelab",status="success""#,
            1.0,
        ),
        (
            "host_builds_total",
            r#"host="broken-build",repo="homelab",status="failed""#,
            1.0,
        ),
        ("builds_total", r#"repo="homelab",status="success""#, 1.0),
        ("builds_total", r#"repo="homelab",status="failed""#, 1.0),
        ("builds_total", r#"repo="homelab",status="cancelled""#, 0.0),
        // Nobody serves repo `nope`: NATS answers "no responders" itself.
        ("requests_rejected_total", r#"reason="unknown_repo""#, 0.0),
        (
            "requests_rejected_total",
            r#"reason="invalid_request""#,
            2.0,
        ),
        ("requests_rejected_total", r#"reason="queue_full""#, 0.0),
        ("build_duration_seconds_count", r#"repo="homelab""#, 2.0),
        (
            "host_build_duration_seconds_count",
            r#"host="ns1",repo="homelab""#,
            1.0,
        ),
    ];
    for (name, labels, count) in expected {
        assert_eq!(value(name, labels), count, "{name}{{{labels}}}");
    }
    let stamped = value(
        "host_last_success_timestamp_seconds",
        r#"host="ns1",repo="homelab""#,
    );
    assert!(stamped >= before.floor(), "{stamped} < {before}");
    assert!(!text.contains(r#"last_success_timestamp_seconds{host="broken-build""#));
    for (gauge, now) in [
        ("nats_connected", 1.0),
        ("build_in_progress", 0.0),
        ("queue_length", 0.0),
        ("oldest_active_age_seconds", 0.0),
    ] {
        let name = format!("homelab_deploy_builder_{gauge}");
        assert_eq!(metric(&text, &name), Some(now), "{name}");
    }
    assert!(text.contains(&format!(
        "homelab_deploy_builder_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(text.contains("process_resident_memory_bytes"));
    // Nothing from a rejected request becomes a label.
    assert!(!text.contains("nope"), "{text}");

    let checked = promtool(&["check", "metrics"], Some(&text));
    assert!(
        checked.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

#[tokio::test]
async fn queue_length_and_build_age_follow_a_running_build() {
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    let (nats, mut builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let (mut running, _) = client.send_until_started("build.homelab.slow").await;
    let mut queued = Vec::new();
    // Two different requests (identical ones would be coalesced).
    for body in ["", r#"{"logs":true}"#] {
        let mut pending = client.send("build.homelab.ns1", body).await;
        pending.next().await;
        queued.push(pending);
    }

    let text = scrape(&mut builder).await;
    assert_eq!(
        metric(&text, "homelab_deploy_builder_queue_length"),
        Some(2.0)
    );
    assert_eq!(
        metric(&text, "homelab_deploy_builder_build_in_progress"),
        Some(1.0)
    );
    let age = metric(&text, "homelab_deploy_builder_oldest_active_age_seconds").unwrap();
    assert!(age > 0.0, "{age}");

    flake.open_gate();
    running.until_terminal().await;
    for mut pending in queued {
        pending.until_terminal().await;
    }
    let text = scrape(&mut builder).await;
    assert_eq!(
        metric(&text, "homelab_deploy_builder_queue_length"),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "homelab_deploy_builder_build_in_progress"),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "homelab_deploy_builder_oldest_active_age_seconds"),
        Some(0.0)
    );
}

#[tokio::test]
async fn healthz_follows_the_nats_connection() {
    let flake = Flake::homelab();
    let (mut nats, mut builder) = start_service(&flake, |o| o).await;
    let addr = builder.metrics_addr().await;

    let (status, body) = http_get(&addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"ok""#), "{body}");

    nats.stop();
    let health = async || http_get(&addr, "/healthz").await;
    let (_, body) = poll("/healthz to say 503", health, |(status, _)| *status == 503).await;
    assert!(body.contains(r#""nats":"disconnected""#), "{body}");
    let text = scrape(&mut builder).await;
    assert_eq!(
        metric(&text, "homelab_deploy_builder_nats_connected"),
        Some(0.0)
    );

    nats.restart().await;
    poll("/healthz to say 200", health, |(status, _)| *status == 200).await;
    let text = scrape(&mut builder).await;
    assert_eq!(
        metric(&text, "homelab_deploy_builder_nats_connected"),
        Some(1.0)
    );
    // Counted by the connection's event callback, which runs on its own.
    poll(
        "the reconnect to be counted",
        async || http_get(&addr, "/metrics").await.1,
        |text| metric(text, "homelab_deploy_builder_nats_reconnects_total") >= Some(1.0),
    )
    .await;

    // It still builds after the outage.
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.ns1", "").await;
    assert!(matches!(
        terminal(&replies),
        Event::Finished {
            status: BuildStatus::Success,
            ..
        }
    ));
}

#[tokio::test]
async fn the_endpoint_serves_only_metrics_and_health() {
    let flake = Flake::homelab();
    let (_nats, mut builder) = start_service(&flake, |o| o).await;
    let addr = builder.metrics_addr().await;
    assert_eq!(http_get(&addr, "/").await.0, 404);
    assert_eq!(http_get(&addr, "/metrics/../etc").await.0, 404);
}

#[tokio::test]
async fn status_reports_the_running_build_the_queue_and_last_results() {
    let flake = Flake::new(&[
        ("slow", Host::Gated),
        ("ns1", Host::Ok),
        ("bad", Host::FailBuild),
    ]);
    let (nats, _builder) = start_service(&flake, |o| o.repo("ref = \"master\"")).await;
    let client = Requester::new(&nats).await;

    client.build("build.homelab.ns1", "").await;
    client.build("build.homelab.bad", "").await;
    let (mut running, _) = client.send_until_started("build.homelab.slow").await;
    let mut queued = client.send("build.homelab.ns1", "").await;
    let accepted = queued.next().await.reply;

    let mut pending = client.send("build.status", "").await;
    let message =
        tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut pending.subscriber))
            .await
            .unwrap()
            .unwrap();
    let StatusEvent::Status(status) = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.repos.len(), 1);
    assert_eq!(status.repos[0].name, "homelab");
    assert_eq!(status.repos[0].git_ref.as_deref(), Some("master"));
    // The repo URL may carry a token; it is never reported.
    assert!(!String::from_utf8_lossy(&message.payload).contains("git+file"));
    let now = status.running.expect("a build is running");
    assert_eq!(
        (now.repo.as_str(), now.target.as_str()),
        ("homelab", "slow")
    );
    let building: Vec<(&str, usize)> = now
        .hosts
        .iter()
        .map(|h| (h.host.as_str(), h.index))
        .collect();
    assert_eq!(building, [("slow", 1)]);
    assert_eq!(now.total, Some(1));
    assert_eq!(status.queue.len(), 1);
    assert_eq!(status.queue[0].build_id, accepted.build_id);
    let last: Vec<(&str, HostStatus)> = status
        .last_results
        .iter()
        .map(|r| (r.host.as_str(), r.status))
        .collect();
    assert_eq!(
        last,
        [("bad", HostStatus::Failed), ("ns1", HostStatus::Success)]
    );
    let ns1 = &status.last_results[1];
    assert_eq!(ns1.rev.as_deref(), Some(flake.head().as_str()));
    assert!(ns1.out_path.as_deref().unwrap().starts_with("/nix/store/"));

    // The CLI shows the same.
    let out = run_cli(&nats.url(), &["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("running: "), "{text}");
    assert!(text.contains("homelab/slow, host 1 of 1: slow"), "{text}");
    assert!(text.contains("queue: 1 waiting"), "{text}");
    assert!(text.contains("homelab/bad  failed"), "{text}");
    let out = run_cli(&nats.url(), &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["event"], "status");

    flake.open_gate();
    running.until_terminal().await;
    queued.until_terminal().await;
}

#[tokio::test]
async fn status_without_a_builder_exits_3() {
    let nats = NatsServer::start().await;
    let out = run_cli(&nats.url(), &["status"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

#[tokio::test]
async fn systemd_hears_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let flake = Flake::homelab();
    let nats = NatsServer::start().await;
    let options = BuilderOptions::new(&flake)
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000");
    let mut builder = Builder::spawn_with(&options.config_text(&nats.url()), &options);

    let mut buffer = [0u8; 256];
    let mut receive = async || {
        let n = tokio::time::timeout(WAIT, socket.recv(&mut buffer))
            .await
            .expect("no notification from the builder")
            .unwrap();
        String::from_utf8_lossy(&buffer[..n]).trim().to_owned()
    };
    assert_eq!(receive().await, "READY=1");
    // Ready means subscribed: a request is answered right away.
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.ns1", "{").await;
    assert_eq!(event_names(&replies), ["rejected"]);
    let mut pings = 0;
    while pings < 2 {
        assert_eq!(receive().await, "WATCHDOG=1");
        pings += 1;
    }
    let pid = builder.pid();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let message = receive().await;
        if message == "STOPPING=1" {
            break;
        }
        assert_eq!(
            message, "WATCHDOG=1",
            "unexpected {message}; before: {seen:?}"
        );
        seen.push(message);
    }
    assert!(builder.terminate().await.success());
}

#[tokio::test]
async fn systemd_hears_ready_while_nats_is_unreachable_and_builds_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let flake = Flake::homelab();
    let port = free_port();
    let options = BuilderOptions::new(&flake).env("NOTIFY_SOCKET", socket_path.to_str().unwrap());
    let mut builder = Builder::spawn_with(
        &options.config_text(&format!("nats://127.0.0.1:{port}")),
        &options,
    );

    let mut buffer = [0u8; 256];
    let mut notifications = Vec::new();
    // Without NATS the unit must still become ready, well inside systemd's
    // default 90 s start timeout, and say what it waits for.
    while !notifications
        .iter()
        .any(|n: &String| n.contains("STATUS=waiting for NATS"))
    {
        let n = tokio::time::timeout(Duration::from_secs(30), socket.recv(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("not ready without NATS; heard {notifications:?}"))
            .unwrap();
        notifications.push(String::from_utf8_lossy(&buffer[..n]).trim().to_owned());
    }
    assert_eq!(notifications[0], "READY=1", "{notifications:?}");
    let (status, body) = http_get(&builder.metrics_addr().await, "/healthz").await;
    assert_eq!(status, 503, "{body}");

    let nats = NatsServer::start_on(port, None).await;
    // Subscribed after the wait: the status says so.
    while !notifications.iter().any(|n| n == "STATUS=serving") {
        let n = tokio::time::timeout(WAIT, socket.recv(&mut buffer))
            .await
            .unwrap_or_else(|_| panic!("not serving once NATS is up; heard {notifications:?}"))
            .unwrap();
        notifications.push(String::from_utf8_lossy(&buffer[..n]).trim().to_owned());
    }
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.ns1", "").await;
    assert!(
        matches!(
            terminal(&replies),
            Event::Finished {
                status: BuildStatus::Success,
                ..
            }
        ),
        "{replies:?}"
    );
}

#[tokio::test]
async fn json_logs_carry_the_build_id_on_every_request_line() {
    let flake = Flake::homelab();
    let (nats, builder) = start_service(&flake, |o| {
        o.arg("--log-format")
            .arg("json")
            .repo("exclude = [\"broken-eval\"]")
    })
    .await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    let build_id = replies[0].build_id.clone();

    let lines: Vec<serde_json::Value> = builder
        .log_text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let start = lines
        .iter()
        .position(|l| l["message"] == "request accepted")
        .expect("no request accepted line");
    let end = lines
        .iter()
        .position(|l| l["message"] == "build finished")
        .expect("no build finished line");
    let mut messages = BTreeSet::new();
    for line in &lines[start..=end] {
        let target = line["target"].as_str().unwrap_or_default();
        if !target.starts_with("homelab_deploy") {
            continue;
        }
        let id = line["span"]["build_id"]
            .as_str()
            .or_else(|| line["build_id"].as_str());
        assert_eq!(
            id,
            Some(build_id.as_str()),
            "line without the build id: {line}"
        );
        messages.insert(line["message"].as_str().unwrap_or_default().to_owned());
    }
    for expected in [
        "request accepted",
        "flake pinned",
        "host started",
        "host built",
        "host failed",
        "build finished",
    ] {
        assert!(
            messages.contains(expected),
            "{expected} not logged: {messages:?}"
        );
    }
}

#[tokio::test]
async fn text_logs_have_no_ansi_codes_off_a_terminal() {
    let flake = Flake::homelab();
    let (nats, builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    client.build("build.homelab.ns1", "").await;
    let log = builder.log_text();
    assert!(log.contains("build_id="), "{log}");
    assert!(!log.contains('\u{1b}'), "{log}");
}

#[tokio::test]
async fn last_successes_survive_a_restart_with_a_state_file() {
    let flake = Flake::homelab();
    let state = tempfile::tempdir().unwrap();
    let state_file = state.path().join("state.json");
    let nats = NatsServer::start().await;
    let options =
        BuilderOptions::new(&flake).builder(&format!("state_file = \"{}\"", state_file.display()));
    let mut builder = Builder::start(&nats, &options).await;
    let client = Requester::new(&nats).await;
    client.build("build.homelab.ns1", "").await;
    let text = scrape(&mut builder).await;
    let stamped = metric(
        &text,
        &series(
            "host_last_success_timestamp_seconds",
            r#"host="ns1",repo="homelab""#,
        ),
    )
    .unwrap();
    assert!(builder.terminate().await.success());

    let mut builder = Builder::start(&nats, &options).await;
    let text = scrape(&mut builder).await;
    assert_eq!(
        metric(
            &text,
            &series(
                "host_last_success_timestamp_seconds",
                r#"host="ns1",repo="homelab""#
            )
        ),
        Some(stamped)
    );
    let mut pending = client.send("build.status", "").await;
    let message =
        tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut pending.subscriber))
            .await
            .unwrap()
            .unwrap();
    let StatusEvent::Status(status) = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(status.last_results.len(), 1);
    assert_eq!(status.last_results[0].host, "ns1");
}

#[tokio::test]
async fn alert_rules_pass_promtool_and_name_only_exported_metrics() {
    let rules = format!("{ROOT}/docs/monitoring/alerts.yml");
    let checked = promtool(&["check", "rules", &rules], None);
    assert!(
        checked.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let flake = Flake::homelab();
    let (nats, mut builder) = start_service(&flake, |o| o).await;
    // Per-host series exist once a host has built.
    Requester::new(&nats)
        .await
        .build("build.homelab.ns1", "")
        .await;
    let text = scrape(&mut builder).await;
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let dashboard =
        std::fs::read_to_string(format!("{ROOT}/docs/monitoring/grafana-dashboard.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is not JSON");
    let alerts = std::fs::read_to_string(&rules).unwrap();
    for (file, content) in [
        ("alerts.yml", &alerts),
        ("grafana-dashboard.json", &dashboard),
    ] {
        let mut referenced = BTreeSet::new();
        for (i, _) in content.match_indices("homelab_deploy_builder_") {
            let name: String = content[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name)
                .to_owned();
            referenced.insert(base);
        }
        assert!(!referenced.is_empty());
        for name in referenced {
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which is not exported"
            );
        }
    }
}
