//! History and the JSON API against a real builder, nats-server and Nix:
//! what the API says of a build is what its requester heard, it survives a
//! restart, honours `history_keep`, and `/api/v1/events` keeps up with the
//! requester.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::builder::{Builder, BuilderOptions};
use common::flake::{Flake, commit_packages, package_flake};
use common::nats::NatsServer;
use common::net::http_get;
use common::requester::{Requester, Timed};
use common::wait::poll;
use common::web::{EventFeed, get_json};
use homelab_deploy::protocol::{Event, Reply};
use serde_json::{Value, json};

/// The package flake (`ns1` with packages, `ns2` that can be made to
/// fail), with its first commit.
fn homelab_flake() -> Flake {
    let flake = package_flake();
    commit_packages(
        &flake,
        &[("openssl-3.0.14", "ssl"), ("zlib-1.3", "z")],
        false,
        "first",
    );
    flake
}

fn options(flake: &Flake, state: &Path, keep: &str) -> BuilderOptions {
    BuilderOptions::new(flake)
        .web("enabled = true")
        .builder(&format!(
            "gc_roots_dir = \"{}\"\nhistory_db = \"{}\"\njournal_file = \"{}\"\n{keep}",
            state.join("roots").display(),
            state.join("history.sqlite").display(),
            state.join("journal").display(),
        ))
}

/// Sends `build.homelab.all` and collects its events with their times.
async fn build_all(client: &Requester) -> Vec<Timed> {
    let mut pending = client.send("build.homelab.all", "").await;
    pending.until_terminal().await
}

/// The `host_finished` events of `replies`, as JSON, by host.
fn host_finished(replies: &[Timed]) -> Vec<(String, Value)> {
    replies
        .iter()
        .filter_map(|t| match &t.reply.event {
            Event::HostFinished { host, .. } => {
                Some((host.clone(), serde_json::to_value(&t.reply).unwrap()))
            }
            _ => None,
        })
        .collect()
}

fn finished(replies: &[Timed]) -> Value {
    serde_json::to_value(&replies.last().unwrap().reply).unwrap()
}

/// The record of a build equals what its requester heard: the `finished`
/// event's outcome and every `host_finished` field by field.
fn assert_record_matches(record: &Value, replies: &[Timed]) {
    let finished = finished(replies);
    assert_eq!(record["build_id"], finished["build_id"]);
    for key in ["status", "rev", "error", "duration_ms"] {
        assert_eq!(record[key], finished[key], "{key}: {record} vs {finished}");
    }
    assert_eq!(record["repo"], "homelab");
    assert_eq!(record["target"], "all");
    let hosts = record["hosts"].as_array().unwrap();
    let heard = host_finished(replies);
    assert_eq!(hosts.len(), heard.len(), "{record}");
    for (host, event) in heard {
        let recorded = hosts.iter().find(|h| h["host"] == host.as_str()).unwrap();
        for key in [
            "status",
            "duration_ms",
            "out_path",
            "cached",
            "error",
            "changes",
        ] {
            assert_eq!(
                recorded[key], event[key],
                "{host} {key}: {recorded} vs {event}"
            );
        }
        let machines = event.get("machines").cloned().unwrap_or(json!({}));
        assert_eq!(recorded["machines"], machines, "{host}");
        let size = event["changes"]["closure_size"]
            .as_u64()
            .or(event["closure_size"].as_u64());
        assert_eq!(recorded["closure_size"].as_u64(), size, "{host}");
    }
}

