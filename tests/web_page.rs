//! The status pages in a real browser (headless Chromium over WebDriver,
//! see tests/common/browser.rs) against a real builder, nats-server and
//! Nix: the index follows a running `all` build without a reload, and the
//! host page draws its chart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use common::browser::Browser;
use common::builder::{Builder, BuilderOptions};
use common::flake::{Flake, Host};
use common::nats::NatsServer;
use common::requester::Requester;
use homelab_deploy::protocol::Event;
use serde_json::json;

/// Where the pages' screenshots are kept (for people, and the README's).
fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/web-page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn the_index_shows_a_running_builds_results_arrive_and_the_host_page_its_chart() {
    // `gate` holds the build: the page is loaded while it waits.
    let flake = Flake::new(&[("db", Host::Ok), ("gate", Host::Gated), ("web", Host::Ok)]);
    let state = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await;
    let options = BuilderOptions::new(&flake)
        .web("enabled = true")
        .builder(&format!(
            "gc_roots_dir = \"{}\"\nhistory_db = \"{}\"",
            state.path().join("roots").display(),
            state.path().join("history.sqlite").display()
        ));
    let mut builder = Builder::start(&nats, &options).await;
    let addr = builder.metrics_addr().await;
    let client = Requester::new(&nats).await;
    let browser = Browser::start().await;

    let mut pending = client.send("build.homelab.all", "").await;
    let mut heard = Vec::new();
    // Until `gate` builds: `db` is done then.
    while !heard.iter().any(|r: &homelab_deploy::protocol::Reply| {
        matches!(&r.event, Event::HostStarted { host, .. } if host == "gate")
    }) {
        heard.push(pending.next().await.reply);
    }
    let build_id = heard[0].build_id.clone();

    browser.goto(&format!("http://{addr}/")).await;
    // A mark a reload would wipe out.
    browser
        .execute("window.notReloaded = true; return null;", &[])
        .await;
    assert_eq!(
        browser
            .attribute("#running", "data-build-id")
            .await
            .as_deref(),
        Some(build_id.as_str())
    );
    browser
        .wait_for_attribute(
            "tr[data-running-host=\"gate\"]",
            "data-running-host",
            "gate",
        )
        .await;
    // `web` has no result yet: this is its first build.
    assert_eq!(
        browser
            .count("tr[data-repo=\"homelab\"][data-host=\"web\"]")
            .await,
        0
    );
    browser
        .screenshot(&screenshots().join("index-running.png"))
        .await;

    flake.open_gate();
    let rest = pending.until_terminal().await;
    let finished = &rest.last().unwrap().reply;
    assert!(
        matches!(&finished.event, Event::Finished { status, .. } if status.as_str() == "success"),
        "{finished:?}"
    );
    // Both results arrive on the page by themselves.
    for host in ["gate", "web"] {
        browser
            .wait_for_attribute(
                &format!("tr[data-repo=\"homelab\"][data-host=\"{host}\"]"),
                "data-status",
                "success",
            )
            .await;
    }
    browser
        .wait_for_text("#running", "Nothing is building")
        .await;
    // The build's line among the recent ones says how it ended.
    browser
        .wait_for_attribute(
            &format!("#recent-rows tr[data-build-id=\"{build_id}\"]"),
            "data-status",
            "success",
        )
        .await;
    // The rev, known to the page from the running build, is on live rows.
    let rev = browser
        .text("tr[data-repo=\"homelab\"][data-host=\"web\"] td.rev")
        .await
        .unwrap();
    assert_eq!(rev, flake.head()[..12], "{rev}");
    assert_eq!(
        browser
            .execute("return window.notReloaded === true;", &[])
            .await,
        json!(true),
        "the page was reloaded"
    );
    browser
        .screenshot(&screenshots().join("index-finished.png"))
        .await;

    // Loaded afresh, the index shows every host with its latest status.
    browser.goto(&format!("http://{addr}/")).await;
    for host in ["db", "gate", "web"] {
        let row = format!("tr[data-repo=\"homelab\"][data-host=\"{host}\"]");
        assert_eq!(
            browser.attribute(&row, "data-status").await.as_deref(),
            Some("success"),
            "{host}"
        );
        let status = browser.text(&format!("{row} td.status")).await.unwrap();
        assert!(status.contains("success"), "{host}: {status}");
    }
    let weight = browser.resources_transferred().await;
    eprintln!("GET / transferred {weight} bytes");
    assert!(weight > 0);

    browser.screenshot(&screenshots().join("index.png")).await;

    // A second build of everything (`gate` held again), so the host page
    // has two sizes to draw; the index while it runs is the README's.
    std::fs::remove_file(flake.gate()).unwrap();
    flake.commit_change("second");
    let mut pending = client.send("build.homelab.all", "").await;
    pending
        .until(|event| matches!(event, Event::HostStarted { host, .. } if host == "gate"))
        .await;
    browser.goto(&format!("http://{addr}/")).await;
    browser
        .wait_for_attribute(
            "tr[data-running-host=\"gate\"]",
            "data-running-host",
            "gate",
        )
        .await;
    browser
        .screenshot(&screenshots().join("index-second-build.png"))
        .await;
    flake.open_gate();
    pending.until_terminal().await;
    browser
        .goto(&format!("http://{addr}/hosts/homelab/db"))
        .await;
    assert_eq!(browser.count("svg.closure-chart").await, 1);
    assert_eq!(browser.count("svg.closure-chart circle.point").await, 2);
    // Drawn, not just present.
    let drawn = browser
        .execute(
            "const box = document.querySelector('svg.closure-chart').getBoundingClientRect(); \
             return box.width > 100 && box.height > 50;",
            &[],
        )
        .await;
    assert_eq!(drawn, json!(true));
    browser.screenshot(&screenshots().join("host-db.png")).await;
    assert!(builder.terminate().await.success());
}
