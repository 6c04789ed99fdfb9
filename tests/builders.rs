//! Several builders on one NATS server (real nats-server, builder
//! processes and Nix): each answers only its own repos, builders of the
//! same repo share its requests in a queue group and take over from one
//! another, and status and cancel reach every builder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::builder::{Builder, BuilderOptions};
use common::cli::{describe, run_cli};
use common::flake::{Flake, Host};
use common::identity::Identities;
use common::nats::NatsServer;
use common::requester::{Pending, Requester};
use homelab_deploy::protocol::{Event, Reply};

/// Options for a builder called `name` serving `repos` (name, flake),
/// with a journal of its own in `state`.
fn builder_options(
    name: &str,
    repos: &[(&str, &Flake)],
    state: &std::path::Path,
) -> BuilderOptions {
    let mut options = BuilderOptions::new(repos[0].1).builder(&format!(
        "name = \"{name}\"\njournal_file = \"{}\"",
        state.join(format!("{name}.journal")).display()
    ));
    options.repos = repos
        .iter()
        .map(|(repo, flake)| ((*repo).to_owned(), flake.url(), None))
        .collect();
    options
}

/// The name of the builder that accepted, from `accepted`.
fn accepted_by(reply: &Reply) -> String {
    match &reply.event {
        Event::Accepted { builder, .. } => builder.clone().expect("accepted names no builder"),
        other => panic!("not accepted: {other:?}"),
    }
}

/// Sends a request and returns it with the builder that accepted it.
async fn accepted(client: &Requester, subject: &str) -> (Pending, Reply, String) {
    let mut pending = client.send(subject, "").await;
    let first = pending.next().await.reply;
    let by = accepted_by(&first);
    (pending, first, by)
}

