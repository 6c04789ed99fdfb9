//! The builder against a real nats-server and a real Nix: the wire protocol
//! as a client sees it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::builder::start_service;
use common::flake::{Flake, Host};
use common::nix::nix_command;
use common::process::{child_pids, processes_matching};
use common::replies::{event_names, host_outcomes, terminal, untimed};
use common::requester::Requester;
use common::wait::{WAIT, wait_for};
use homelab_deploy::protocol::{BuildStatus, ErrorCode, Event, HostStatus, Reply};

fn store_file(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{path}: {err}"))
}

fn rejected_code(replies: &[Reply]) -> ErrorCode {
    assert_eq!(
        replies.len(),
        1,
        "a rejection is exactly one event: {replies:?}"
    );
    match &replies[0].event {
        Event::Rejected { error, .. } => error.code,
        other => panic!("expected rejected, got {other:?}"),
    }
}

fn started_rev(replies: &[Reply]) -> String {
    replies
        .iter()
        .find_map(|r| match &r.event {
            Event::Started { rev, .. } => rev.clone(),
            _ => None,
        })
        .expect("no started event")
}

fn out_path(replies: &[Reply], host: &str) -> String {
    replies
        .iter()
        .find_map(|r| match &r.event {
            Event::HostFinished {
                host: h, out_path, ..
            } if h == host => out_path.clone(),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no out_path for {host}: {replies:?}"))
}

#[tokio::test]
async fn single_host_build_sends_the_documented_sequence() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.ns1", "").await;

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
    let build_id = &replies[0].build_id;
    assert_eq!(build_id.len(), 16);
    assert!(replies.iter().all(|r| &r.build_id == build_id));
    // Events are numbered from `accepted` on, one by one.
    let seqs: Vec<Option<u64>> = replies.iter().map(|r| r.seq).collect();
    let expected: Vec<Option<u64>> = (0..replies.len() as u64).map(Some).collect();
    assert_eq!(seqs, expected);
    match &replies[0].event {
        Event::Accepted {
            request_digest,
            repo,
            target,
            git_ref,
            queue_position,
            heartbeat_ms,
            builder,
        } => {
            assert!(builder.as_deref().is_some_and(|name| !name.is_empty()));
            let digest = request_digest.as_deref().expect("no request_digest");
            assert!(
                digest.len() == 64
                    && digest
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{digest}"
            );
            assert_eq!((repo.as_str(), target.as_str()), ("homelab", "ns1"));
            assert_eq!(git_ref, &None);
            assert_eq!(*queue_position, 0);
            // The default progress_interval (30 s) is the heartbeat.
            assert_eq!(*heartbeat_ms, 30_000);
        }
        other => panic!("{other:?}"),
    }
    match &replies[1].event {
        Event::Started { rev, hosts, .. } => {
            assert_eq!(rev.as_deref(), Some(flake.head().as_str()));
            assert_eq!(hosts, &["ns1"]);
        }
        other => panic!("{other:?}"),
    }
    let path = out_path(&replies, "ns1");
    assert!(path.starts_with("/nix/store/"), "{path}");
    assert!(store_file(&path).starts_with("initial /nix/store/"));
    match terminal(&replies) {
        Event::Finished {
            status,
            succeeded,
            failed,
            hosts,
            rev,
            error,
            ..
        } => {
            assert_eq!(*status, BuildStatus::Success);
            assert_eq!((*succeeded, *failed), (1, 0));
            assert_eq!(hosts.len(), 1);
            assert_eq!(hosts[0].out_path.as_deref(), Some(path.as_str()));
            assert_eq!(rev.as_deref(), Some(flake.head().as_str()));
            assert!(error.is_none());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn all_builds_every_host_in_order_and_isolates_failures() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.all", "").await;

    let hosts = ["broken-build", "broken-eval", "ns1", "ns2"];
    match &replies[1].event {
        Event::Started { hosts: listed, .. } => assert_eq!(listed, &hosts),
        other => panic!("{other:?}"),
    }
    // host_started i, host_finished i, host_started i+1, ...
    let steps: Vec<(String, usize)> = replies
        .iter()
        .filter_map(|r| match &r.event {
            Event::HostStarted { host, index, total } => {
                assert_eq!(*total, 4);
                Some((format!("start {host}"), *index))
            }
            Event::HostFinished { host, .. } => Some((format!("end {host}"), 0)),
            _ => None,
        })
        .collect();
    let expected: Vec<(String, usize)> = hosts
        .iter()
        .enumerate()
        .flat_map(|(i, h)| [(format!("start {h}"), i + 1), (format!("end {h}"), 0)])
        .collect();
    assert_eq!(steps, expected);

    let results = host_outcomes(&replies);
    assert_eq!(results[0].status, HostStatus::Failed);
    assert_eq!(results[0].code, Some(ErrorCode::BuildFailed));
    assert!(
        results[0].message.contains("exit code 3"),
        "{}",
        results[0].message
    );
    assert!(
        results[0]
            .message
            .contains("error detail from broken-build"),
        "{}",
        results[0].message
    );
    assert!(!results[0].message.contains('\u{1b}'));
    assert_eq!(results[1].status, HostStatus::Failed);
    assert_eq!(results[1].code, Some(ErrorCode::EvalFailed));
    assert!(
        results[1]
            .message
            .contains("host broken-eval does not evaluate"),
        "{}",
        results[1].message
    );
    assert_eq!(results[2].status, HostStatus::Success);
    assert_eq!(results[3].status, HostStatus::Success);

    // ns1 and ns2 share one dependency.
    let ns1 = store_file(&out_path(&replies, "ns1"));
    let ns2 = store_file(&out_path(&replies, "ns2"));
    let shared = |s: &str| s.split_whitespace().nth(1).unwrap().to_owned();
    assert_eq!(shared(&ns1), shared(&ns2));

    match terminal(&replies) {
        Event::Finished {
            status,
            succeeded,
            failed,
            hosts: summary,
            ..
        } => {
            assert_eq!(*status, BuildStatus::Failed);
            assert_eq!((*succeeded, *failed), (2, 2));
            let names: Vec<_> = summary.iter().map(|h| h.host.as_str()).collect();
            assert_eq!(names, hosts);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(replies.iter().filter(|r| r.is_terminal()).count(), 1);
}

#[tokio::test]
async fn exclude_skips_hosts_for_all_but_not_by_name() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| {
        o.repo("exclude = [\"broken-build\", \"broken-eval\"]")
    })
    .await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.all", "").await;
    match &replies[1].event {
        Event::Started { hosts, .. } => assert_eq!(hosts, &["ns1", "ns2"]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        terminal(&replies),
        Event::Finished {
            status: BuildStatus::Success,
            ..
        }
    ));

    let replies = client.build("build.homelab.broken-build", "").await;
    assert_eq!(host_outcomes(&replies)[0].host, "broken-build");
}

#[tokio::test]
async fn invalid_requests_get_exactly_one_rejection() {
    let flake = Flake::homelab();
    let (nats, builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    // A repo the builder does not serve is not its to answer: NATS says
    // nobody listens, and the builder never sees the request.
    let unserved = client
        .nats
        .request("build.nope.ns1", "".into())
        .await
        .expect_err("an answer for a repo nobody serves");
    assert_eq!(
        unserved.kind(),
        async_nats::RequestErrorKind::NoResponders,
        "{unserved}"
    );

    let cases: &[(&str, &str, ErrorCode)] = &[
        ("build.homelab.$(id)", "", ErrorCode::InvalidRequest),
        ("build.homelab.ns1", "{", ErrorCode::InvalidRequest),
        ("build.homelab.ns1", "[]", ErrorCode::InvalidRequest),
        (
            "build.homelab.ns1",
            r#"{"ref":"master","extra":true}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            "build.homelab.ns1",
            r#"{"ref":"--upload-pack=x"}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            "build.homelab.ns1",
            r#"{"ref":"a..b"}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            "build.homelab.ns1",
            r#"{"ref":"a b"}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            "build.homelab.ns1",
            r#"{"ref":"a\u0001b"}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            "build.homelab.ns1",
            r#"{"ref":"master&rev=1"}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            "build.homelab.ns1",
            r#"{"rev":"abc"}"#,
            ErrorCode::InvalidRequest,
        ),
    ];
    for (subject, body, code) in cases {
        let replies = client.build(subject, body).await;
        assert_eq!(rejected_code(&replies), *code, "{subject} {body}");
        assert_eq!(replies[0].build_id.len(), 16);
    }
    let long_ref = format!(r#"{{"ref":"{}"}}"#, "a".repeat(201));
    let replies = client.build("build.homelab.ns1", &long_ref).await;
    assert_eq!(rejected_code(&replies), ErrorCode::InvalidRequest);

    // Nothing was built: no Nix process ever ran for a rejected request
    // (only the builder's look at its remote builders: Nix's settings).
    let log = builder.log_text();
    let settings = |line: &str| line.contains("show-config") || line.contains("config show");
    assert!(
        !log.lines()
            .any(|line| line.contains("running nix") && !settings(line)),
        "{log}"
    );
}

#[tokio::test]
async fn a_reply_subject_outside_build_responses_gets_nothing_and_nothing_is_built() {
    let flake = Flake::homelab();
    let (nats, builder) = start_service(&flake, |o| o).await;
    let client = nats.connect().await;
    let mut inbox = client.subscribe("_INBOX.elsewhere").await.unwrap();
    client
        .publish_with_reply("build.homelab.ns1", "_INBOX.elsewhere", "".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    // A request after it on the same subscription is answered: by then
    // the first would have been.
    let requester = Requester::new(&nats).await;
    let replies = requester.build("build.homelab.ns1", "{").await;
    assert_eq!(event_names(&replies), ["rejected"]);
    assert!(
        futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(&mut inbox)).is_none()
    );
    assert!(!builder.log_text().contains("request accepted"));
}

#[tokio::test]
async fn unknown_host_and_unfetchable_flake_fail_before_started() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| {
        o.add_repo("gone", "git+file:///nonexistent/homelab-deploy-test")
    })
    .await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.nope", "").await;
    assert_eq!(event_names(&replies), ["accepted", "finished"]);
    match terminal(&replies) {
        Event::Finished {
            status,
            error: Some(error),
            hosts,
            ..
        } => {
            assert_eq!(*status, BuildStatus::Failed);
            assert_eq!(error.code, ErrorCode::UnknownHost);
            assert!(error.message.contains("ns1"), "{}", error.message);
            assert!(hosts.is_empty());
        }
        other => panic!("{other:?}"),
    }

    let replies = client.build("build.gone.all", "").await;
    assert_eq!(event_names(&replies), ["accepted", "finished"]);
    match terminal(&replies) {
        Event::Finished {
            error: Some(error), ..
        } => assert_eq!(error.code, ErrorCode::FetchFailed, "{}", error.message),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn queued_request_waits_for_the_running_one_and_the_queue_is_bounded() {
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| o.builder("queue_limit = 1")).await;
    let client = Requester::new(&nats).await;

    let (mut first, first_events) = client.send_until_started("build.homelab.slow").await;
    assert!(matches!(
        first_events[0].reply.event,
        Event::Accepted {
            queue_position: 0,
            ..
        }
    ));

    let mut second = client.send("build.homelab.ns1", "").await;
    let accepted = second.next().await;
    assert!(
        matches!(
            accepted.reply.event,
            Event::Accepted {
                queue_position: 1,
                ..
            }
        ),
        "{:?}",
        accepted.reply
    );

    // queue_limit = 1: a third, different request does not fit.
    let third = client.build("build.homelab.ns1", r#"{"logs":true}"#).await;
    assert_eq!(rejected_code(&third), ErrorCode::QueueFull);

    flake.open_gate();
    // Read side by side: both come over one connection in the builder's
    // sending order, so the arrival stamps tell which was sent first.
    let (first_rest, second_rest) = tokio::join!(first.until_terminal(), second.until_terminal());
    let first_finished = first_rest.last().unwrap();
    assert!(matches!(
        first_finished.reply.event,
        Event::Finished {
            status: BuildStatus::Success,
            ..
        }
    ));
    let second_started = second_rest
        .iter()
        .find(|t| matches!(t.reply.event, Event::Started { .. }))
        .unwrap();
    assert!(
        second_started.at > first_finished.at,
        "the queued build started before the running one finished"
    );
}

#[tokio::test]
async fn ref_builds_the_named_branch() {
    let flake = Flake::homelab();
    let master = flake.head();
    flake.branch("flake-update");
    let branch = flake.commit_change("updated");
    flake.checkout("master");
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let replies = client
        .build("build.homelab.ns1", r#"{"ref":"flake-update"}"#)
        .await;
    assert!(matches!(
        &replies[0].event,
        Event::Accepted { git_ref: Some(r), .. } if r == "flake-update"
    ));
    assert_eq!(started_rev(&replies), branch);
    assert!(store_file(&out_path(&replies, "ns1")).starts_with("updated "));

    let replies = client.build("build.homelab.ns1", "").await;
    assert_eq!(started_rev(&replies), master);
}

#[tokio::test]
async fn repo_default_ref_is_used_when_the_request_names_none() {
    let flake = Flake::homelab();
    flake.branch("stable");
    let stable = flake.commit_change("stable");
    flake.checkout("master");
    let (nats, _builder) = start_service(&flake, |o| o.repo("ref = \"stable\"")).await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.ns1", "").await;
    assert!(matches!(
        &replies[0].event,
        Event::Accepted { git_ref: Some(r), .. } if r == "stable"
    ));
    assert_eq!(started_rev(&replies), stable);
}

#[tokio::test]
async fn a_branch_that_moved_is_fetched_fresh() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let before = client.build("build.homelab.ns1", "").await;
    assert_eq!(started_rev(&before), flake.head());
    let moved = flake.commit_change("moved");
    let after = client.build("build.homelab.ns1", "").await;
    assert_eq!(started_rev(&after), moved);
    assert!(store_file(&out_path(&after, "ns1")).starts_with("moved "));
    assert_ne!(out_path(&before, "ns1"), out_path(&after, "ns1"));
}

#[tokio::test]
async fn rev_pins_an_exact_commit() {
    let flake = Flake::homelab();
    let old = flake.head();
    flake.commit_change("newer");
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let replies = client
        .build(
            "build.homelab.ns1",
            &format!(r#"{{"ref":"master","rev":"{old}"}}"#),
        )
        .await;
    assert_eq!(started_rev(&replies), old);
    assert!(store_file(&out_path(&replies, "ns1")).starts_with("initial "));
}

#[tokio::test]
async fn host_timeout_kills_the_build_and_leaves_no_process_behind() {
    let flake = Flake::new(&[("stuck", Host::Gated)]);
    // Fetching and listing the hosts count against it too: leave them room.
    let (nats, builder) = start_service(&flake, |o| o.host_timeout("10s")).await;
    let client = Requester::new(&nats).await;

    let replies = client.build("build.homelab.stuck", "").await;
    let results = host_outcomes(&replies);
    assert_eq!(results[0].status, HostStatus::Timeout);
    assert_eq!(results[0].code, Some(ErrorCode::Timeout));
    assert!(
        results[0].message.contains("host_timeout (10s)"),
        "{}",
        results[0].message
    );
    assert!(matches!(
        terminal(&replies),
        Event::Finished {
            status: BuildStatus::Failed,
            ..
        }
    ));

    let gate = flake.gate().display().to_string();
    wait_for("the builder's shell to be gone", WAIT, || {
        processes_matching(&gate).is_empty()
    })
    .await;
    let nix_children: Vec<u32> = child_pids(builder.pid())
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == "nix")
                .unwrap_or(false)
        })
        .collect();
    assert!(
        nix_children.is_empty(),
        "nix still running: {nix_children:?}"
    );
}

#[tokio::test]
async fn progress_names_the_building_derivation_and_keeps_coming_while_quiet() {
    let flake = Flake::new(&[("slow", Host::Gated)]);
    let (nats, _builder) = start_service(&flake, |o| o.builder("progress_interval = \"1s\"")).await;
    let client = Requester::new(&nats).await;

    let mut pending = client.send("build.homelab.slow", "").await;
    // The shared dependency builds first; wait for the host's own build.
    let seen = pending
        .until(|e| {
            matches!(
                e,
                Event::Progress {
                    building: Some(building),
                    ..
                } if building == "slow"
            )
        })
        .await;
    let quiet = seen.last().unwrap().reply.event.clone();
    match &quiet {
        Event::Progress {
            host,
            building,
            expected,
            ..
        } => {
            assert_eq!(host, "slow");
            assert_eq!(building.as_deref(), Some("slow"));
            // The host and the dependency it shares with every host.
            assert_eq!(*expected, 2);
        }
        other => panic!("{other:?}"),
    }
    // Nothing changes while the gate is closed; progress still arrives.
    for _ in 0..2 {
        assert_eq!(pending.next().await.reply.event, quiet);
    }
    flake.open_gate();
    let rest = pending.until_terminal().await;
    assert!(matches!(
        rest.last().unwrap().reply.event,
        Event::Finished {
            status: BuildStatus::Success,
            ..
        }
    ));
}

#[tokio::test]
async fn messages_under_build_responses_are_never_builds() {
    let flake = Flake::homelab();
    let (nats, builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    // Three tokens, as if "responses" were a repo.
    let mut ignored = client.send("build.responses.ns1", "").await;
    // The builder handles messages in order: once a later request has been
    // answered, anything for the first would already have arrived.
    let replies = client.build("build.homelab.nope", "").await;
    assert!(matches!(terminal(&replies), Event::Finished { .. }));
    assert!(
        ignored.try_next().is_none(),
        "build.responses.* was answered"
    );
    assert!(!builder.log_text().contains("repo=responses"));
}

#[tokio::test]
async fn a_request_without_reply_subject_is_still_built() {
    let flake = Flake::homelab();
    let roots = tempfile::tempdir().unwrap();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder(&format!("gc_roots_dir = \"{}\"", roots.path().display()))
    })
    .await;
    let client = nats.connect().await;
    client
        .publish("build.homelab.ns1", "".into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    let root = roots.path().join("homelab").join("ns1");
    wait_for("the GC root of ns1", WAIT, || root.exists()).await;
    let target = std::fs::canonicalize(&root).unwrap();
    assert!(target.starts_with("/nix/store"), "{}", target.display());
    assert!(store_file(target.to_str().unwrap()).starts_with("initial "));
}

#[tokio::test]
async fn gc_roots_keep_the_newest_generations_per_host() {
    let flake = Flake::homelab();
    let roots = tempfile::tempdir().unwrap();
    let (nats, _builder) = start_service(&flake, |o| {
        o.builder(&format!(
            "gc_roots_dir = \"{}\"\nkeep_roots = 2",
            roots.path().display()
        ))
    })
    .await;
    let client = Requester::new(&nats).await;
    let dir = roots.path().join("homelab");
    let generations = || {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(".gen"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ns1"))
            .collect();
        names.sort();
        names
    };
    let current = || std::fs::read_link(dir.join("ns1")).unwrap();

    let first = out_path(&client.build("build.homelab.ns1", "").await, "ns1");
    assert_eq!(generations(), ["ns1-1-link"]);
    assert_eq!(
        std::fs::canonicalize(dir.join("ns1")).unwrap().to_str(),
        Some(first.as_str())
    );
    // Building the same output again adds no generation.
    client.build("build.homelab.ns1", "").await;
    assert_eq!(generations(), ["ns1-1-link"]);

    flake.commit_change("second");
    client.build("build.homelab.ns1", "").await;
    assert_eq!(current().to_str(), Some(".gen/ns1-2-link"));
    flake.commit_change("third");
    let third = out_path(&client.build("build.homelab.ns1", "").await, "ns1");
    // keep_roots = 2: the first generation is gone.
    assert_eq!(generations(), ["ns1-2-link", "ns1-3-link"]);
    assert_eq!(current().to_str(), Some(".gen/ns1-3-link"));
    assert_eq!(
        std::fs::canonicalize(dir.join("ns1")).unwrap().to_str(),
        Some(third.as_str())
    );

    // Nix knows the generations as GC roots.
    let out = nix_command("nix-store")
        .args(["--gc", "--print-roots"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    let link = dir.join(".gen/ns1-3-link");
    assert!(
        listed.contains(&*link.to_string_lossy()),
        "{} not in\n{listed}",
        link.display()
    );
    assert!(!listed.contains(&*dir.join(".gen/ns1-1-link").to_string_lossy()));
}

#[tokio::test]
async fn sigterm_cancels_running_and_queued_builds_with_terminal_events() {
    let flake = Flake::new(&[("slow", Host::Gated), ("ns1", Host::Ok)]);
    let (nats, mut builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let (mut running, _) = client.send_until_started("build.homelab.slow").await;
    let mut queued = client.send("build.homelab.ns1", "").await;
    assert!(matches!(
        queued.next().await.reply.event,
        Event::Accepted {
            queue_position: 1,
            ..
        }
    ));

    let started = std::time::Instant::now();
    let status = builder.terminate().await;
    let took = started.elapsed();
    eprintln!(
        "shutdown with a running build took {:.2} s",
        took.as_secs_f64()
    );
    assert!(status.success(), "{status:?}");
    assert!(took < homelab_deploy::SHUTDOWN_BUDGET, "{took:?}");

    let rest: Vec<Reply> = untimed(running.until_terminal().await);
    assert_eq!(host_outcomes(&rest)[0].status, HostStatus::Cancelled);
    assert!(matches!(
        terminal(&rest),
        Event::Finished {
            status: BuildStatus::Cancelled,
            ..
        }
    ));
    let rest: Vec<Reply> = untimed(queued.until_terminal().await);
    assert_eq!(event_names(&rest), ["finished"]);
    assert!(matches!(
        terminal(&rest),
        Event::Finished {
            status: BuildStatus::Cancelled,
            ..
        }
    ));
    let gate = flake.gate().display().to_string();
    wait_for("the build to be gone", WAIT, || {
        processes_matching(&gate).is_empty()
    })
    .await;
    drop(nats);
}

#[tokio::test]
async fn the_event_stream_ends_with_the_terminal_event() {
    let flake = Flake::homelab();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;

    let mut first = client.send("build.homelab.all", "").await;
    let replies = first.until_terminal().await;
    assert_eq!(replies.iter().filter(|t| t.reply.is_terminal()).count(), 1);
    // A second request runs after the first; by the time it is answered,
    // any stray event for the first would have been delivered.
    let _ = client.build("build.homelab.ns1", "").await;
    assert!(
        first.try_next().is_none(),
        "an event followed the terminal one"
    );
}
