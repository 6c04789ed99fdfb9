//! The evaluators' shared memory budget against real Nix evaluations that
//! hold hundreds of megabytes: their summed resident memory, sampled here
//! independently of the builder, stays under `eval_memory_budget`; every
//! host that fits builds; one that alone needs more than the budget fails
//! with `eval_out_of_memory`, alone; and a second run of the same hosts
//! reserves what the first learned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::builder::{Builder, start_service};
use common::flake::{Flake, Host};
use common::net::{http_get, metric};
use common::process::child_pids;
use common::replies::host_outcomes;
use common::requester::Requester;
use homelab_deploy::nix::argv::EVAL_MARKER;
use homelab_deploy::nix::process::resident_bytes;
use homelab_deploy::protocol::{ErrorCode, HostStatus};

const BUDGET_MIB: u64 = 700;

/// Samples the summed resident memory of the builder's evaluator
/// processes (children whose command line carries the evaluation marker)
/// every 50 ms until dropped; keeps the highest sum.
struct Sampler {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(builder_pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let peak = Arc::clone(&peak);
            async move {
                let mut every = tokio::time::interval(Duration::from_millis(50));
                // Bounded: the test's own timeouts end it long before.
                for _ in 0..(20 * 60 * 10) {
                    every.tick().await;
                    let sum: u64 = child_pids(builder_pid)
                        .into_iter()
                        .filter(|pid| is_evaluator(*pid))
                        .filter_map(resident_bytes)
                        .sum();
                    peak.fetch_max(sum, Ordering::Relaxed);
                }
            }
        });
        Self { peak, task }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_evaluator(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(EVAL_MARKER))
}

async fn scrape(builder: &mut Builder) -> String {
    let addr = builder.metrics_addr().await;
    let (status, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    body
}

fn restarts(text: &str, reason: &str) -> f64 {
    metric(
        text,
        &format!("homelab_deploy_builder_eval_restarts_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or_else(|| panic!("no eval_restarts_total{{reason={reason}}} in\n{text}"))
}

#[tokio::test]
async fn evaluators_stay_within_the_budget_and_only_an_oversized_host_fails() {
    let mut hosts: Vec<(String, Host)> = (1..=4)
        .map(|n| (format!("h{n}"), Host::EvalHeavy { million: 3 }))
        .collect();
    hosts.push(("huge".to_owned(), Host::EvalHeavy { million: 24 }));
    let hosts: Vec<(&str, Host)> = hosts.iter().map(|(n, h)| (n.as_str(), h.clone())).collect();
    let flake = Flake::new(&hosts);
    let (nats, mut builder) = start_service(&flake, |o| {
        o.builder(&format!(
            "eval_workers = 2\neval_memory_budget = \"{BUDGET_MIB}MiB\"\n\
             eval_memory_estimate = \"100MiB\"\neval_max_memory = \"8GiB\""
        ))
    })
    .await;
    let client = Requester::new(&nats).await;
    let budget = BUDGET_MIB << 20;

    let sampler = Sampler::start(builder.pid());
    let replies = client.build("build.homelab.all", "").await;
    let first_peak = sampler.peak();
    drop(sampler);
    let outcomes = host_outcomes(&replies);
    for outcome in &outcomes {
        if outcome.host == "huge" {
            assert_eq!(outcome.status, HostStatus::Failed, "{outcomes:?}");
            assert_eq!(
                outcome.code,
                Some(ErrorCode::EvalOutOfMemory),
                "{outcomes:?}"
            );
            assert!(
                outcome
                    .message
                    .contains(&format!("eval_memory_budget is {BUDGET_MIB} MiB")),
                "{}",
                outcome.message
            );
        } else {
            assert_eq!(outcome.status, HostStatus::Success, "{outcomes:?}");
        }
    }
    assert_eq!(outcomes.len(), 5, "{outcomes:?}");
    assert!(
        first_peak <= budget + budget / 20,
        "the evaluators held {} MiB together, over the {BUDGET_MIB} MiB budget",
        first_peak >> 20
    );
    let text = scrape(&mut builder).await;
    assert_eq!(
        metric(&text, "homelab_deploy_builder_eval_memory_budget_bytes"),
        Some(budget as f64)
    );
    assert_eq!(
        metric(&text, "homelab_deploy_builder_eval_memory_reserved_bytes"),
        Some(0.0),
        "everything released once the request is over"
    );
    let learned = metric(
        &text,
        "homelab_deploy_builder_eval_host_peak_bytes{host=\"h1\",repo=\"homelab\"}",
    )
    .expect("h1's peak is learned");
    assert!(learned > (100 << 20) as f64, "{learned}");
    let first_restarts = restarts(&text, "memory");
    eprintln!(
        "first run: evaluators' peak {} MiB of {BUDGET_MIB} MiB, h1 learned {:.0} MiB, {first_restarts} restarts for memory",
        first_peak >> 20,
        learned / f64::from(1 << 20)
    );

    // A new commit: the same hosts, with what the first run learned.
    flake.commit_change("second");
    let sampler = Sampler::start(builder.pid());
    let replies = client.build("build.homelab.all", "").await;
    let second_peak = sampler.peak();
    drop(sampler);
    let outcomes = host_outcomes(&replies);
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.status != HostStatus::Success)
        .map(|o| o.host.as_str())
        .collect();
    assert_eq!(failed, ["huge"], "{outcomes:?}");
    assert!(
        second_peak <= budget + budget / 20,
        "{} MiB",
        second_peak >> 20
    );
    let text = scrape(&mut builder).await;
    let second_restarts = restarts(&text, "memory") - first_restarts;
    eprintln!(
        "second run: evaluators' peak {} MiB, {second_restarts} restarts for memory",
        second_peak >> 20
    );
    assert!(
        second_restarts <= first_restarts,
        "the second run restarted {second_restarts} evaluators for memory, the first {first_restarts}"
    );
}
