//! What an attacker with request rights, or on the network, cannot get at or
//! break: credentials in repo URLs never leave the builder, and idle metrics
//! connections can neither take the file descriptors builds need nor keep
//! scrapes out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::builder::{Builder, BuilderOptions, start_service};
use common::cli::{describe, run_cli};
use common::flake::{Flake, GitOverHttp, Host};
use common::nats::NatsServer;
use common::net::http_get;
use common::replies::{Finished, finished};
use common::requester::Requester;
use common::wait::{WAIT, poll, wait_for};
use common::web::{EventFeed, get_json};
use futures_util::StreamExt;
use homelab_deploy::protocol::{BuildStatus, random_hex};

/// Every message on every subject, as text: subject, reply subject, payload.
async fn spy_on_everything(nats: &NatsServer) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let client = nats.connect().await;
    let mut all = client.subscribe(">").await.unwrap();
    client.flush().await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn({
        let seen = Arc::clone(&seen);
        async move {
            while let Some(message) = all.next().await {
                let text = format!(
                    "{} {} {}",
                    message.subject,
                    message.reply.as_deref().unwrap_or("-"),
                    String::from_utf8_lossy(&message.payload)
                );
                seen.lock().unwrap().push(text);
            }
        }
    });
    (client, seen)
}

#[tokio::test]
async fn a_token_in_an_http_repo_url_appears_nowhere_the_builder_sends_logs_or_serves() {
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    // A ref whose flake has no nixosConfigurations: Nix's error quotes the
    // whole URL, token included.
    let no_hosts =
        Flake::with_source(|_, _| "{ outputs = { self }: { packages = { }; }; }\n".into());
    let http = GitOverHttp::serve(&flake).await;
    http.push_branch(&no_hosts, "no-hosts");
    let token = format!("glpat{}", random_hex::<10>());

    let nats = NatsServer::start().await;
    let (spy, seen) = spy_on_everything(&nats).await;
    let history = tempfile::tempdir().unwrap();
    let mut options = BuilderOptions::new(&flake)
        .web("enabled = true")
        .builder(&format!(
            "history_db = \"{}\"",
            history.path().join("history.sqlite").display()
        ));
    options.repos = vec![(
        "homelab".into(),
        http.url(Some(&format!("oauth2:{token}"))),
        None,
    )];
    let mut builder = Builder::start(&nats, &options).await;
    let metrics_addr = builder.metrics_addr().await;
    let mut feed = EventFeed::open(&metrics_addr).await;
    let requester = Requester::new(&nats).await;

    let replies = requester
        .build("build.homelab.all", r#"{"ref":"no-hosts","logs":true}"#)
        .await;
    let Finished {
        status, message, ..
    } = finished(&replies);
    let message = message.unwrap_or_default();
    assert_eq!(status, BuildStatus::Failed, "{replies:?}");
    // The URL is still there for the reader, its userinfo masked.
    let masked = format!("http://***@127.0.0.1:{}/repo.git", http.port);
    assert!(message.contains(&masked), "{message}");

    let replies = requester
        .build(
            "build.homelab.all",
            r#"{"ref":"no-such-branch","logs":true}"#,
        )
        .await;
    assert_eq!(
        finished(&replies).status,
        BuildStatus::Failed,
        "{replies:?}"
    );

    let replies = requester
        .build("build.homelab.all", r#"{"logs":true}"#)
        .await;
    assert_eq!(
        finished(&replies).status,
        BuildStatus::Success,
        "{replies:?}"
    );

    let status = run_cli(&nats.url(), &["status", "--json"]).await;
    assert!(status.status.success(), "{}", describe(&status));
    let (code, metrics) = http_get(&metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    // Every page and answer of the web side, with the failed builds in.
    let builds = get_json(&metrics_addr, "/api/v1/builds").await;
    let ids: Vec<String> = builds
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["build_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3, "{builds}");
    let mut web = vec![builds.to_string()];
    let mut paths = vec![
        "/".to_owned(),
        "/api/v1/status".to_owned(),
        "/hosts/homelab/ns1".to_owned(),
        "/api/v1/hosts/homelab/ns1".to_owned(),
        "/badge/homelab.svg".to_owned(),
        "/badge/homelab/ns1.svg".to_owned(),
    ];
    for id in &ids {
        paths.push(format!("/builds/{id}"));
        paths.push(format!("/api/v1/builds/{id}"));
    }
    for path in &paths {
        let (code, body) = http_get(&metrics_addr, path).await;
        assert_eq!(code, 200, "{path}: {body}");
        web.push(body);
    }
    assert!(
        web.iter().any(|body| body.contains(&masked)),
        "the failed fetch's error is on no page"
    );
    let streamed = feed
        .next_matching(WAIT, |reply| reply["event"] == "finished")
        .await;
    let streamed = format!("{:?}{}", streamed.reply, feed.raw.lock().unwrap());

    // Everything on the wire so far has reached the spy once its own
    // message, published last, has.
    spy.publish("security.sentinel", "end".into())
        .await
        .unwrap();
    spy.flush().await.unwrap();
    wait_for("the spy to see everything", WAIT, || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|m| m.starts_with("security.sentinel"))
    })
    .await;
    builder.terminate().await;
    let log = builder.log_text();

    let messages = seen.lock().unwrap().clone();
    assert!(
        messages.iter().any(|m| m.contains(&masked)),
        "the finished error never went out on NATS"
    );
    for message in &messages {
        assert!(!message.contains(&token), "sent on NATS: {message}");
    }
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(!status.contains(&token), "in build.status: {status}");
    assert!(!metrics.contains(&token), "in /metrics: {metrics}");
    for (path, body) in paths.iter().zip(&web[1..]) {
        assert!(!body.contains(&token), "in {path}: {body}");
    }
    assert!(!web[0].contains(&token), "in /api/v1/builds: {}", web[0]);
    assert!(!streamed.contains(&token), "in /api/v1/events: {streamed}");
    assert!(!log.contains(&token), "in the builder's log:\n{log}");
    assert!(
        log.contains(&masked),
        "the log never mentioned the repo:\n{log}"
    );
}

/// The builder's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

/// Connections waiting to be accepted on the loopback listener at `port`
/// (a listening socket's `rx_queue` in /proc/net/tcp).
fn accept_backlog(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let listening = fields.get(3) == Some(&"0A");
        if fields.get(1) != Some(&local.as_str()) || !listening {
            return None;
        }
        let (_, rx) = fields.get(4)?.split_once(':')?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// A connection to `addr` from the loopback address `source` (any of
/// 127.0.0.0/8 binds on Linux), given up after 2 s.
async fn connect_from(source: Ipv4Addr, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    tokio::time::timeout(Duration::from_secs(2), socket.connect(addr))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// `GET path` returning the status code, or `None` if the server closed
/// the connection or did not answer within 2 s.
async fn try_get(addr: &str, path: &str) -> Option<u16> {
    try_get_from(Ipv4Addr::LOCALHOST, addr, path).await
}

/// [`try_get`] from the loopback address `source`.
async fn try_get_from(source: Ipv4Addr, addr: &str, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = connect_from(source, addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response).into_owned();
        response.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

const FD_LIMIT: u64 = 1024;

/// Sets the running process's descriptor limit: `soft`, and 1024 hard.
fn set_fd_limit(pid: u32, soft: u64) {
    let limit = format!("--nofile={soft}:{FD_LIMIT}");
    let set = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .status()
        .expect("prlimit (util-linux) is needed");
    assert!(set.success(), "prlimit {limit} failed");
}
const IDLE_CONNECTIONS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_metrics_connections_cannot_starve_builds_under_a_1024_fd_limit() {
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (nats, mut builder) = start_service(&flake, |options| options).await;
    let addr = builder.metrics_addr().await;
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let pid = builder.pid();

    // The builder gets the limit many systems default to.
    set_fd_limit(pid, FD_LIMIT);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().filter(|w| *w == "1024").count() == 2),
        "{limits}"
    );
    // The test itself needs room for its side of every connection.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    let wanted = (IDLE_CONNECTIONS as u64 + 512).min(hard);
    assert!(
        wanted > IDLE_CONNECTIONS as u64,
        "the test's own fd limit ({hard}) is too low"
    );
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(wanted),
            maximum: Some(hard),
        },
    )
    .unwrap();

    // Open them all at once, each attempt bounded, from 250 addresses (8
    // each, what one source may hold): the bound on all connections is
    // tested, not the one per source.
    let attempts = (0..IDLE_CONNECTIONS).map(|i| {
        let last = u8::try_from(i % 250).unwrap() + 1;
        connect_from(Ipv4Addr::new(127, 0, 1, last), &addr)
    });
    let idle: Vec<_> = futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    assert!(
        idle.len() as u64 > FD_LIMIT,
        "only {} connections opened: not enough to exhaust the limit",
        idle.len()
    );
    // The builder has taken every one of them off its accept queue.
    wait_for(
        "the builder to accept every connection",
        Duration::from_secs(10),
        || accept_backlog(port) == Some(0),
    )
    .await;
    let fds_flooded = open_fds(pid);
    assert!(
        (fds_flooded as u64) < FD_LIMIT / 2,
        "the builder holds {fds_flooded} fds under the flood"
    );

    let requester = Requester::new(&nats).await;
    let replies = requester.build("build.homelab.all", "").await;
    let Finished {
        status, message, ..
    } = finished(&replies);
    assert_eq!(
        (status, message.unwrap_or_default()),
        (BuildStatus::Success, String::new()),
        "{replies:?}\n{}",
        builder.log_text()
    );

    drop(idle);
    poll(
        "/metrics to answer after the idle connections are gone",
        async || try_get(&addr, "/metrics").await,
        |code| *code == Some(200),
    )
    .await;
    let log = builder.log_text();
    assert!(!log.contains("Too many open files"), "{log}");
    eprintln!(
        "{} idle connections opened; builder fds under the flood: {fds_flooded}",
        IDLE_CONNECTIONS
    );
}

/// When the builder runs out of file descriptors, the metrics server pauses
/// between failed accepts (100 ms, doubling) instead of spinning, and serves
/// again once descriptors are free.
#[tokio::test]
async fn failed_accepts_back_off_and_the_server_recovers() {
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (_nats, mut builder) = start_service(&flake, |options| options).await;
    let addr = builder.metrics_addr().await;
    let pid = builder.pid();
    // Only stdin, stdout and stderr fit: every accept fails with EMFILE.
    set_fd_limit(pid, 3);
    let _waiting = tokio::net::TcpStream::connect(&addr).await.unwrap();
    const FAILURES: usize = 4;
    let failures = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|line| line.contains("cannot accept a connection"))
            .map(str::to_owned)
            .collect()
    };
    wait_for("failed accepts", WAIT, || {
        failures(&builder.log_text()).len() >= FAILURES
    })
    .await;
    let failed = failures(&builder.log_text());
    let at =
        |line: &str| humantime::parse_rfc3339(line.split_whitespace().next().unwrap()).unwrap();
    let span = at(&failed[FAILURES - 1])
        .duration_since(at(&failed[0]))
        .unwrap();
    // Pauses of 100, 200 and 400 ms lie between the first and the fourth.
    assert!(
        span >= Duration::from_millis(650),
        "{FAILURES} failed accepts within {span:?}: it spins\n{}",
        failed.join("\n")
    );

    set_fd_limit(pid, FD_LIMIT);
    poll(
        "/metrics to answer with descriptors free again",
        async || try_get(&addr, "/metrics").await,
        |code| *code == Some(200),
    )
    .await;
}

