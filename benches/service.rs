//! `scripts/bench`: the builder against plain `nix build`, on an offline
//! flake of 16 hosts whose evaluation costs about a second each — half of it
//! shared by every host (like importing nixpkgs), half per host (like each
//! host's modules) — plus request latency and the builder's memory.
//!
//! Not a test: it prints numbers for docs/performance.md.
//!
//! Arguments name the parts to run (all by default): `compare` (the
//! builder against `nix build`), `latency` (request to `accepted` and
//! memory), `metrics` (`GET /metrics` at scale), e.g.
//! `cargo bench --bench service -- latency metrics`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::builder::{Builder, BuilderOptions};
use common::flake::{Flake, Host};
use common::nats::NatsServer;
use common::net::http_get;
use common::nix::{nix_command, nix_config, test_path};
use common::process::memory_kib;
use common::requester::Requester;
use common::wait::WAIT;
use homelab_deploy::protocol::{BuildStatus, Event, HostStatus, Reply};

const HOSTS: usize = 16;
/// Units of evaluation work (one unit is 1000 recursive calls) shared by all
/// hosts, and per host. Calibrated so each costs about half a second here.
const SHARED_WORK: usize = 1600;
const HOST_WORK: usize = 1600;
const LATENCY_REQUESTS: usize = 1000;

fn host_names() -> Vec<String> {
    (1..=HOSTS).map(|i| format!("host{i:02}")).collect()
}

/// The benchmark flake: every host evaluates `shared` (memoised within one
/// evaluator process) and its own work, and builds a few derivations that
/// share a base.
fn bench_flake_source(salt: &str, system: &str) -> String {
    let hosts = host_names()
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        r#"{{
  outputs = {{ self }}:
    let
      system = "{system}";
      salt = "{salt}";
      # Evaluation work that scales with n, standing in for a module system.
      burn = n:
        let f = k: if k == 0 then 0 else 1 + f (k - 1);
        in builtins.foldl' (acc: _: acc + f 1000) 0 (builtins.genList (x: x) n);
      shared = burn {SHARED_WORK};
      drv = name: script: deps: extra: derivation ({{
        inherit name system salt deps;
        builder = "/bin/sh";
        args = [ "-c" script ];
      }} // extra);
      base = drv "bench-base" "echo base > $out" [ ] {{ }};
      host = name: {{
        config.system.build.toplevel = drv "nixos-system-${{name}}"
          "echo ${{name}} $work > $out"
          [ base (drv "${{name}}-etc" "echo etc > $out" [ base ] {{ }}) ]
          {{ work = toString (shared + burn {HOST_WORK}); }};
      }};
    in {{
      nixosConfigurations = builtins.listToAttrs
        (map (name: {{ inherit name; value = host name; }}) [ {hosts} ]);
    }};
}}
"#
    )
}

fn nix(args: &[&str]) -> Command {
    let mut command = nix_command("nix");
    command
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(args);
    command
}

fn toplevel(flake: &Flake, host: &str) -> String {
    format!(
        "{}#nixosConfigurations.{host}.config.system.build.toplevel",
        flake.url()
    )
}

/// (b): a plain shell loop of `nix build`, one host after the other.
fn shell_loop(flake: &Flake) -> Duration {
    let hosts = host_names().join(" ");
    let script = format!(
        "for h in {hosts}; do nix --extra-experimental-features 'nix-command flakes' build --no-link '{url}#nixosConfigurations.'$h'.config.system.build.toplevel' || exit 1; done",
        url = flake.url()
    );
    let started = Instant::now();
    let status = Command::new("sh")
        .args(["-c", &script])
        .env("PATH", test_path())
        .env("NIX_CONFIG", nix_config())
        .status()
        .unwrap();
    assert!(status.success(), "the shell loop failed");
    started.elapsed()
}

/// (c): one `nix build --keep-going` of every host at once.
fn one_nix_build(flake: &Flake) -> Duration {
    let installables: Vec<String> = host_names().iter().map(|h| toplevel(flake, h)).collect();
    let mut args = vec!["build", "--no-link", "--keep-going"];
    args.extend(installables.iter().map(String::as_str));
    let started = Instant::now();
    let status = nix(&args).status().unwrap();
    assert!(status.success(), "nix build --keep-going failed");
    started.elapsed()
}

