//! `scripts/bench`: the evaluators' memory under `[builder]
//! eval_memory_budget`, on an offline flake of 12 hosts whose evaluations
//! reach from ~300 MB to ~1.2 GB each, on top of a part every host shares
//! (like nixpkgs) that stays alive for the whole evaluation.
//!
//! Runs `all` with 2 evaluators (a) with no budget to speak of, (b) with a
//! budget of 60 % of (a)'s peak, (c) with that budget and one host larger
//! than all of it, and (d) as (b) on a new commit that evaluates the same.
//! A sampler sums the resident memory of every evaluator process the
//! builder started, every 50 ms.
//!
//! Not a test: it prints numbers for docs/performance.md, and whether the
//! budget holds what it promises.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::builder::{Builder, BuilderOptions};
use common::cli::BIN;
use common::flake::Flake;
use common::nats::NatsServer;
use common::net::http_get;
use common::nix::{nix_command, test_path};
use common::process::child_pids;
use common::requester::Requester;
use common::wait::WAIT;

const WORKERS: usize = 2;
/// Each host and the megabytes its own evaluation allocates, nominally
/// (Boehm's heap grows in steps; the peaks measured are printed), ordered
/// so that the two largest land in different evaluators (hosts are dealt
/// to them round-robin in name order).
const HOSTS: [(&str, u64); 12] = [
    ("host01", 300),
    ("host02", 200),
    ("host03", 450),
    ("host04", 350),
    ("host05", 650),
    ("host06", 550),
    ("host07", 900),
    ("host08", 800),
    ("host09", 1250),
    ("host10", 1150),
    ("host11", 250),
    ("host12", 400),
];
/// The host of run (c) that no budget of this benchmark can hold.
const OVERSIZED: &str = "oversized";
/// List elements per megabyte of evaluator memory: measured on Nix 2.8 and
/// 2.26 (`toString` of a list of integers), about 125 MB per million.
const ELEMENTS_PER_MB: u64 = 8000;
/// Attributes of the part every host shares: about 100 MB, alive as long
/// as the evaluator.
const SHARED_ATTRS: u64 = 200_000;
/// Budget of runs (b) to (d), as a share of (a)'s peak.
const BUDGET_SHARE: f64 = 0.6;
/// What run (a) sets, when the builder knows the key: no limit in practice.
const UNLIMITED: &str = "1TiB";
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
const RESTARTS: &str = "homelab_deploy_builder_eval_restarts_total";
const BUDGET_GAUGE: &str = "homelab_deploy_builder_eval_memory_budget_bytes";
const RESERVED_GAUGE: &str = "homelab_deploy_builder_eval_memory_reserved_bytes";

/// The benchmark flake with `hosts` (name, megabytes of its own).
fn flake_source(hosts: &[(String, u64)], salt: &str, system: &str) -> String {
    let hosts: String = hosts
        .iter()
        .map(|(name, mb)| format!("        {name} = {};\n", mb * ELEMENTS_PER_MB))
        .collect();
    format!(
        r#"{{
  outputs = {{ self }}:
    let
      system = "{system}";
      salt = "{salt}";
      # Forced by every host and kept by the evaluator, like nixpkgs.
      shared = builtins.listToAttrs (builtins.genList
        (i: {{ name = "k${{toString i}}"; value = i; }}) {SHARED_ATTRS});
      # A host's own evaluation: n integers as one string, garbage once
      # the host is evaluated.
      own = n: builtins.stringLength (toString (builtins.genList (x: x) n));
      host = name: n: {{
        config.system.build.toplevel = derivation {{
          name = "nixos-system-${{name}}";
          inherit system salt;
          builder = "/bin/sh";
          args = [ "-c" "echo $work > $out" ];
          work = toString (own n + shared.k1);
        }};
      }};
    in {{
      nixosConfigurations = builtins.mapAttrs host {{
{hosts}      }};
    }};
}}
"#
    )
}

fn bench_hosts() -> Vec<(String, u64)> {
    HOSTS.iter().map(|(n, mb)| ((*n).to_owned(), *mb)).collect()
}

fn nix(args: &[&str]) -> Command {
    let mut command = nix_command("nix");
    command
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(args);
    command
}