/// Connections the attacker holds: every slot of the metrics server.
const HELD: usize = 64;
/// Scrapes at 1/s while they are held.
const SCRAPES: usize = 20;

/// Holds a connection to `addr` from `source` without sending anything and
/// opens a new one as soon as the server closes it, until `stop`, the
/// `until` deadline or 2000 connections; returns how many it opened.
async fn hold_open(
    source: Ipv4Addr,
    addr: String,
    open: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
    until: tokio::time::Instant,
) -> usize {
    use tokio::io::AsyncReadExt;
    let mut opened = 0;
    while opened < 2000 && !stop.is_cancelled() && tokio::time::Instant::now() < until {
        opened += 1;
        let Ok(mut stream) = connect_from(source, &addr).await else {
            continue;
        };
        open.fetch_add(1, Ordering::SeqCst);
        let mut buffer = [0; 256];
        let closed = async { while let Ok(1..) = stream.read(&mut buffer).await {} };
        tokio::select! {
            () = closed => {}
            () = stop.cancelled() => {}
            () = tokio::time::sleep_until(until) => {}
        }
        open.fetch_sub(1, Ordering::SeqCst);
    }
    opened
}

/// An attacker holds all 64 metrics connections without sending anything,
/// from 8 addresses (8 each, the most one source may hold), and reopens each
/// as soon as the server closes it; a scraper on another address still gets
/// its 1/s scrapes answered, because a new connection takes the slot of the
/// one that has waited longest without a request head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_get_through_while_an_attacker_holds_and_reopens_every_metrics_connection() {
    let flake = Flake::new(&[("ns1", Host::Ok)]);
    let (_nats, mut builder) = start_service(&flake, |options| options).await;
    let addr = builder.metrics_addr().await;
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();

    let stop = tokio_util::sync::CancellationToken::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(40);
    let open = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..HELD)
        .map(|i| {
            let source = Ipv4Addr::new(127, 0, 0, 10 + u8::try_from(i % 8).unwrap());
            tokio::spawn(hold_open(
                source,
                addr.clone(),
                Arc::clone(&open),
                stop.clone(),
                until,
            ))
        })
        .collect();
    wait_for(
        "the attacker to hold every connection",
        Duration::from_secs(10),
        || open.load(Ordering::SeqCst) == HELD && accept_backlog(port) == Some(0),
    )
    .await;

    let scraper = Ipv4Addr::new(127, 0, 0, 2);
    let mut cadence = tokio::time::interval(Duration::from_secs(1));
    let mut answered = 0;
    for _ in 0..SCRAPES {
        cadence.tick().await;
        if try_get_from(scraper, &addr, "/metrics").await == Some(200) {
            answered += 1;
        }
    }
    cadence.tick().await;
    let health = try_get_from(scraper, &addr, "/healthz").await;
    let still_held = open.load(Ordering::SeqCst);

    stop.cancel();
    let mut opened = 0;
    for attacker in attackers {
        opened += attacker.await.unwrap();
    }
    eprintln!(
        "{answered} of {SCRAPES} scrapes answered; the attacker opened {opened} connections, \
         {still_held} open at the end"
    );
    assert!(
        opened >= 2 * HELD,
        "the attacker never had to reopen its connections ({opened} opened)"
    );
    assert!(
        answered * 100 >= SCRAPES * 95,
        "only {answered} of {SCRAPES} scrapes answered\n{}",
        builder.log_text()
    );
    assert_eq!(health, Some(200), "/healthz under the attack");
}
