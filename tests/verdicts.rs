//! Trustworthy verdicts: signed replies and requests, results bound to
//! their own request, cancels by owner, reply subjects the builder owns,
//! bounded fan-out, a dead builder noticed, and terminal events that fit —
//! against a real builder, nats-server (the plan's permission table and the
//! strict one) and Nix. docs/security.md lists which claim each test backs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::builder::{Builder, BuilderOptions, start_service};
use common::cli::{describe, run_cli, spawn_cli};
use common::flake::{Flake, Host};
use common::identity::{Identities, nkey_user};
use common::nats::NatsServer;
use common::net::{free_port, http_get, metric};
use common::process::processes_matching;
use common::replies::{event_names, terminal, untimed};
use common::requester::{Requester, connect_as};
use common::wait::{WAIT, poll, wait_for};
use futures_util::StreamExt;
use homelab_deploy::protocol::{BuildStatus, ErrorBody, ErrorCode, Event, Reply};

/// A nats-server with `file`'s permission table, and a builder signing
/// with its key (plus `configure`).
async fn signed_service(
    ids: &Identities,
    file: &str,
    flake: &Flake,
    configure: impl FnOnce(BuilderOptions) -> BuilderOptions,
) -> (NatsServer, Builder) {
    let nats = NatsServer::start_with_config(&ids.server_config(file)).await;
    let options = configure(BuilderOptions::new(flake).signing_with(&ids.builder.seed_file));
    let builder = Builder::start(&nats, &options).await;
    (nats, builder)
}

/// Waits until the builder has given `count` requests no answer for
/// `reason` (`homelab_deploy_builder_requests_ignored_total`).
async fn wait_for_ignored(builder: &mut Builder, reason: &str, count: f64) {
    let series = format!("homelab_deploy_builder_requests_ignored_total{{reason=\"{reason}\"}}");
    poll(
        &format!("{count} requests ignored for {reason}"),
        async || {
            metric(
                &http_get(&builder.metrics_addr().await, "/metrics").await.1,
                &series,
            )
        },
        |counted| *counted == Some(count),
    )
    .await;
}

async fn finish(child: tokio::process::Child) -> std::process::Output {
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the CLI did not exit in time")
        .unwrap()
}

/// Waits for the first reply on `subscriber` that `matches`; returns the
/// subject it arrived on and the reply.
async fn watch_for(
    subscriber: &mut async_nats::Subscriber,
    matches: impl Fn(&Reply) -> bool,
) -> (String, Reply) {
    loop {
        let message = tokio::time::timeout(WAIT, subscriber.next())
            .await
            .expect("no matching reply")
            .unwrap();
        if let Ok(reply) = serde_json::from_slice::<Reply>(&message.payload) {
            if matches(&reply) {
                return (message.subject.to_string(), reply);
            }
        }
    }
}

/// A `finished` that says the opposite of the truth.
fn forged_finished(build_id: &str, status: BuildStatus) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "build_id": build_id, "event": "finished", "repo": "homelab", "target": "slow",
        "rev": null, "status": status, "duration_ms": 1, "succeeded": 0, "failed": 1,
        "hosts": [], "error": null
    }))
    .unwrap()
}

/// A builder under the plan's table, a test deployer watching every
/// reply, and its victim: `homelab-deploy build homelab <targets>` signed
/// with the admin key, trusting only replies signed by the builder when
/// `builder_key`.
struct Watched {
    _ids: Identities,
    _nats: NatsServer,
    builder: Builder,
    attacker: Requester,
    everything: async_nats::Subscriber,
    victim: tokio::process::Child,
}

async fn watched_victim(
    flake: &Flake,
    targets: &[&str],
    builder_key: bool,
    configure: impl FnOnce(BuilderOptions) -> BuilderOptions,
) -> Watched {
    let ids = Identities::new();
    let (nats, builder) = signed_service(&ids, "nats-server.example.conf", flake, configure).await;
    let attacker = connect_as(&nats, &ids.test_deployer).await;
    let everything = attacker.nats.subscribe("build.responses.>").await.unwrap();
    attacker.nats.flush().await.unwrap();
    let mut args = vec!["build", "homelab"];
    args.extend(targets);
    args.extend(["--nkey-file", ids.admin.seed_arg()]);
    if builder_key {
        args.extend(["--builder-key", ids.builder.public_key.as_str()]);
    }
    let victim = spawn_cli(&nats.url(), &args);
    Watched {
        _ids: ids,
        _nats: nats,
        builder,
        attacker,
        everything,
        victim,
    }
}