/// A field of /proc/<pid>/status in KiB; `None` once the process is gone.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Peak resident memory (KiB) of a plain `nix eval` of one host's
/// derivation, read from its `VmHWM` until it exits.
fn single_host_peak_kib(flake: &Flake, host: &str) -> u64 {
    let attr = format!(
        "{}#nixosConfigurations.{host}.config.system.build.toplevel.drvPath",
        flake.url()
    );
    let mut child = nix(&["eval", "--raw", "--no-eval-cache", &attr])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    loop {
        if let Some(kib) = status_kib(child.id(), "VmHWM:") {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "nix eval of {host} failed");
            return peak;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` is a Nix evaluator: `nix ... eval ...` (directly, or
/// through the loader of a private Nix).
fn is_evaluator(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.contains(&b"eval".as_slice())
        && args
            .iter()
            .any(|a| Path::new(OsStr::from_bytes(a)).file_name() == Some(OsStr::new("nix")))
}

/// Summed `VmRSS` (KiB) of the evaluators among `root`'s descendants, and
/// how many there are.
fn evaluators_rss_kib(root: u32) -> (u64, usize) {
    let mut queue = vec![root];
    let (mut total, mut count) = (0, 0);
    while let Some(pid) = queue.pop() {
        for child in child_pids(pid) {
            if is_evaluator(child)
                && let Some(kib) = status_kib(child, "VmRSS:")
            {
                total += kib;
                count += 1;
            }
            queue.push(child);
        }
    }
    (total, count)
}

/// One sample: time since the start, summed RSS (KiB), evaluators.
type Sample = (Duration, u64, usize);

/// Samples the evaluators under a process every [`SAMPLE_EVERY`] until
/// finished.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(root: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            // Bounded by the run it samples; the hour is a backstop.
            while !stopped.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(3600)
            {
                let (kib, count) = evaluators_rss_kib(root);
                samples.push((started.elapsed(), kib, count));
                std::thread::sleep(SAMPLE_EVERY);
            }
            samples
        });
        Self { stop, thread }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One `all` request with what the sampler saw during it.
struct Run {
    label: &'static str,
    wall: Duration,
    status: String,
    /// Each host's `success` or error code.
    hosts: BTreeMap<String, String>,
    samples: Vec<Sample>,
    /// Evaluator restarts during the run, by reason; `None` without the
    /// metric.
    restarts: Option<BTreeMap<String, f64>>,
    /// `eval_memory_reserved_bytes` once the run is over.
    reserved_after: Option<f64>,
}

impl Run {
    fn peak_kib(&self) -> u64 {
        self.samples.iter().map(|s| s.1).max().unwrap_or(0)
    }

    fn restarts_total(&self) -> Option<f64> {
        self.restarts.as_ref().map(|r| r.values().sum())
    }

    fn restarts_text(&self) -> String {
        match &self.restarts {
            None => "n/a".to_owned(),
            Some(r) if r.is_empty() => "0".to_owned(),
            Some(r) => {
                let reasons: Vec<String> = r.iter().map(|(k, v)| format!("{k} {v}")).collect();
                format!("{} ({})", r.values().sum::<f64>(), reasons.join(", "))
            }
        }
    }

    /// Milliseconds the summed RSS spent above `limit_kib`.
    fn ms_above(&self, limit_kib: u64) -> u128 {
        let above = self.samples.iter().filter(|s| s.1 > limit_kib).count();
        above as u128 * SAMPLE_EVERY.as_millis()
    }

    /// The time series in short: peak per second, in MB.
    fn per_second(&self) -> String {
        let mut seconds: Vec<u64> = Vec::new();
        for (at, kib, _) in &self.samples {
            let second = usize::try_from(at.as_secs()).unwrap_or(usize::MAX);
            if second >= 600 {
                break;
            }
            if seconds.len() <= second {
                seconds.resize(second + 1, 0);
            }
            seconds[second] = seconds[second].max(*kib);
        }
        seconds
            .iter()
            .map(|kib| format!("{:.0}", mb(*kib)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Per-reason values of a labelled counter (none before its first
/// increment: the endpoint has no series yet).
fn counter_by_reason(metrics: &str, name: &str) -> BTreeMap<String, f64> {
    let mut values = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some((series, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let reason = series
            .trim_start_matches('{')
            .trim_end_matches('}')
            .split(',')
            .find_map(|kv| kv.strip_prefix("reason="))
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned();
        *values.entry(reason).or_insert(0.0) += value;
    }
    values
}

/// The value of an unlabelled gauge.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Sends `all` for `repo` and collects its outcome, sampling the builder's
/// evaluators meanwhile. `restarts`: whether the builder counts evaluator
/// restarts.
async fn run_all(
    label: &'static str,
    builder: &mut Builder,
    client: &Requester,
    repo: &str,
    restarts: bool,
) -> Run {
    let addr = builder.metrics_addr().await;
    let before = counter_by_reason(&http_get(&addr, "/metrics").await.1, RESTARTS);
    let sampler = Sampler::start(builder.pid());
    let started = Instant::now();
    let mut pending = client.send(&format!("build.{repo}.all"), "").await;
    let mut hosts = BTreeMap::new();
    // Host results read from the raw JSON, so that error codes this
    // version of the protocol does not name yet still show.
    let status = loop {
        let message =
            tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut pending.subscriber))
                .await
                .expect("no reply in time")
                .expect("subscription closed");
        let reply: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        let text = |key: &str| reply[key].as_str().unwrap_or_default().to_owned();
        match reply["event"].as_str() {
            Some("host_finished") => {
                let result = match reply["error"]["code"].as_str() {
                    Some(code) => code.to_owned(),
                    None => text("status"),
                };
                hosts.insert(text("host"), result);
            }
            Some("finished") => break text("status"),
            Some("rejected") => break format!("rejected: {}", reply["error"]),
            _ => {}
        }
    };
    let wall = started.elapsed();
    let samples = sampler.finish();
    let metrics = http_get(&addr, "/metrics").await.1;
    Run {
        label,
        wall,
        status,
        hosts,
        samples,
        restarts: restarts.then(|| {
            let mut during = counter_by_reason(&metrics, RESTARTS);
            for (reason, count) in during.iter_mut() {
                *count -= before.get(reason).copied().unwrap_or(0.0);
            }
            during.retain(|_, count| *count != 0.0);
            during
        }),
        reserved_after: gauge(&metrics, RESERVED_GAUGE),
    }
}

/// Whether the builder takes `[builder] eval_memory_budget`.
fn budget_supported(options: &BuilderOptions) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let options = options
        .clone()
        .builder(&format!("eval_memory_budget = \"{UNLIMITED}\""));
    std::fs::write(&path, options.config_text("nats://127.0.0.1:4222")).unwrap();
    Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env("PATH", test_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

fn options_for(flake: &Flake, budget: Option<&str>) -> BuilderOptions {
    let mut options = BuilderOptions::new(flake)
        .host_timeout("10m")
        .builder(&format!("eval_workers = {WORKERS}"));
    options.repos = vec![("heavy".into(), flake.url(), None)];
    match budget {
        Some(budget) => options.builder(&format!("eval_memory_budget = \"{budget}\"")),
        None => options,
    }
}

fn yes(holds: bool) -> &'static str {
    if holds { "yes" } else { "NO" }
}

#[tokio::main]
async fn main() {
    let nix_version = String::from_utf8(nix(&["--version"]).output().unwrap().stdout).unwrap();
    println!(
        "homelab-deploy evaluator memory benchmark: {} hosts, {WORKERS} evaluators, {}",
        HOSTS.len(),
        nix_version.trim()
    );

    let hosts = bench_hosts();
    let flake_a = Flake::with_source(|salt, system| flake_source(&hosts, salt, system));
    let supported = budget_supported(&options_for(&flake_a, None));

    println!("\none host alone, plain nix eval (shared part included):");
    let mut single = BTreeMap::new();
    for (host, own) in &hosts {
        let kib = single_host_peak_kib(&flake_a, host);
        println!("  {host}  own {own:>5} MB   peak RSS {:>7.1} MB", mb(kib));
        single.insert(host.clone(), kib);
    }

    let nats = NatsServer::start().await;
    let client = Requester::new(&nats).await;

    let options = options_for(&flake_a, supported.then_some(UNLIMITED));
    let mut builder = Builder::start(&nats, &options).await;
    let run_a = run_all("(a) no budget", &mut builder, &client, "heavy", supported).await;
    assert!(builder.terminate().await.success());
    let mut runs = vec![run_a];

    let mut budget_kib = None;
    if supported {
        // Truncating a size to whole KiB is what's meant.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let budget = (runs[0].peak_kib() as f64 * BUDGET_SHARE) as u64;
        budget_kib = Some(budget);
        let mut oversized = bench_hosts();
        oversized.push((OVERSIZED.to_owned(), budget * 3 / 2 / 1024));
        let flake_b = Flake::with_source(|salt, system| flake_source(&hosts, salt, system));
        let flake_c = Flake::with_source(|salt, system| flake_source(&oversized, salt, system));
        let budget_text = format!("{budget}KiB");
        let options =
            options_for(&flake_b, Some(&budget_text)).add_repo("oversized", &flake_c.url());
        let mut builder = Builder::start(&nats, &options).await;
        let addr = builder.metrics_addr().await;
        let reported = gauge(&http_get(&addr, "/metrics").await.1, BUDGET_GAUGE);
        println!(
            "\nbudget for (b)-(d): {:.1} MB ({:.0} % of (a)'s peak); the builder reports {}",
            mb(budget),
            BUDGET_SHARE * 100.0,
            reported.map_or("no budget gauge".to_owned(), |b| format!(
                "{:.1} MB",
                b / 1048576.0
            ))
        );
        runs.push(run_all("(b) budget", &mut builder, &client, "heavy", true).await);
        runs.push(run_all("(c) + oversized", &mut builder, &client, "oversized", true).await);
        flake_b.commit_change("same evaluation, new commit");
        runs.push(run_all("(d) (b) again", &mut builder, &client, "heavy", true).await);
        assert!(builder.terminate().await.success());
    } else {
        println!(
            "\nthis builder does not take [builder] eval_memory_budget: runs (b)-(d) are skipped"
        );
    }

    println!(
        "\nruns ({WORKERS} evaluators, RSS summed over them, sampled every {} ms):",
        SAMPLE_EVERY.as_millis()
    );
    println!(
        "  {:<17} {:>8} {:>10} {:>12} {:>9}  restarts",
        "run", "wall", "peak RSS", "over budget", "reserved"
    );
    for run in &runs {
        println!(
            "  {:<17} {:>6.2} s {:>7.1} MB {:>9} ms {:>9}  {}",
            run.label,
            run.wall.as_secs_f64(),
            mb(run.peak_kib()),
            budget_kib.map_or("-".to_owned(), |b| run.ms_above(b).to_string()),
            run.reserved_after
                .map_or("-".to_owned(), |r| format!("{:.0} MB", r / 1048576.0)),
            run.restarts_text()
        );
    }
    for run in &runs {
        println!(
            "  {} peak RSS per second, MB: {}",
            run.label,
            run.per_second()
        );
    }

    println!("\nhost results:");
    let mut names: Vec<String> = hosts.iter().map(|(n, _)| n.clone()).collect();
    if supported {
        names.push(OVERSIZED.to_owned());
    }
    print!("  {:<10} {:>9}", "host", "alone");
    for run in &runs {
        print!("  {:<18}", run.label);
    }
    println!();
    for name in &names {
        print!(
            "  {name:<10} {:>9}",
            single
                .get(name)
                .map_or("-".to_owned(), |kib| format!("{:.0} MB", mb(*kib)))
        );
        for run in &runs {
            print!("  {:<18}", run.hosts.get(name).map_or("-", String::as_str));
        }
        println!();
    }
    for run in &runs {
        println!("  {}: request {}", run.label, run.status);
    }

    let Some(budget) = budget_kib else {
        return;
    };
    let [a, b, c, d] = &runs[..] else {
        unreachable!("four runs with a budget")
    };
    let fits = |host: &str| single.get(host).is_some_and(|kib| *kib <= budget);
    let fitting_succeeded = |run: &Run| {
        single
            .keys()
            .filter(|h| fits(h))
            .all(|h| run.hosts.get(h).is_some_and(|r| r == "success"))
    };
    let limit = budget as f64 * 1.05;
    let checks = [
        (
            "peak <= budget x 1.05 in (b), (c), (d)",
            [b, c, d].iter().all(|r| r.peak_kib() as f64 <= limit),
        ),
        (
            "every host that fits the budget succeeded in (b), (c), (d)",
            [b, c, d].iter().all(|r| fitting_succeeded(r)),
        ),
        (
            "wall time (b) <= 1.3 x (a)",
            b.wall.as_secs_f64() <= 1.3 * a.wall.as_secs_f64(),
        ),
        (
            "in (c) the oversized host alone failed, with eval_out_of_memory",
            c.hosts.get(OVERSIZED).map(String::as_str) == Some("eval_out_of_memory")
                && c.hosts
                    .iter()
                    .filter(|(h, _)| *h != OVERSIZED)
                    .all(|(h, r)| r == "success" || !fits(h)),
        ),
        (
            "restarts (d) <= restarts (b)",
            matches!((d.restarts_total(), b.restarts_total()), (Some(d), Some(b)) if d <= b),
        ),
    ];
    println!("\ndone when:");
    for (what, holds) in &checks {
        println!("  {what}: {}", yes(*holds));
    }
    println!(
        "  {} of {} hold",
        checks.iter().filter(|(_, h)| *h).count(),
        checks.len()
    );
}
