//! Results that say what really happened: hosts `all` cannot build, an
//! empty host list, a flake whose content changes without a new commit,
//! tags fetched over HTTP, and a cancel that comes too late.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::builder::start_service;
use common::flake::{Flake, GitOverHttp, Host};
use common::replies::{event_names, finished, host_outcomes, terminal};
use common::requester::Requester;
use common::wait::WAIT;
use homelab_deploy::protocol::{
    BuildStatus, CancelEvent, CancelledState, ErrorCode, Event, HostStatus, Reply,
};

fn started_rev(replies: &[Reply]) -> Option<String> {
    replies.iter().find_map(|r| match &r.event {
        Event::Started { rev, .. } => rev.clone(),
        _ => None,
    })
}

fn out_path(replies: &[Reply]) -> String {
    let outcomes = host_outcomes(replies);
    assert_eq!(outcomes.len(), 1, "{replies:?}");
    assert_eq!(
        outcomes[0].status,
        HostStatus::Success,
        "{}",
        outcomes[0].message
    );
    outcomes[0].out_path.clone().unwrap()
}

/// A flake with a host whose attribute name has a dot, beside a plain one.
fn dotted_flake() -> Flake {
    Flake::with_attribute_names(&["ns1", r#""nix-cache02.home""#])
}

#[tokio::test]
async fn hosts_all_cannot_build_are_listed_and_fail_the_request() {
    let flake = dotted_flake();
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;

    let started = replies
        .iter()
        .find_map(|r| match &r.event {
            Event::Started { hosts, skipped, .. } => Some((hosts.clone(), skipped.clone())),
            _ => None,
        })
        .expect("no started");
    assert_eq!(started.0, ["ns1"]);
    assert_eq!(started.1.len(), 1);
    assert_eq!(started.1[0].host, "nix-cache02.home");
    assert!(
        started.1[0].reason.contains("[A-Za-z0-9_-]"),
        "{:?}",
        started.1
    );
    // ns1 still builds; the request fails because of the skipped host.
    out_path(&replies);
    assert_eq!(
        finished(&replies).status_and_code(),
        (BuildStatus::Failed, Some(ErrorCode::HostsSkipped))
    );
    match terminal(&replies) {
        Event::Finished {
            skipped,
            succeeded,
            failed,
            ..
        } => {
            assert_eq!(skipped.len(), 1);
            assert_eq!((*succeeded, *failed), (1, 1));
        }
        _ => unreachable!(),
    }

    // Excluding it by its attribute name makes `all` whole again.
    let (nats, _builder) =
        start_service(&flake, |o| o.repo(r#"exclude = ["nix-cache02.home"]"#)).await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    assert_eq!(
        finished(&replies).status_and_code(),
        (BuildStatus::Success, None)
    );
}

#[tokio::test]
async fn an_empty_host_list_fails_with_its_own_code() {
    let empty = Flake::with_source(|_, _| {
        "{ outputs = { self }: { nixosConfigurations = { }; }; }\n".to_owned()
    });
    let (nats, _builder) = start_service(&empty, |o| o).await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    assert_eq!(event_names(&replies), ["accepted", "finished"]);
    assert_eq!(
        finished(&replies).status_and_code(),
        (BuildStatus::Failed, Some(ErrorCode::NoHosts))
    );

    // An exclude that covers every host is no better.
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| o.repo(r#"exclude = ["ns1"]"#)).await;
    let client = Requester::new(&nats).await;
    let replies = client.build("build.homelab.all", "").await;
    assert_eq!(
        finished(&replies).status_and_code(),
        (BuildStatus::Failed, Some(ErrorCode::NoHosts))
    );
    let Event::Finished { error, .. } = terminal(&replies) else {
        unreachable!()
    };
    assert!(
        error.as_ref().unwrap().message.contains("exclude"),
        "{error:?}"
    );
}

#[tokio::test]
async fn changed_content_of_an_unlocked_flake_is_rebuilt() {
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    let clean = out_path(&client.build("build.homelab.ns1", "").await);

    // A dirty work tree has no rev, so its locked URL never changes.
    let mut seen = vec![clean];
    for marker in ["dirty one", "dirty two"] {
        flake.change_uncommitted(marker);
        let replies = client.build("build.homelab.ns1", "").await;
        assert_eq!(started_rev(&replies), None);
        let out = out_path(&replies);
        assert!(!seen.contains(&out), "{marker}: an old output was reported");
        let content = std::fs::read_to_string(&out).unwrap();
        assert!(content.starts_with(marker), "{marker}: built {content:?}");
        seen.push(out);
    }
}

#[tokio::test]
async fn a_tag_builds_from_a_repository_fetched_over_http() {
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    flake.tag("v1.0");
    let tagged = flake.head();
    let head = flake.commit_change("after the tag");
    let server = GitOverHttp::serve(&flake).await;
    let (nats, _builder) = start_service(&flake, |mut o| {
        o.repos[0].1 = server.url(None);
        o
    })
    .await;
    let client = Requester::new(&nats).await;

    let replies = client
        .build("build.homelab.ns1", r#"{"ref": "v1.0"}"#)
        .await;
    assert_eq!(
        finished(&replies).status_and_code(),
        (BuildStatus::Success, None)
    );
    assert_eq!(started_rev(&replies).as_deref(), Some(tagged.as_str()));
    let content = std::fs::read_to_string(out_path(&replies)).unwrap();
    assert!(content.starts_with("initial"), "{content:?}");

    // A tag and the rev it points at, and a branch, all as documented.
    let body = format!(r#"{{"ref": "v1.0", "rev": "{tagged}"}}"#);
    let replies = client.build("build.homelab.ns1", &body).await;
    assert_eq!(started_rev(&replies).as_deref(), Some(tagged.as_str()));
    let replies = client
        .build("build.homelab.ns1", r#"{"ref": "master"}"#)
        .await;
    assert_eq!(started_rev(&replies).as_deref(), Some(head.as_str()));
    // Neither a branch nor a tag: the fetch fails.
    let replies = client
        .build("build.homelab.ns1", r#"{"ref": "nope"}"#)
        .await;
    assert_eq!(
        finished(&replies).status_and_code(),
        (BuildStatus::Failed, Some(ErrorCode::FetchFailed))
    );
}

#[tokio::test]
async fn a_cancel_after_the_last_host_is_answered_truthfully() {
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (nats, _builder) = start_service(&flake, |o| o).await;
    let client = Requester::new(&nats).await;
    for _ in 0..3 {
        let mut pending = client.send("build.homelab.ns1", "").await;
        let mut replies: Vec<Reply> = pending
            .until(|e| matches!(e, Event::HostFinished { .. }))
            .await
            .into_iter()
            .map(|t| t.reply)
            .collect();
        let build_id = replies[0].build_id.clone();
        let mut cancel = client
            .send("build.cancel", &format!(r#"{{"build_id": "{build_id}"}}"#))
            .await;
        replies.extend(pending.until_terminal().await.into_iter().map(|t| t.reply));
        let (status, code) = finished(&replies).status_and_code();
        // A builder that no longer has the build stays silent (another
        // builder may have it); one that has it answers.
        let patience = match status {
            BuildStatus::Cancelled => WAIT,
            _ => Duration::from_millis(500),
        };
        let answer = tokio::time::timeout(
            patience,
            futures_util::StreamExt::next(&mut cancel.subscriber),
        )
        .await
        .ok()
        .flatten()
        .map(|message| {
            let CancelEvent::Cancel(outcome) = serde_json::from_slice(&message.payload).unwrap();
            (outcome.found, outcome.state, outcome.error.map(|e| e.code))
        });
        match answer {
            // Every host was done: too late (or already over), and the
            // build says success.
            // Not the owner's nor an admin's cancel (the build is
            // unsigned) while it still built: refused, and it goes on.
            Some((false, Some(CancelledState::Finishing), None))
            | Some((false, None, Some(ErrorCode::Forbidden)))
            | None => {
                assert_eq!((status, code), (BuildStatus::Success, None));
            }
            // Told it was cancelled: then it ends cancelled.
            Some((true, Some(CancelledState::Running), None)) => {
                assert_eq!(
                    (status, code),
                    (BuildStatus::Cancelled, Some(ErrorCode::Cancelled))
                );
            }
            other => panic!("unexpected cancel outcome {other:?} with {status}"),
        }
    }
}