// ---------------------------------------------------------------------------
// Forged results

/// Under the plan's table a test deployer may subscribe to every reply and
/// publish on any reply subject: it learns a victim's subject and build id
/// from the builder's own `accepted` and publishes a `finished` of its own.
/// With `--builder-key` the victim ignores it; without, it is fooled.
async fn forged_finished_against_a_client(builder_key: bool) -> std::process::Output {
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let Watched {
        _ids,
        _nats,
        builder: _builder,
        attacker,
        mut everything,
        victim,
    } = watched_victim(&flake, &["slow"], builder_key, |o| o).await;
    let (subject, accepted) = watch_for(&mut everything, |r| {
        matches!(r.event, Event::Accepted { .. })
    })
    .await;
    attacker
        .nats
        .publish(
            subject.clone(),
            forged_finished(&accepted.build_id, BuildStatus::Failed).into(),
        )
        .await
        .unwrap();
    attacker.nats.flush().await.unwrap();
    // The forgery reached the victim's subject before the real result.
    watch_for(&mut everything, |r| {
        matches!(r.event, Event::Finished { .. })
    })
    .await;
    flake.open_gate();
    finish(victim).await
}

#[tokio::test]
async fn a_forged_finished_is_ignored_with_the_builder_key() {
    let out = forged_finished_against_a_client(true).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ignoring an unsigned reply"), "{stderr}");
}

#[tokio::test]
async fn without_the_builder_key_a_forged_finished_is_believed() {
    // What --builder-key protects against: the same forgery, believed.
    let out = forged_finished_against_a_client(false).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

#[tokio::test]
async fn events_of_another_build_on_the_clients_subject_are_ignored() {
    // Even without a key, the client keeps to the build its `accepted` named.
    let ids = Identities::new();
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let (nats, _builder) = signed_service(&ids, "nats-server.example.conf", &flake, |o| o).await;
    let attacker = connect_as(&nats, &ids.test_deployer).await;
    let mut everything = attacker.nats.subscribe("build.responses.>").await.unwrap();
    attacker.nats.flush().await.unwrap();
    let victim = spawn_cli(
        &nats.url(),
        &[
            "build",
            "homelab",
            "slow",
            "--json",
            "--nkey-file",
            ids.admin.seed_arg(),
        ],
    );
    let (subject, _) = watch_for(&mut everything, |r| {
        matches!(r.event, Event::Accepted { .. })
    })
    .await;
    attacker
        .nats
        .publish(
            subject,
            forged_finished("0123456789abcdef", BuildStatus::Failed).into(),
        )
        .await
        .unwrap();
    attacker.nats.flush().await.unwrap();
    watch_for(&mut everything, |r| r.build_id == "0123456789abcdef").await;
    flake.open_gate();
    let out = finish(victim).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("0123456789abcdef"),
        "{}",
        describe(&out)
    );
}