/// The out paths Nix itself computes for `flake`, to check the builder's.
fn expected_out_paths(flake: &Flake) -> Vec<String> {
    host_names()
        .iter()
        .map(|h| {
            let out = nix(&["eval", "--raw", &format!("{}.outPath", toplevel(flake, h))])
                .output()
                .unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap()
        })
        .collect()
}

/// (a): the builder's `all`; returns its wall time and per-host results.
async fn builder_all(
    client: &Requester,
    repo: &str,
) -> (Duration, Vec<(String, HostStatus, Option<String>)>) {
    let started = Instant::now();
    let replies = client.build(&format!("build.{repo}.all"), "").await;
    let elapsed = started.elapsed();
    let Event::Finished { status, hosts, .. } = &replies.last().unwrap().event else {
        panic!("no finished event: {replies:?}");
    };
    assert_eq!(*status, BuildStatus::Success, "{replies:?}");
    let results = hosts
        .iter()
        .map(|h| (h.host.clone(), h.status, h.out_path.clone()))
        .collect();
    (elapsed, results)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // 0 <= p <= 1: the index is within the slice.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// (a), (b) and (c) on fresh store paths, then again already built; each
/// on its own copy of the flake.
async fn compare(client: &Requester, [flake_a, flake_b, flake_c]: [&Flake; 3]) {
    println!("\nfresh store paths:");
    let (fresh_a, results) = builder_all(client, "bench").await;
    println!("  (a) builder, target all              {}", secs(fresh_a));
    let fresh_b = shell_loop(flake_b);
    println!("  (b) shell loop of nix build          {}", secs(fresh_b));
    let fresh_c = one_nix_build(flake_c);
    println!("  (c) one nix build --keep-going       {}", secs(fresh_c));
    println!(
        "  a/b = {:.2}",
        fresh_a.as_secs_f64() / fresh_b.as_secs_f64()
    );

    let expected = expected_out_paths(flake_a);
    let identical = results.len() == HOSTS
        && results
            .iter()
            .zip(&expected)
            .all(|((_, status, out), want)| {
                *status == HostStatus::Success && out.as_deref() == Some(want.as_str())
            });
    println!(
        "  builder's per-host results identical to Nix's own: {}",
        if identical { "yes" } else { "NO" }
    );

    println!("\nalready built, unchanged flake:");
    let (cached_a, _) = builder_all(client, "bench").await;
    println!("  (a) builder, target all              {}", secs(cached_a));
    let cached_b = shell_loop(flake_b);
    println!("  (b) shell loop of nix build          {}", secs(cached_b));
    let cached_c = one_nix_build(flake_c);
    println!("  (c) one nix build --keep-going       {}", secs(cached_c));
    println!(
        "  a/b = {:.2}",
        cached_a.as_secs_f64() / cached_b.as_secs_f64()
    );
}

/// Request to `accepted` while a build runs: one request at a time, from
/// publishing it to receiving `accepted`, on a connection already
/// subscribed to the replies (so the client's own subscribe and flush are
/// not counted).
async fn accept_latency(client: &Requester, nats_url: String) {
    let mut running = client.send("build.gate.gated", "").await;
    running
        .until(|e| matches!(e, Event::HostStarted { .. }))
        .await;
    // The measuring client has a runtime of one thread to itself: a reply
    // reaches the loop without waking another thread, so less of the
    // client's own scheduling is counted.
    let (accepts, echoes) = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let accepts = runtime.block_on(time_accepts(&nats_url));
        let echoes = runtime.block_on(time_echoes(&nats_url));
        (accepts, echoes)
    })
    .await
    .unwrap();
    println!(
        "\nrequest to accepted while a build runs ({LATENCY_REQUESTS} requests, one at a time):"
    );
    print_latencies(accepts);
    println!("  the same round trip to a responder that only echoes, right after:");
    print_latencies(echoes);
}

