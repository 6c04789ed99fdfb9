//! `homelab-deploy mcp`, driven by the official MCP Python SDK over stdio
//! against a real builder, nats-server and Nix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::builder::start_service;
use common::cli::{BIN, describe};
use common::flake::Flake;
use common::nats::NatsServer;
use common::net::free_port;
use common::nix::test_path;
use common::wait::WAIT;
use serde_json::{Value, json};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Runs the Python MCP client against `homelab-deploy mcp <args>` with the
/// given steps; returns its results (the first is the handshake).
async fn drive(nats_url: &str, args: &[&str], steps: Value) -> Vec<Value> {
    let python = format!("{ROOT}/target/tools/venv/bin/python");
    assert!(
        std::path::Path::new(&python).exists(),
        "the MCP Python SDK is not installed: run ./scripts/test (it sets up target/tools/venv)"
    );
    let mut command = tokio::process::Command::new(python);
    command
        .arg(format!("{ROOT}/tests/mcp/client.py"))
        .arg(BIN)
        .arg("mcp")
        .args(args)
        .env("HOMELAB_DEPLOY_NATS_URL", nats_url)
        .env("PATH", test_path())
        .env("RUST_LOG", "homelab_deploy=debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(steps.to_string().as_bytes()).await.unwrap();
    }
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the MCP client did not finish in time")
        .unwrap();
    assert!(
        output.status.success(),
        "MCP client failed:\n{}",
        describe(&output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", describe(&output)))
}

#[tokio::test]
async fn without_enable_builds_only_build_status_is_offered() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let results = drive(
        &nats.url(),
        &[],
        json!([{"list_tools": true}, {"call": "build", "arguments": {"repo": "homelab", "target": "ns1"}}]),
    )
    .await;
    assert_eq!(results[0]["server"], "homelab-deploy");
    assert_eq!(results[1]["tools"], json!(["build_status"]));
    assert!(results[2]["protocol_error"].is_string(), "{}", results[2]);
}

#[tokio::test]
async fn builds_run_and_report_through_the_tools() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let results = drive(
        &nats.url(),
        &["--enable-builds"],
        json!([
            {"list_tools": true},
            {"call": "build", "arguments": {"repo": "homelab", "target": "ns1"}},
            {"call": "build", "arguments": {"repo": "homelab", "target": "all"}},
            {"call": "build_status"},
            {"call": "cancel_build", "arguments": {"build_id": "0123456789abcdef"}},
        ]),
    )
    .await;
    assert_eq!(
        results[1]["tools"],
        json!(["build", "build_status", "cancel_build"])
    );

    let success = &results[2];
    assert_eq!(success["is_error"], false, "{success}");
    let text = success["text"].as_str().unwrap();
    assert!(text.contains("homelab/ns1"), "{text}");
    assert!(text.contains("success: 1 succeeded, 0 failed"), "{text}");
    assert!(text.contains("built: ns1"), "{text}");
    assert_eq!(success["structured"]["event"], "finished");
    let progress = success["progress"].as_array().unwrap();
    assert!(
        progress.iter().any(|p| p["message"] == "host 1 of 1: ns1"),
        "{progress:?}"
    );

    let failure = &results[3];
    assert_eq!(failure["is_error"], true, "{failure}");
    let text = failure["text"].as_str().unwrap();
    assert!(text.contains("failed: 2 succeeded, 2 failed"), "{text}");
    assert!(
        text.contains("- broken-build: failed (build_failed)"),
        "{text}"
    );
    assert!(text.contains("error detail from broken-build"), "{text}");
    assert!(
        text.contains("- broken-eval: failed (eval_failed)"),
        "{text}"
    );
    assert!(
        text.contains("host broken-eval does not evaluate"),
        "{text}"
    );

    let status = &results[4];
    assert_eq!(status["is_error"], false, "{status}");
    let text = status["text"].as_str().unwrap();
    assert!(text.starts_with("builder "), "{text}");
    assert!(
        text.contains(" (unsigned)\nhomelab-deploy builder "),
        "{text}"
    );
    assert!(text.contains("homelab/ns1"), "{text}");
    assert!(text.contains("homelab/broken-build  failed"), "{text}");
    let builders = status["structured"]["builders"].as_array().unwrap();
    assert_eq!(builders.len(), 1, "{status}");
    assert_eq!(builders[0]["signature"], "unsigned", "{status}");
    assert_eq!(builders[0]["key"], Value::Null, "{status}");
    assert_eq!(builders[0]["status"]["repos"][0]["name"], "homelab");

    // Only the builder that has a build answers its cancel: none does.
    let cancel = &results[5];
    assert_eq!(cancel["is_error"], true, "{cancel}");
    assert!(
        cancel["text"]
            .as_str()
            .unwrap()
            .contains("no builder has a running or waiting build 0123456789abcdef"),
        "{cancel}"
    );
}

#[tokio::test]
async fn bad_arguments_and_rejections_are_tool_errors_with_the_reason() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let results = drive(
        &nats.url(),
        &["--enable-builds"],
        json!([
            {"call": "build", "arguments": {"repo": "homelab", "target": "$(id)"}},
            {"call": "build", "arguments": {"repo": "homelab", "target": "ns1", "ref": "--upload-pack=x"}},
            {"call": "build", "arguments": {"repo": "homelab"}},
            {"call": "build", "arguments": {"repo": "homelab", "target": "ns1", "extra": 1}},
            {"call": "build", "arguments": {"repo": "nope", "target": "ns1"}},
            {"call": "build", "arguments": {"repo": "homelab", "target": "no-such-host"}},
            {"call": "cancel_build", "arguments": {"build_id": "$(id)"}},
        ]),
    )
    .await;
    let texts: Vec<&str> = results[1..]
        .iter()
        .map(|r| {
            assert_eq!(r["is_error"], true, "{r}");
            r["text"].as_str().unwrap()
        })
        .collect();
    assert!(texts[0].contains("invalid target"), "{}", texts[0]);
    assert!(texts[1].contains("unsafe ref"), "{}", texts[1]);
    assert!(texts[2].contains("missing field `target`"), "{}", texts[2]);
    assert!(texts[3].contains("unknown field `extra`"), "{}", texts[3]);
    // No builder is subscribed to a repo none serves.
    assert!(
        texts[4].contains("no builder serves repo nope (nobody is subscribed to build.nope.ns1)"),
        "{}",
        texts[4]
    );
    // From the builder itself:
    assert!(texts[5].contains("unknown_host"), "{}", texts[5]);
    assert!(texts[6].contains("invalid build id"), "{}", texts[6]);
}

#[tokio::test]
async fn build_status_says_when_no_builder_answers() {
    let nats = NatsServer::start().await;
    let results = drive(&nats.url(), &[], json!([{"call": "build_status"}])).await;
    assert_eq!(results[1]["is_error"], true, "{}", results[1]);
    assert!(
        results[1]["text"]
            .as_str()
            .unwrap()
            .contains("no builder is listening on build.status"),
        "{}",
        results[1]
    );
}

#[tokio::test]
async fn tools_say_when_nats_is_not_reachable() {
    // Nothing listens on this port: the server still starts and answers.
    let url = format!("nats://127.0.0.1:{}", free_port());
    let results = drive(
        &url,
        &["--enable-builds"],
        json!([{"call": "build_status"}]),
    )
    .await;
    assert_eq!(results[0]["server"], "homelab-deploy");
    assert_eq!(results[1]["is_error"], true, "{}", results[1]);
    assert!(
        results[1]["text"]
            .as_str()
            .unwrap()
            .contains("not connected to NATS"),
        "{}",
        results[1]
    );
}