/// Under the strict table only the builder publishes replies, so the
/// attacker makes the builder do it: a request identical to a cheap waiting
/// build, and a bogus request, both naming the victim's reply subject.
async fn borrowed_reply_subjects_change_nothing(file: &str) {
    let ids = Identities::new();
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok), ("ns2", Host::Ok)]);
    let (nats, mut builder) = signed_service(&ids, file, &flake, |o| o).await;
    let attacker = connect_as(&nats, &ids.test_deployer).await;
    let victim = connect_as(&nats, &ids.admin).await;

    let (mut blocker, _) = attacker.send_until_started("build.homelab.slow").await;
    let mut real = victim.send("build.homelab.ns2", "").await;
    let real_id = real.next().await.reply.build_id;
    let mut cheap = attacker.send("build.homelab.ns1", "").await;
    let cheap_id = cheap.next().await.reply.build_id;
    assert_ne!(real_id, cheap_id);

    for (subject, body) in [("build.homelab.ns1", ""), ("build.homelab.ns1", "{")] {
        attacker
            .nats
            .publish_with_reply(subject.to_owned(), real.reply_to.clone(), body.into())
            .await
            .unwrap();
    }
    attacker.nats.flush().await.unwrap();
    wait_for_ignored(&mut builder, "reply_subject_in_use", 2.0).await;

    flake.open_gate();
    blocker.until_terminal().await;
    cheap.until_terminal().await;
    let rest: Vec<Reply> = untimed(real.until_terminal().await);
    assert!(
        rest.iter().all(|r| r.build_id == real_id),
        "{file}: another build's event reached the victim: {rest:?}"
    );
    assert!(
        !event_names(&rest).contains(&"accepted") && !event_names(&rest).contains(&"rejected"),
        "{file}: {rest:?}"
    );
    assert!(
        matches!(
            terminal(&rest),
            Event::Finished {
                status: BuildStatus::Success,
                ..
            }
        ),
        "{file}: {rest:?}"
    );
    assert_eq!(rest.iter().filter(|r| r.is_terminal()).count(), 1);
}

#[tokio::test]
async fn borrowed_reply_subjects_change_nothing_under_the_plans_permissions() {
    borrowed_reply_subjects_change_nothing("nats-server.example.conf").await;
}

#[tokio::test]
async fn borrowed_reply_subjects_change_nothing_under_the_strict_permissions() {
    borrowed_reply_subjects_change_nothing("nats-server.strict.example.conf").await;
}

#[tokio::test]
async fn replies_never_go_outside_build_responses() {
    // Under the strict table `allow_responses` would deliver a rejection to
    // any subject a request names, e.g. into deploy.prod.
    let ids = Identities::new();
    let flake = Flake::homelab();
    let (nats, mut builder) =
        signed_service(&ids, "nats-server.strict.example.conf", &flake, |o| o).await;
    let admin = connect_as(&nats, &ids.admin).await;
    let mut prod = admin.nats.subscribe("deploy.prod.>").await.unwrap();
    admin.nats.flush().await.unwrap();
    let attacker = connect_as(&nats, &ids.test_deployer).await;
    for subject in [
        "build.homelab.bad$name",
        "build.homelab.ns1",
        "build.status",
        "build.cancel",
    ] {
        attacker
            .nats
            .publish_with_reply(
                subject.to_owned(),
                "deploy.prod.restart".to_owned(),
                "".into(),
            )
            .await
            .unwrap();
    }
    attacker.nats.flush().await.unwrap();
    wait_for_ignored(&mut builder, "foreign_reply_subject", 4.0).await;
    // One more request with a proper subject is answered; by then anything
    // sent to deploy.prod would have arrived.
    let replies = attacker.build("build.homelab.ns1", "{").await;
    assert_eq!(event_names(&replies), ["rejected"]);
    assert!(
        futures_util::FutureExt::now_or_never(prod.next()).is_none(),
        "the builder published outside build.responses."
    );
}

// ---------------------------------------------------------------------------
// Signatures