#[tokio::test]
async fn builders_of_different_repos_answer_only_their_own() {
    let alpha = Flake::new(&[("a1", Host::Ok)]);
    let beta = Flake::new(&[("b1", Host::Ok)]);
    let state = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await;
    let mut one = Builder::start(
        &nats,
        &builder_options("one", &[("alpha", &alpha)], state.path()),
    )
    .await;
    let mut two = Builder::start(
        &nats,
        &builder_options("two", &[("beta", &beta)], state.path()),
    )
    .await;
    let client = Requester::new(&nats).await;

    for (subject, builder) in [
        ("build.alpha.all", "one"),
        ("build.beta.b1", "two"),
        ("build.alpha.a1", "one"),
    ] {
        let (mut pending, first, by) = accepted(&client, subject).await;
        assert_eq!(by, builder, "{subject}");
        let rest = pending.until_terminal().await;
        let terminal = &rest.last().unwrap().reply;
        assert!(
            matches!(terminal.event, Event::Finished { .. }),
            "{subject}: {terminal:?}"
        );
        assert!(
            rest.iter().all(|t| t.reply.build_id == first.build_id),
            "{subject}: {rest:?}"
        );
        // Nothing from the other builder: no `rejected`, nothing at all.
        assert!(pending.try_next().is_none(), "{subject}");
    }
    for (builder, other_repo) in [(&mut one, "beta"), (&mut two, "alpha")] {
        let log = builder.log_text();
        assert!(!log.contains("rejected"), "{log}");
        assert!(!log.contains(&format!("repo={other_repo}")), "{log}");
    }

    // A repo nobody serves: NATS says so, the client says so.
    let out = run_cli(&nats.url(), &["build", "gamma", "--all"]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no builder serves repo gamma"),
        "{}",
        describe(&out)
    );

    // Status lists both builders with their repos.
    let out = run_cli(&nats.url(), &["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["builder one", "builder two", "alpha", "beta"] {
        assert!(text.contains(needle), "no {needle:?} in\n{text}");
    }
    let out = run_cli(&nats.url(), &["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let mut answers: Vec<(String, Vec<String>)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let status: serde_json::Value = serde_json::from_str(line).unwrap();
            let repos = status["repos"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
                .collect();
            (status["builder"].as_str().unwrap().to_owned(), repos)
        })
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        [
            ("one".to_owned(), vec!["alpha".to_owned()]),
            ("two".to_owned(), vec!["beta".to_owned()])
        ]
    );
}

#[tokio::test]
async fn builders_of_the_same_repo_share_its_requests_and_take_over_from_each_other() {
    let flake = Flake::new(&[("ns1", Host::Ok), ("slow", Host::Gated)]);
    let state = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await;
    let options = |name| builder_options(name, &[("homelab", &flake)], state.path());
    let mut builders = BTreeMap::from([
        ("one", Builder::start(&nats, &options("one")).await),
        ("two", Builder::start(&nats, &options("two")).await),
    ]);
    let client = Requester::new(&nats).await;

    // Shared: each request goes to one of them (NATS picks at random; 20
    // requests all going to one builder would happen once in 500 000 runs).
    let mut served = BTreeMap::<String, usize>::new();
    for _ in 0..20 {
        let (mut pending, _, by) = accepted(&client, "build.homelab.ns1").await;
        pending.until_terminal().await;
        assert!(pending.try_next().is_none());
        *served.entry(by).or_default() += 1;
    }
    eprintln!("20 requests over two builders: {served:?}");
    assert_eq!(
        served.len(),
        2,
        "one builder took every request: {served:?}"
    );

    // One stopped (SIGTERM): the other serves every request.
    assert!(builders.get_mut("one").unwrap().terminate().await.success());
    for _ in 0..5 {
        let (mut pending, _, by) = accepted(&client, "build.homelab.ns1").await;
        assert_eq!(by, "two");
        pending.until_terminal().await;
    }
    builders.insert("one", Builder::start(&nats, &options("one")).await);

    // Killed (SIGKILL) with a build it accepted: the other takes the next
    // requests, and the build resumes when the killed one is back.
    let (mut held, held_first, victim) = accepted(&client, "build.homelab.slow").await;
    let survivor = if victim == "one" { "two" } else { "one" };
    let victim = if victim == "one" { "one" } else { "two" };
    builders.get_mut(victim).unwrap().kill();
    let killed_at = Instant::now();
    let takeover = loop {
        let mut pending = client.send("build.homelab.ns1", "").await;
        // A request that reached the dead builder's subscription before
        // the server noticed is lost; the CLI would resend it.
        let first = tokio::time::timeout(
            Duration::from_secs(2),
            futures_util::StreamExt::next(&mut pending.subscriber),
        )
        .await;
        if let Ok(Some(message)) = first {
            if !message.payload.is_empty() {
                let reply: Reply = serde_json::from_slice(&message.payload).unwrap();
                assert_eq!(accepted_by(&reply), survivor);
                pending.until_terminal().await;
                break killed_at.elapsed();
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "nobody took over"
        );
    };
    eprintln!("from the SIGKILL to the first request served by the other builder: {takeover:?}");
    for _ in 0..5 {
        let (mut pending, _, by) = accepted(&client, "build.homelab.ns1").await;
        assert_eq!(by, survivor);
        pending.until_terminal().await;
    }
    builders.insert(victim, Builder::start(&nats, &options(victim)).await);
    flake.open_gate();
    let rest = held.until_terminal().await;
    assert!(
        rest.iter()
            .any(|t| matches!(t.reply.event, Event::Resumed { .. })),
        "{rest:?}"
    );
    assert!(rest.iter().all(|t| t.reply.build_id == held_first.build_id));
    assert!(matches!(
        rest.last().unwrap().reply.event,
        Event::Finished { .. }
    ));
}

#[tokio::test]
async fn a_cancel_reaches_the_builder_that_has_the_build_whichever_it_is() {
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let state = tempfile::tempdir().unwrap();
    let ids = Identities::new();
    let nats = NatsServer::start().await;
    let options = |name| {
        builder_options(name, &[("homelab", &flake)], state.path())
            .auth(&format!("admins = [\"{}\"]", ids.admin.public_key))
    };
    let _one = Builder::start(&nats, &options("one")).await;
    let _two = Builder::start(&nats, &options("two")).await;
    let client = Requester::new(&nats).await;

    // A build on each builder (the gate holds them).
    let mut builds = BTreeMap::new();
    for _ in 0..40 {
        let (pending, first, by) = accepted(&client, "build.homelab.slow").await;
        builds.entry(by).or_insert((pending, first.build_id));
        if builds.len() == 2 {
            break;
        }
    }
    assert_eq!(builds.len(), 2, "every request went to one builder");
    for (by, (pending, build_id)) in &mut builds {
        let out = run_cli(
            &nats.url(),
            &["cancel", build_id, "--nkey-file", ids.admin.seed_arg()],
        )
        .await;
        assert_eq!(out.status.code(), Some(0), "{by}: {}", describe(&out));
        let rest = pending.until_terminal().await;
        assert!(
            matches!(
                &rest.last().unwrap().reply.event,
                Event::Finished { status, .. } if status.as_str() == "cancelled"
            ),
            "{by}: {rest:?}"
        );
    }
    // Nobody has it any more: every builder stays silent, and that is the
    // answer.
    let (_, (_, gone)) = builds.iter().next().unwrap();
    let out = run_cli(
        &nats.url(),
        &[
            "cancel",
            gone,
            "--nkey-file",
            ids.admin.seed_arg(),
            "--timeout",
            "2s",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    flake.open_gate();
}