#[tokio::test]
async fn the_history_is_what_requesters_heard_and_survives_a_restart() {
    let flake = homelab_flake();
    let state = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await;
    let options = options(&flake, state.path(), "");
    let mut builder = Builder::start(&nats, &options).await;
    let addr = builder.metrics_addr().await;
    let client = Requester::new(&nats).await;
    let mut feed = EventFeed::open(&addr).await;

    let first = build_all(&client).await;
    commit_packages(
        &flake,
        &[("openssl-3.0.15", "a newer ssl"), ("zlib-1.3", "z")],
        false,
        "bump openssl",
    );
    let bumped = build_all(&client).await;
    commit_packages(
        &flake,
        &[("openssl-3.0.15", "a newer ssl"), ("zlib-1.3", "z")],
        true,
        "break ns2",
    );
    let broken = build_all(&client).await;
    let runs = [&first, &bumped, &broken];
    let statuses: Vec<Value> = runs.iter().map(|r| finished(r)["status"].clone()).collect();
    assert_eq!(
        statuses,
        [json!("success"), json!("success"), json!("failed")]
    );

    // The live feed delivered each `host_finished` within a second of the
    // requester (either may be first).
    let streamed = feed.drain();
    let mut furthest = Duration::ZERO;
    for run in runs {
        for t in run
            .iter()
            .filter(|t| matches!(t.reply.event, Event::HostFinished { .. }))
        {
            let seq = t.reply.seq;
            let same = streamed
                .iter()
                .find(|s| {
                    s.reply["build_id"] == t.reply.build_id.as_str()
                        && s.reply["seq"].as_u64() == seq
                })
                .unwrap_or_else(|| panic!("never streamed: {:?}", t.reply));
            let apart = same.at.max(t.at) - same.at.min(t.at);
            furthest = furthest.max(apart);
            assert!(
                apart < Duration::from_secs(1),
                "{apart:?} apart: {:?}",
                t.reply
            );
            // Streamed as sent.
            let sent: Reply = serde_json::from_value(same.reply.clone()).unwrap();
            assert_eq!(sent, t.reply);
        }
    }
    eprintln!("host_finished on /api/v1/events and to the requester at most {furthest:?} apart");
    assert!(
        streamed.iter().all(|s| s.reply["event"] != "log"),
        "log lines were streamed"
    );

    // Recorded a moment after `finished`, in order: the last one done
    // means all are.
    let last = &broken[0].reply.build_id;
    poll(
        "the last build to be recorded",
        async || get_json(&addr, &format!("/api/v1/builds/{last}")).await,
        |record| record["status"] != "running",
    )
    .await;
    // Each build's record is what its requester heard.
    for run in runs {
        let id = &run[0].reply.build_id;
        let record = get_json(&addr, &format!("/api/v1/builds/{id}")).await;
        assert_record_matches(&record, run);
    }

    // ns1's history: three entries, newest first, each with its closure
    // size, the bump named with its versions.
    let ns1 = get_json(&addr, "/api/v1/hosts/homelab/ns1").await;
    let entries = ns1.as_array().unwrap();
    let ids: Vec<&str> = entries
        .iter()
        .map(|e| e["build_id"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = runs
        .iter()
        .rev()
        .map(|r| r[0].reply.build_id.as_str())
        .collect();
    assert_eq!(ids, expected, "{ns1}");
    assert!(
        entries
            .iter()
            .all(|e| e["closure_size"].as_u64().is_some_and(|s| s > 0)),
        "{ns1}"
    );
    let bump = &entries[1]["changes"]["packages"];
    assert_eq!(bump[0]["name"], "openssl", "{ns1}");
    assert_eq!(bump[0]["before"], json!(["3.0.14"]));
    assert_eq!(bump[0]["after"], json!(["3.0.15"]));
    let ns2 = get_json(&addr, "/api/v1/hosts/homelab/ns2").await;
    assert_eq!(ns2[0]["status"], "failed", "{ns2}");
    assert!(
        ns2[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ns2 cannot build"),
        "{ns2}"
    );

    // Filters: the failed one, and ns2's failures only.
    let failed = get_json(&addr, "/api/v1/builds?status=failed").await;
    assert_eq!(failed.as_array().unwrap().len(), 1, "{failed}");
    assert_eq!(failed[0]["build_id"], broken[0].reply.build_id.as_str());
    let page = get_json(
        &addr,
        &format!("/api/v1/builds?limit=1&before={}", broken[0].reply.build_id),
    )
    .await;
    assert_eq!(page[0]["build_id"], bumped[0].reply.build_id.as_str());
    let (code, body) = http_get(&addr, "/api/v1/builds?status=exploded").await;
    assert_eq!(code, 400, "{body}");
    let (code, _) = http_get(&addr, "/api/v1/builds/0123456789abcdef").await;
    assert_eq!(code, 404);

    // After a restart the same three builds, newest first.
    let before = get_json(&addr, "/api/v1/builds").await;
    assert!(builder.terminate().await.success());
    let mut builder = Builder::start(&nats, &options).await;
    let addr = builder.metrics_addr().await;
    let after = get_json(&addr, "/api/v1/builds").await;
    assert_eq!(after, before);
    let ids: Vec<&str> = after
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, expected);
    for build in after.as_array().unwrap() {
        assert!(build["finished_at"].is_string(), "{build}");
        assert_eq!(build["hosts"].as_array().unwrap().len(), 2, "{build}");
    }
}

#[tokio::test]
async fn history_keeps_only_what_history_keep_says() {
    let flake = homelab_flake();
    let state = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await;
    let options = options(&flake, state.path(), "history_keep = { builds = 2 }");
    let mut builder = Builder::start(&nats, &options).await;
    let addr = builder.metrics_addr().await;
    let client = Requester::new(&nats).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut pending = client.send("build.homelab.ns1", "").await;
        ids.push(pending.until_terminal().await[0].reply.build_id.clone());
    }
    let wanted: Vec<&str> = ids.iter().rev().take(2).map(String::as_str).collect();
    // Recorded as each build ends, written a moment later: wait for it.
    let listed = poll(
        "the oldest build to be pruned",
        async || get_json(&addr, "/api/v1/builds").await,
        |builds| {
            let listed: Vec<&str> = builds
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["build_id"].as_str().unwrap())
                .collect();
            listed == wanted
        },
    )
    .await;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let (code, _) = http_get(&addr, &format!("/api/v1/builds/{}", ids[0])).await;
    assert_eq!(code, 404, "the oldest build is still there");
}