#[tokio::test]
async fn reply_signatures_verify_with_an_independent_ed25519_implementation() {
    let python = format!(
        "{}/target/tools/venv/bin/python",
        env!("CARGO_MANIFEST_DIR")
    );
    let has_nacl = std::process::Command::new(&python)
        .args(["-c", "import nacl.signing"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_nacl,
        "PyNaCl is not installed: run ./scripts/test (it sets up target/tools/venv)"
    );

    let ids = Identities::new();
    let flake = Flake::homelab();
    let (nats, _builder) = signed_service(&ids, "nats-server.example.conf", &flake, |o| o).await;
    let client = connect_as(&nats, &ids.admin).await;
    let reply_to = client.reply_subject();
    let mut subscriber = client.nats.subscribe(reply_to.clone()).await.unwrap();
    client
        .nats
        .publish_with_reply("build.homelab.ns1", reply_to.clone(), "".into())
        .await
        .unwrap();
    let mut checked = 0;
    let dir = tempfile::tempdir().unwrap();
    loop {
        let message = tokio::time::timeout(WAIT, subscriber.next())
            .await
            .unwrap()
            .unwrap();
        let headers = message.headers.clone().expect("an unsigned reply");
        let key = headers
            .get("Homelab-Deploy-Key")
            .unwrap()
            .as_str()
            .to_owned();
        let signature = headers
            .get("Homelab-Deploy-Signature")
            .unwrap()
            .as_str()
            .to_owned();
        assert_eq!(key, ids.builder.public_key);
        let body = dir.path().join("body");
        std::fs::write(&body, &message.payload).unwrap();
        let verify = |subject: &str| {
            std::process::Command::new(&python)
                .args([
                    &format!("{}/tests/verify_signature.py", env!("CARGO_MANIFEST_DIR")),
                    &key,
                    &signature,
                    subject,
                    body.to_str().unwrap(),
                ])
                .output()
                .unwrap()
        };
        let out = verify(&reply_to);
        assert!(out.status.success(), "{}", describe(&out));
        // The same check fails for another subject: it can fail.
        assert!(!verify("build.responses.other").status.success());
        checked += 1;
        let reply: Reply = serde_json::from_slice(&message.payload).unwrap();
        if reply.is_terminal() {
            break;
        }
    }
    assert!(checked >= 4, "only {checked} replies");
}

#[tokio::test]
async fn unsigned_requests_are_refused_when_signatures_are_required() {
    let ids = Identities::new();
    let flake = Flake::homelab();
    let (nats, _builder) = signed_service(&ids, "nats-server.example.conf", &flake, |o| {
        o.auth("require_signed = true")
    })
    .await;
    // A plain NATS client authenticates with the key but signs nothing.
    let deployer = connect_as(&nats, &ids.test_deployer).await;
    let replies = deployer.build("build.homelab.ns1", "").await;
    match terminal(&replies) {
        Event::Rejected { error, .. } => assert_eq!(error.code, ErrorCode::Unauthorized),
        other => panic!("{other:?}"),
    }
    // The CLI with the same key signs, and builds.
    let out = run_cli(
        &nats.url(),
        &[
            "build",
            "homelab",
            "ns1",
            "--nkey-file",
            ids.test_deployer.seed_arg(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

// ---------------------------------------------------------------------------
// Cancels

#[tokio::test]
async fn only_listed_requesters_may_build_when_the_builder_lists_them() {
    // Under the plan's table both deployers may publish on `build.>`; the
    // builder lists only the admin deployer's key.
    let ids = Identities::new();
    let flake = Flake::homelab();
    let (nats, _builder) = signed_service(&ids, "nats-server.example.conf", &flake, |o| {
        o.auth(&format!(
            "require_signed = true\nrequesters = [\"{}\"]",
            ids.admin.public_key
        ))
    })
    .await;
    let build_as = |seed: &std::path::Path| {
        let seed = seed.to_str().unwrap().to_owned();
        let url = nats.url();
        async move { run_cli(&url, &["build", "homelab", "ns1", "--nkey-file", &seed]).await }
    };
    let refused = build_as(&ids.test_deployer.seed_file).await;
    assert_eq!(refused.status.code(), Some(2), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("unauthorized"),
        "{}",
        describe(&refused)
    );
    let built = build_as(&ids.admin.seed_file).await;
    assert_eq!(built.status.code(), Some(0), "{}", describe(&built));
}

#[tokio::test]
async fn builds_are_cancelled_only_by_their_owner_or_an_admin() {
    // A server without authorization: who signed is all that matters, and
    // every key may publish build.cancel (as under the plan's table).
    let ids = Identities::new();
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok), ("ns2", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| {
        o.signing_with(&ids.builder.seed_file)
            .auth(&format!("admins = [\"{}\"]", ids.admin.public_key))
    })
    .await;
    let owner = ids.test_deployer.seed_arg();
    let admin = ids.admin.seed_arg();
    let stranger_seed = &ids.outsider.seed_file;

    // A signed running build, a signed waiting one, an unsigned waiting one.
    let running = spawn_cli(
        &nats.url(),
        &["build", "homelab", "slow", "--json", "--nkey-file", owner],
    );
    let status = async || {
        let out = run_cli(&nats.url(), &["status", "--json", "--nkey-file", admin]).await;
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let mut running_id = String::new();
    poll(
        "the signed build to run",
        async || {
            let now = status().await;
            running_id = now["running"]["build_id"].as_str().unwrap_or("").to_owned();
            now["running"]["hosts"][0]["host"] == "slow"
        },
        |running| *running,
    )
    .await;
    assert_eq!(
        status().await["running"]["owner"],
        ids.test_deployer.public_key.as_str()
    );
    let waiting = spawn_cli(
        &nats.url(),
        &["build", "homelab", "ns1", "--nkey-file", owner],
    );
    let plain = Requester::new(&nats).await;
    let mut unsigned = plain.send("build.homelab.ns2", "").await;
    let unsigned_id = unsigned.next().await.reply.build_id;
    let mut waiting_id = String::new();
    poll(
        "the signed waiting build to be queued",
        async || {
            let now = status().await;
            let queue = now["queue"].as_array().cloned().unwrap_or_default();
            waiting_id = queue
                .iter()
                .find(|q| q["target"] == "ns1")
                .and_then(|q| q["build_id"].as_str())
                .unwrap_or("")
                .to_owned();
            !waiting_id.is_empty()
        },
        |queued| *queued,
    )
    .await;

    let cancel = async |id: &str, key: Option<&str>| {
        let mut args = vec!["cancel", id, "--json"];
        if let Some(key) = key {
            args.extend(["--nkey-file", key]);
        }
        let out = run_cli(&nats.url(), &args).await;
        let reply: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", describe(&out)));
        (out.status.code(), reply)
    };
    // A stranger, an unsigned cancel, and the owner of other builds may not.
    for (id, key) in [
        (running_id.as_str(), Some(stranger_seed.to_str().unwrap())),
        (running_id.as_str(), None),
        (waiting_id.as_str(), Some(stranger_seed.to_str().unwrap())),
        (unsigned_id.as_str(), Some(owner)),
    ] {
        let (code, reply) = cancel(id, key).await;
        assert_eq!(code, Some(2), "{reply}");
        assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
        assert_eq!(reply["found"], false, "{reply}");
    }
    assert_eq!(status().await["running"]["build_id"], running_id.as_str());
    assert_eq!(status().await["queue"].as_array().unwrap().len(), 2);

    // The owner cancels its waiting build; an admin the unsigned one and
    // the owner's running one.
    for (id, key, state) in [
        (waiting_id.as_str(), owner, "queued"),
        (unsigned_id.as_str(), admin, "queued"),
        (running_id.as_str(), admin, "running"),
    ] {
        let (code, reply) = cancel(id, Some(key)).await;
        assert_eq!(code, Some(0), "{reply}");
        assert_eq!(reply["state"], state, "{reply}");
    }
    let out = finish(running).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"cancelled\""));
    assert_eq!(finish(waiting).await.status.code(), Some(1));
    let rest: Vec<Reply> = untimed(unsigned.until_terminal().await);
    assert!(matches!(
        terminal(&rest),
        Event::Finished {
            status: BuildStatus::Cancelled,
            ..
        }
    ));
}

// ---------------------------------------------------------------------------
// Bounds and liveness

#[tokio::test]
async fn one_build_takes_at_most_64_requesters() {
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let (mut blocker, _) = client.send_until_started("build.homelab.slow").await;
    let mut requests = Vec::new();
    for _ in 0..65 {
        requests.push(client.send("build.homelab.ns1", "").await);
    }
    let mut ids = Vec::new();
    for request in &mut requests {
        ids.push(request.next().await.reply.build_id);
    }
    // 64 share one build; the 65th got a build of its own.
    assert!(ids[..64].iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_ne!(ids[64], ids[0]);
    flake.open_gate();
    blocker.until_terminal().await;
    for request in &mut requests {
        let rest: Vec<Reply> = untimed(request.until_terminal().await);
        assert_eq!(rest.iter().filter(|r| r.is_terminal()).count(), 1);
    }
}

#[tokio::test]
async fn a_killed_builder_makes_the_client_exit_3_within_the_heartbeat_bound() {
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let (nats, builder) = start_service(&flake, |o| o.builder("progress_interval = \"1s\"")).await;
    let client = spawn_cli(&nats.url(), &["build", "homelab", "slow"]);
    wait_for("the build to run", WAIT, || {
        !processes_matching(&flake.gate().display().to_string()).is_empty()
    })
    .await;
    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-KILL", &builder.pid().to_string()])
        .status()
        .unwrap();
    let out = finish(client).await;
    let waited = killed.elapsed();
    flake.open_gate();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("went silent"),
        "{}",
        describe(&out)
    );
    // Three heartbeats of 1 s and 10 s of grace, with room for a busy machine.
    assert!(waited < Duration::from_secs(20), "{waited:?}");
}

#[tokio::test]
async fn a_waiting_request_hears_heartbeats() {
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| o.builder("progress_interval = \"1s\"")).await;
    let client = Requester::new(&nats).await;
    let (mut blocker, _) = client.send_until_started("build.homelab.slow").await;
    let mut waiting = client.send("build.homelab.ns1", "").await;
    let accepted = waiting.next().await;
    assert!(matches!(
        accepted.reply.event,
        Event::Accepted {
            heartbeat_ms: 1000,
            ..
        }
    ));
    let heartbeats = waiting.until(|e| matches!(e, Event::Heartbeat)).await;
    assert_eq!(heartbeats.len(), 1);
    let again = waiting.until(|e| matches!(e, Event::Heartbeat)).await;
    // At most 1.5 heartbeats and a second apart, and only heartbeats.
    assert_eq!(again.len(), 1);
    assert!(again[0].at - heartbeats[0].at < Duration::from_millis(2600));
    flake.open_gate();
    blocker.until_terminal().await;
    waiting.until_terminal().await;
}

#[tokio::test]
async fn a_finished_too_large_for_max_payload_is_shortened_not_lost() {
    let hosts: Vec<(String, Host)> = (0..30)
        .map(|i| (format!("host-{i:02}"), Host::FailEval))
        .collect();
    let hosts: Vec<(&str, Host)> = hosts.iter().map(|(n, h)| (n.as_str(), h.clone())).collect();
    let flake = Flake::new(&hosts);
    let nats = NatsServer::start_with_config("max_payload: 2048\n").await;
    let builder = Builder::start(&nats, &BuilderOptions::new(&flake)).await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    match terminal(&replies) {
        Event::Finished {
            hosts,
            failed,
            omitted_hosts,
            ..
        } => {
            assert_eq!(*failed, 30);
            assert!(*omitted_hosts > 0);
            assert_eq!(hosts.len() + omitted_hosts, 30);
        }
        other => panic!("{other:?}"),
    }
    drop(builder);
}

#[tokio::test]
async fn local_configuration_errors_exit_2_and_an_absent_server_3() {
    let dir = tempfile::tempdir().unwrap();
    let seed = nkey_user(dir.path(), "me").seed_file;
    let open = dir.path().join("open.nk");
    std::fs::copy(&seed, &open).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let creds = dir.path().join("open.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            std::fs::read_to_string(&seed).unwrap()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let nowhere = format!("nats://127.0.0.1:{}", free_port());
    for (url, args) in [
        (
            nowhere.as_str(),
            vec!["status", "--nkey-file", open.to_str().unwrap()],
        ),
        (
            nowhere.as_str(),
            vec!["status", "--creds-file", creds.to_str().unwrap()],
        ),
        ("nats://bad host:1", vec!["status"]),
        (
            nowhere.as_str(),
            vec!["status", "--builder-key", "Unot-a-key"],
        ),
    ] {
        let out = run_cli(url, &args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
    let out = run_cli(&nowhere, &["status", "--nkey-file", seed.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

// ---------------------------------------------------------------------------
// Text safe to print

/// Characters that act on a terminal instead of being shown: ESC, BEL and
/// every C1 control (as the UTF-8 a terminal would read).
fn terminal_controls(output: &[u8]) -> Vec<char> {
    String::from_utf8_lossy(output)
        .chars()
        .filter(|&c| c == '\x1b' || c == '\x07' || ('\u{80}'..='\u{9f}').contains(&c))
        .collect()
}

/// A window title, an OSC 52 clipboard write, cursor up, erase line, a
/// carriage return and a C1 CSI.
const HOSTILE: &str = "pwned\x1b]0;title\x07\x1b]52;c;ZWNobw==\x07\x1b[1A\x1b[2K\r\u{9b}2J";

#[tokio::test]
async fn forged_events_put_no_control_sequence_on_the_clients_terminal() {
    let flake = Flake::new(&[("slow", Host::Gated)]);
    // No --builder-key: the victim believes whatever reaches its subject.
    let Watched {
        _ids,
        _nats,
        builder: _builder,
        attacker,
        mut everything,
        victim,
    } = watched_victim(&flake, &["slow"], false, |o| o).await;
    let (subject, accepted) = watch_for(&mut everything, |r| {
        matches!(r.event, Event::Accepted { .. })
    })
    .await;
    let forged = |event: Event| {
        serde_json::to_vec(&Reply {
            build_id: accepted.build_id.clone(),
            seq: None,
            event,
        })
        .unwrap()
    };
    let hostile_error = ErrorBody::new(ErrorCode::BuildFailed, format!("boom {HOSTILE}"));
    for event in [
        Event::Log {
            host: format!("slow{HOSTILE}"),
            lines: vec![format!("line {HOSTILE}")],
        },
        Event::Finished {
            repo: "homelab".into(),
            target: "slow".into(),
            rev: None,
            status: BuildStatus::Failed,
            duration_ms: 1,
            succeeded: 0,
            failed: 1,
            hosts: vec![],
            skipped: vec![],
            omitted_hosts: 0,
            error: Some(hostile_error),
        },
    ] {
        attacker
            .nats
            .publish(subject.clone(), forged(event).into())
            .await
            .unwrap();
    }
    attacker.nats.flush().await.unwrap();
    let out = finish(victim).await;
    flake.open_gate();
    // The forgery was believed and shown (the test would prove nothing
    // otherwise), but as text.
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("line pwned\\x1b]0;title\\x07"), "{stdout}");
    assert!(stdout.contains("boom pwned"), "{stdout}");
    assert_eq!(
        terminal_controls(&out.stdout),
        Vec::<char>::new(),
        "{stdout:?}"
    );
    assert_eq!(
        terminal_controls(&out.stderr),
        Vec::<char>::new(),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn hostile_attribute_names_reach_the_client_quoted() {
    // A flake author's attribute names are listed when a host is not
    // found; one of them carries escape sequences.
    let flake = Flake::with_attribute_names(&[
        "ns1",
        r#"${builtins.fromJSON ''"evil\u001b]0;title\u0007\u001b[2K\u009b2J"''}"#,
    ]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let out = finish(spawn_cli(&nats.url(), &["build", "homelab", "nope"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shown.contains("unknown_host"), "{shown}");
    // Quoted by the builder (Rust's escapes), not only escaped by the CLI
    // (which would show `\x1b`).
    assert!(shown.contains(r#""evil\u{1b}]0;title\u{7}"#), "{shown}");
    assert_eq!(
        terminal_controls(&out.stdout),
        Vec::<char>::new(),
        "{shown:?}"
    );
    assert_eq!(
        terminal_controls(&out.stderr),
        Vec::<char>::new(),
        "{shown:?}"
    );
}

// ---------------------------------------------------------------------------
// Pre-empted subjects and replays

/// The first message on `subscriber` whose reply parses and `matches`,
/// whole (headers included, for a replay).
async fn capture(
    subscriber: &mut async_nats::Subscriber,
    matches: impl Fn(&Reply) -> bool,
) -> async_nats::Message {
    loop {
        let message = tokio::time::timeout(WAIT, subscriber.next())
            .await
            .expect("no matching reply")
            .unwrap();
        if serde_json::from_slice::<Reply>(&message.payload).is_ok_and(|r| matches(&r)) {
            return message;
        }
    }
}

/// Publishes `message` again on `subject`, with its own headers (its
/// signature, valid for the subject it was first sent on).
async fn replay(nats: &async_nats::Client, message: &async_nats::Message, subject: &str) {
    let headers = message.headers.clone().unwrap_or_default();
    nats.publish_with_headers(subject.to_owned(), headers, message.payload.clone())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_deployer_cannot_preempt_a_clients_next_subject_or_swap_its_verdict() {
    // The victim builds two targets with --builder-key; the second always
    // fails. The attacker (a test deployer under the plan's table) watches
    // every reply, takes the subject it predicts the victim uses next with
    // a cheap build of its own, and replays that build's genuine, signed
    // events on every new subject of the victim.
    let flake = Flake::new(&[
        ("slow", Host::Gated),
        ("ns1", Host::Ok),
        ("broken-build", Host::FailBuild),
    ]);
    // Every part bound: one left to `..` would be dropped here.
    let Watched {
        _ids,
        _nats,
        builder: _builder,
        attacker,
        mut everything,
        victim,
    } = watched_victim(&flake, &["slow", "broken-build"], true, |o| o).await;
    let first = capture(&mut everything, |r| {
        matches!(r.event, Event::Accepted { .. })
    })
    .await;
    let first_subject = first.subject.to_string();
    let (prefix, _) = first_subject.rsplit_once('.').unwrap();
    let prefix = prefix.to_owned();
    // What a counter would make the victim's next subjects.
    let predicted: Vec<String> = (0..4).map(|n| format!("{prefix}.{n}")).collect();
    for subject in &predicted {
        if *subject != first_subject {
            attacker
                .nats
                .publish_with_reply("build.homelab.ns1", subject.clone(), "".into())
                .await
                .unwrap();
        }
    }
    attacker.nats.flush().await.unwrap();
    flake.open_gate();

    // Replays of the attacker's own build onto each new subject of the
    // victim's, until the victim is done.
    let mut own = Vec::new();
    let mut victims_subjects = vec![first_subject.clone()];
    let mut victim = Box::pin(finish(victim));
    let out = loop {
        tokio::select! {
            out = &mut victim => break out,
            message = everything.next() => {
                let message = message.unwrap();
                let subject = message.subject.to_string();
                if predicted.contains(&subject) {
                    for victim_subject in &victims_subjects[1..] {
                        replay(&attacker.nats, &message, victim_subject).await;
                    }
                    own.push(message);
                } else if subject.starts_with(&prefix) && !victims_subjects.contains(&subject) {
                    for message in &own {
                        replay(&attacker.nats, message, &subject).await;
                    }
                    victims_subjects.push(subject);
                }
            }
        }
    };
    // The victim's own second request was built, and its failure shown.
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("broken-build: FAILED"),
        "{}",
        describe(&out)
    );
    assert_eq!(victims_subjects.len(), 2, "{victims_subjects:?}");
    assert!(
        !predicted.contains(&victims_subjects[1]),
        "the victim's next subject was predictable: {victims_subjects:?}"
    );
}

#[tokio::test]
async fn replayed_accepted_events_do_not_keep_a_client_waiting_on_a_killed_builder() {
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let Watched {
        _ids,
        _nats,
        builder,
        attacker,
        mut everything,
        victim,
    } = watched_victim(&flake, &["slow"], true, |o| {
        o.builder("progress_interval = \"1s\"")
    })
    .await;
    // The victim's own, genuinely signed `accepted`.
    let accepted = capture(&mut everything, |r| {
        matches!(r.event, Event::Accepted { .. })
    })
    .await;
    wait_for("the build to run", WAIT, || {
        !processes_matching(&flake.gate().display().to_string()).is_empty()
    })
    .await;
    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-KILL", &builder.pid().to_string()])
        .status()
        .unwrap();
    // Re-published every second, bounded, until the victim gives up.
    let mut victim = Box::pin(finish(victim));
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let out = loop {
        tokio::select! {
            out = &mut victim => break out,
            _ = every.tick() => {
                assert!(killed.elapsed() < Duration::from_secs(60), "the victim never gave up");
                replay(&attacker.nats, &accepted, &accepted.subject).await;
            }
        }
    };
    let waited = killed.elapsed();
    flake.open_gate();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("went silent"), "{}", describe(&out));
    assert!(
        stderr.contains("ignoring an event seen before"),
        "{}",
        describe(&out)
    );
    // The same bound as without replays: three heartbeats of 1 s and 10 s
    // of grace, with room for a busy machine.
    assert!(waited < Duration::from_secs(20), "{waited:?}");
    // And the replays printed nothing twice.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("accepted").count(), 1, "{stdout}");
}