fn print_latencies(mut latencies: Vec<Duration>) {
    latencies.sort();
    let ms = |p| percentile(&latencies, p).as_secs_f64() * 1e3;
    println!(
        "  p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(0.50),
        ms(0.90),
        ms(0.99),
        ms(1.0)
    );
}

/// The floor under the builder's latency on this machine as loaded now:
/// the same publish and reply through nats-server, answered at once by a
/// responder on a thread and connection of its own.
async fn time_echoes(nats_url: &str) -> Vec<Duration> {
    let (ready, subscribed) = tokio::sync::oneshot::channel();
    let url = nats_url.to_owned();
    let echo = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let responder = async_nats::connect(url).await.unwrap();
                let mut requests = responder.subscribe("bench.echo").await.unwrap();
                responder.flush().await.unwrap();
                ready.send(()).unwrap();
                let accepted = vec![b'x'; 300];
                for _ in 0..LATENCY_REQUESTS {
                    let request = futures_util::StreamExt::next(&mut requests).await.unwrap();
                    let reply = request.reply.unwrap();
                    responder
                        .publish(reply, accepted.clone().into())
                        .await
                        .unwrap();
                }
                responder.flush().await.unwrap();
            });
    });
    subscribed.await.unwrap();
    let nats = async_nats::connect(nats_url).await.unwrap();
    let mut replies = nats.subscribe("bench.echoed.*").await.unwrap();
    nats.flush().await.unwrap();
    let mut latencies = Vec::with_capacity(LATENCY_REQUESTS);
    for i in 0..LATENCY_REQUESTS {
        let started = Instant::now();
        nats.publish_with_reply("bench.echo", format!("bench.echoed.{i}"), "".into())
            .await
            .unwrap();
        tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut replies))
            .await
            .unwrap()
            .unwrap();
        latencies.push(started.elapsed());
    }
    echo.join().unwrap();
    latencies
}

/// Sends [`LATENCY_REQUESTS`] build requests one after the other from a
/// connection of its own; the time from each publish to its `accepted`.
async fn time_accepts(nats_url: &str) -> Vec<Duration> {
    let nats = async_nats::connect(nats_url).await.unwrap();
    let mut replies = nats.subscribe("build.responses.bench.*").await.unwrap();
    nats.flush().await.unwrap();
    let mut latencies = Vec::with_capacity(LATENCY_REQUESTS);
    for i in 0..LATENCY_REQUESTS {
        let reply_to = format!("build.responses.bench.{i}");
        let started = Instant::now();
        nats.publish_with_reply("build.gate.noop", reply_to, "".into())
            .await
            .unwrap();
        let message = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut replies))
            .await
            .unwrap()
            .unwrap();
        latencies.push(started.elapsed());
        let first: Reply = serde_json::from_slice(&message.payload).unwrap();
        assert!(matches!(first.event, Event::Accepted { .. }), "{first:?}");
    }
    latencies
}

/// The builder's resident memory, in KiB: idle, after the `all` builds,
/// with the latency requests queued.
fn print_memory(idle_rss: u64, build_peak: u64, peak_rss: u64) {
    println!("\nbuilder memory:");
    println!(
        "  idle RSS                             {:.1} MB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  peak RSS during the all builds       {:.1} MB",
        build_peak as f64 / 1024.0
    );
    println!(
        "  peak RSS after {LATENCY_REQUESTS} queued requests  {:.1} MB",
        peak_rss as f64 / 1024.0
    );
}

/// Whether the command line asks for `part` (no parts named: all of them).
fn runs(part: &str) -> bool {
    // Cargo passes `--bench` to a benchmark without a harness.
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    named.is_empty() || named.iter().any(|a| a == part)
}

#[tokio::main]
async fn main() {
    let nix_version = String::from_utf8(nix(&["--version"]).output().unwrap().stdout).unwrap();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "homelab-deploy benchmark: {HOSTS} hosts, {cpus} CPUs, {}",
        nix_version.trim()
    );

    let flake_a = Flake::with_source(bench_flake_source);
    let flake_b = Flake::with_source(bench_flake_source);
    let flake_c = Flake::with_source(bench_flake_source);
    let gate = Flake::new(&[("gated", Host::Gated), ("noop", Host::Ok)]);

    let nats = NatsServer::start().await;
    // GC roots on, as in production: each result is rooted, and compared
    // with the host's previous one.
    let roots = tempfile::tempdir().unwrap();
    let mut options = BuilderOptions::new(&flake_a)
        .host_timeout("10m")
        // Every latency request is one more unsigned request waiting.
        .builder(&format!(
            "queue_limit = {0}\nqueue_per_owner = {0}",
            LATENCY_REQUESTS + 10
        ))
        .builder(&format!("gc_roots_dir = \"{}\"", roots.path().display()));
    options.repos = vec![
        ("bench".into(), flake_a.url(), None),
        ("gate".into(), gate.url(), None),
    ];
    let mut builder = Builder::start(&nats, &options).await;
    let pid = builder.pid();
    let client = Requester::new(&nats).await;

    // Let the process settle before reading its idle footprint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = memory_kib(pid, "VmRSS:");

    if runs("compare") {
        compare(&client, [&flake_a, &flake_b, &flake_c]).await;
    }
    let build_peak = memory_kib(pid, "VmHWM:");

    if runs("latency") {
        accept_latency(&client, nats.url()).await;
    }
    let peak_rss = memory_kib(pid, "VmHWM:");

    if runs("compare") || runs("latency") {
        print_memory(idle_rss, build_peak, peak_rss);
    }

    // Cancels the gated build and the queued ones.
    let status = builder.terminate().await;
    assert!(status.success());
    gate.open_gate();

    if runs("metrics") {
        metrics_with_many_series(&nats).await;
    }
}

const METRIC_REPOS: usize = 50;
const METRIC_HOSTS: usize = 20;
const SCRAPES: usize = 200;

/// The metrics endpoint and the builder's memory once 50 repos × 20 hosts
/// have per-host series.
async fn metrics_with_many_series(nats: &NatsServer) {
    let hosts: Vec<(String, Host)> = (1..=METRIC_HOSTS)
        .map(|i| (format!("h{i:02}"), Host::Ok))
        .collect();
    let hosts: Vec<(&str, Host)> = hosts.iter().map(|(n, h)| (n.as_str(), h.clone())).collect();
    let flake = Flake::new(&hosts);
    let mut options = BuilderOptions::new(&flake).builder("queue_limit = 100");
    options.repos = (1..=METRIC_REPOS)
        .map(|i| (format!("repo{i:02}"), flake.url(), None))
        .collect();
    let mut builder = Builder::start(nats, &options).await;
    let client = Requester::new(nats).await;
    for i in 1..=METRIC_REPOS {
        let replies = client.build(&format!("build.repo{i:02}.all"), "").await;
        let last = &replies.last().unwrap().event;
        assert!(
            matches!(
                last,
                Event::Finished {
                    status: BuildStatus::Success,
                    ..
                }
            ),
            "repo{i:02}: {last:?}"
        );
    }
    let addr = builder.metrics_addr().await;
    let mut times = Vec::with_capacity(SCRAPES);
    let mut size = 0;
    for _ in 0..SCRAPES {
        let started = Instant::now();
        let (status, body) = http_get(&addr, "/metrics").await;
        times.push(started.elapsed());
        assert_eq!(status, 200);
        size = body.len();
        let series = body
            .lines()
            .filter(|l| l.starts_with("homelab_deploy_builder_host_builds_total{"))
            .count();
        assert_eq!(series, METRIC_REPOS * METRIC_HOSTS);
    }
    times.sort();
    let pid = builder.pid();
    println!(
        "\nmetrics with {METRIC_REPOS} repos x {METRIC_HOSTS} hosts of series ({} KiB per scrape):",
        size / 1024
    );
    println!(
        "  GET /metrics p50 {:.2} ms, p99 {:.2} ms ({SCRAPES} scrapes)",
        percentile(&times, 0.50).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  builder RSS {:.1} MB (peak {:.1} MB)",
        memory_kib(pid, "VmRSS:") as f64 / 1024.0,
        memory_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    assert!(builder.terminate().await.success());
}
