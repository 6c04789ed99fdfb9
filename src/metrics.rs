//! Prometheus metrics (`GET /metrics`) and health (`GET /healthz`) over a
//! tiny HTTP server.
//!
//! The metric names and labels are a contract with dashboards and alert
//! rules (`docs/monitoring/`). Label values are bounded: repos come from the
//! config, hosts from the flakes, reasons from the protocol's error codes;
//! nothing taken raw from a request ever becomes a label. Every labelled
//! metric is [`Masked`]: credentials in label values are masked when a
//! series is made, so a scrape sends the encoded text as it is.

use std::net::SocketAddr;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use thiserror::Error;

use crate::protocol::{BuildStatus, ErrorCode, HostStatus};

mod labels;
mod server;
mod slots;

pub use labels::Masked;
pub use server::{Exporter, Health, bind, serve};

const PREFIX: &str = "homelab_deploy_builder";

/// Build durations run from seconds (a cached host) to hours (a mass
/// rebuild after a nixpkgs bump).
const DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The metrics could not be set up.
#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("metric registration failed: {0}")]
    Registry(#[from] prometheus::Error),
    #[error("cannot listen on {addr} for metrics: {source}; is the port taken? ([metrics] listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Every metric the builder exports.
pub struct Metrics {
    registry: Registry,
    /// Finished requests by status.
    pub builds: Masked<IntCounterVec>,
    /// Request wall time.
    pub build_duration: Masked<HistogramVec>,
    /// Per-host results.
    pub host_builds: Masked<IntCounterVec>,
    /// Per-host wall time.
    pub host_build_duration: Masked<HistogramVec>,
    /// Unix time of each host's last successful build.
    pub host_last_success: Masked<GaugeVec>,
    /// Closure size of each host's current result on the default ref.
    pub host_closure_size: Masked<IntGaugeVec>,
    /// Rejected requests by error code.
    pub rejected: Masked<IntCounterVec>,
    /// Requests answered with nothing, by why.
    pub ignored: Masked<IntCounterVec>,
    /// Requests waiting behind the running one.
    pub queue_length: IntGauge,
    /// 1 while a build runs.
    pub build_in_progress: IntGauge,
    /// How long the running build has run; 0 when idle.
    pub oldest_active_age: Gauge,
    /// 1 while connected to NATS.
    pub nats_connected: IntGauge,
    /// Reconnections after the first connection.
    pub nats_reconnects: IntCounter,
    /// Requests picked up again from the journal at start.
    pub resumed_requests: IntCounter,
    /// Size of the journal of accepted requests.
    pub journal_bytes: IntGauge,
    /// History writes that failed or were dropped.
    pub history_write_failures: IntCounter,
    /// Derivations Nix sent to each remote builder.
    pub remote_builds: Masked<IntCounterVec>,
    /// 1 when the last check reached the remote builder, 0 when not.
    pub machine_up: Masked<IntGaugeVec>,
    /// The evaluators' memory budget (`eval_memory_budget`).
    pub eval_memory_budget: IntGauge,
    /// Memory reserved of it now.
    pub eval_memory_reserved: IntGauge,
    /// Summed resident memory of the evaluator processes, as last sampled.
    pub eval_resident: IntGauge,
    /// Evaluations waiting for room in the budget.
    pub eval_waiting_for_memory: IntGauge,
    /// The learned peak of each host's evaluation.
    pub eval_host_peak: Masked<IntGaugeVec>,
    /// Evaluator processes stopped before their hosts were done, by why.
    pub eval_restarts: Masked<IntCounterVec>,
}

fn name(suffix: &str) -> String {
    format!("{PREFIX}_{suffix}")
}

/// Registers `metric` with `registry` and hands it back, so that every
/// metric is registered where it is created.
fn registered<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// [`registered`] for a labelled metric: its label values are masked.
fn masked<B: MetricVecBuilder + 'static>(
    registry: &Registry,
    vec: MetricVec<B>,
) -> Result<Masked<MetricVec<B>>, prometheus::Error> {
    registered(registry, vec).map(Masked::new)
}

impl Metrics {
    /// Creates and registers every metric; series for the configured repos
    /// and every status start at zero so rates are defined from the start.
    pub fn new<'a>(repos: impl IntoIterator<Item = &'a str>) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter_vec = |suffix: &str, help: &str, labels: &[&str]| {
            masked(
                &registry,
                IntCounterVec::new(Opts::new(name(suffix), help), labels)?,
            )
        };
        let histogram_vec = |suffix: &str, help: &str, labels: &[&str]| {
            masked(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name(suffix), help).buckets(DURATION_BUCKETS.to_vec()),
                    labels,
                )?,
            )
        };
        let metrics = Self {
            builds: counter_vec(
                "builds_total",
                "Finished build requests by status.",
                &["repo", "status"],
            )?,
            build_duration: histogram_vec(
                "build_duration_seconds",
                "Wall time of build requests, from start to finished.",
                &["repo"],
            )?,
            host_builds: counter_vec(
                "host_builds_total",
                "Host builds by result.",
                &["repo", "host", "status"],
            )?,
            host_build_duration: histogram_vec(
                "host_build_duration_seconds",
                "Wall time of host builds (waiting for evaluation included).",
                &["repo", "host"],
            )?,
            host_last_success: masked(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        name("host_last_success_timestamp_seconds"),
                        "Unix time of the host's last successful build.",
                    ),
                    &["repo", "host"],
                )?,
            )?,
            host_closure_size: masked(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        name("host_closure_size_bytes"),
                        "Closure size (sum of NAR sizes) of the host's current result on the \
                         repo's default ref.",
                    ),
                    &["repo", "host"],
                )?,
            )?,
            rejected: counter_vec(
                "requests_rejected_total",
                "Requests rejected on receipt, by error code.",
                &["reason"],
            )?,
            ignored: counter_vec(
                "requests_ignored_total",
                "Requests given no answer at all: a reply subject outside \
                 build.responses. (foreign_reply_subject) or one already serving a live \
                 request (reply_subject_in_use).",
                &["reason"],
            )?,
            queue_length: registered(
                &registry,
                IntGauge::new(
                    name("queue_length"),
                    "Requests waiting behind the running one.",
                )?,
            )?,
            build_in_progress: registered(
                &registry,
                IntGauge::new(name("build_in_progress"), "1 while a build request runs.")?,
            )?,
            oldest_active_age: registered(
                &registry,
                Gauge::new(
                    name("oldest_active_age_seconds"),
                    "How long the running build has been running; 0 when idle.",
                )?,
            )?,
            nats_connected: registered(
                &registry,
                IntGauge::new(name("nats_connected"), "1 while connected to NATS.")?,
            )?,
            nats_reconnects: registered(
                &registry,
                IntCounter::new(
                    name("nats_reconnects_total"),
                    "Reconnections to NATS after the first connection.",
                )?,
            )?,
            resumed_requests: registered(
                &registry,
                IntCounter::new(
                    name("resumed_requests_total"),
                    "Requests picked up again from the journal after a restart.",
                )?,
            )?,
            journal_bytes: registered(
                &registry,
                IntGauge::new(
                    name("journal_bytes"),
                    "Size of the journal of accepted requests, in bytes.",
                )?,
            )?,
            history_write_failures: registered(
                &registry,
                IntCounter::new(
                    name("history_write_failures_total"),
                    "Events the history database did not record (a failed write, or too many waiting); builds go on regardless.",
                )?,
            )?,
            remote_builds: counter_vec(
                "remote_builds_total",
                "Derivations Nix built on each remote builder (machine URI, credentials masked).",
                &["machine"],
            )?,
            machine_up: masked(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        name("machine_up"),
                        "1 when the last `nix store ping` of the remote builder succeeded, 0 when not.",
                    ),
                    &["machine"],
                )?,
            )?,
            eval_memory_budget: registered(
                &registry,
                IntGauge::new(
                    name("eval_memory_budget_bytes"),
                    "Memory all evaluator processes may hold together (eval_memory_budget).",
                )?,
            )?,
            eval_memory_reserved: registered(
                &registry,
                IntGauge::new(
                    name("eval_memory_reserved_bytes"),
                    "Memory of the budget reserved by evaluator processes now.",
                )?,
            )?,
            eval_resident: registered(
                &registry,
                IntGauge::new(
                    name("eval_resident_bytes"),
                    "Summed resident memory of the evaluator processes, sampled every 100 ms.",
                )?,
            )?,
            eval_waiting_for_memory: registered(
                &registry,
                IntGauge::new(
                    name("eval_waiting_for_memory"),
                    "Evaluator processes waiting for room in the memory budget.",
                )?,
            )?,
            eval_host_peak: masked(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        name("eval_host_peak_bytes"),
                        "Resident memory of the evaluator at its peak while on the host, \
                         as last measured: what its next evaluation reserves.",
                    ),
                    &["repo", "host"],
                )?,
            )?,
            eval_restarts: counter_vec(
                "eval_restarts_total",
                "Evaluator processes stopped before their hosts were done, by reason: \
                 memory (to stay within eval_memory_budget), max_memory (replaced after a \
                 host past eval_max_memory), oom_killed (killed by the kernel), failed \
                 (an evaluation error), timeout.",
                &["reason"],
            )?,
            registry,
        };
        let info = registered(
            &metrics.registry,
            IntGaugeVec::new(
                Opts::new(name("info"), "Build information; always 1."),
                &["version"],
            )?,
        )?;
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        for repo in repos {
            for status in [
                BuildStatus::Success,
                BuildStatus::Failed,
                BuildStatus::Cancelled,
            ] {
                metrics.builds.with_label_values(&[repo, status.as_str()]);
            }
        }
        for code in REJECTION_CODES {
            metrics.rejected.with_label_values(&[code.as_str()]);
        }
        for reason in IGNORE_REASONS {
            metrics.ignored.with_label_values(&[reason]);
        }
        for reason in EVAL_RESTART_REASONS {
            metrics.eval_restarts.with_label_values(&[reason]);
        }
        Ok(metrics)
    }

    /// Records one finished request.
    pub fn build_finished(&self, repo: &str, status: BuildStatus, seconds: f64) {
        self.builds
            .with_label_values(&[repo, status.as_str()])
            .inc();
        self.build_duration
            .with_label_values(&[repo])
            .observe(seconds);
    }

    /// Records one finished host.
    pub fn host_finished(
        &self,
        repo: &str,
        host: &str,
        status: HostStatus,
        seconds: f64,
        unix_time: f64,
    ) {
        self.host_builds
            .with_label_values(&[repo, host, status.as_str()])
            .inc();
        self.host_build_duration
            .with_label_values(&[repo, host])
            .observe(seconds);
        if status == HostStatus::Success {
            self.host_last_success
                .with_label_values(&[repo, host])
                .set(unix_time);
        }
    }

    /// Records the closure size of a host's new result on the default ref.
    pub fn set_host_closure_size(&self, repo: &str, host: &str, bytes: u64) {
        self.host_closure_size
            .with_label_values(&[repo, host])
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The Prometheus text format (0.0.4). Label values were masked as
    /// they entered the registry (see [`Masked`]), so the text is sent as
    /// it is.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Encoding into a String cannot fail for well-formed metrics.
        if let Err(err) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::error!(%err, "cannot encode metrics");
        }
        text
    }
}

/// The codes a request can be rejected with (the `reason` label).
pub const REJECTION_CODES: [ErrorCode; 6] = [
    ErrorCode::UnknownRepo,
    ErrorCode::InvalidRequest,
    ErrorCode::QueueFull,
    ErrorCode::ShuttingDown,
    ErrorCode::Unauthorized,
    ErrorCode::Internal,
];

/// Why a request is given no answer (the `reason` label of
/// `requests_ignored_total`).
pub const IGNORE_REASONS: [&str; 3] = [
    "foreign_reply_subject",
    "reply_subject_in_use",
    "overloaded",
];

/// Why an evaluator process was stopped before its hosts were done (the
/// `reason` label of `eval_restarts_total`).
pub const EVAL_RESTART_REASONS: [&str; 5] =
    ["memory", "max_memory", "oom_killed", "failed", "timeout"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_start_at_zero_for_configured_repos_and_reasons() {
        let metrics = Metrics::new(["nixos-servers", "nixos"]).unwrap();
        let text = metrics.render();
        assert!(text.contains(
            "homelab_deploy_builder_builds_total{repo=\"nixos-servers\",status=\"success\"} 0"
        ));
        assert!(
            text.contains(
                "homelab_deploy_builder_requests_rejected_total{reason=\"queue_full\"} 0"
            )
        );
        assert!(text.contains("homelab_deploy_builder_info{version=\""));
        assert!(text.contains("homelab_deploy_builder_nats_connected 0"));
        assert!(text.contains("process_resident_memory_bytes"));
    }

    #[test]
    fn host_results_are_counted_and_successes_stamped() {
        let metrics = Metrics::new(["r"]).unwrap();
        metrics.host_finished("r", "ns1", HostStatus::Success, 12.0, 1_800_000_000.0);
        metrics.host_finished("r", "ns2", HostStatus::Failed, 3.0, 1_800_000_001.0);
        metrics.build_finished("r", BuildStatus::Failed, 15.0);
        let text = metrics.render();
        assert!(text.contains(
            "homelab_deploy_builder_host_builds_total{host=\"ns1\",repo=\"r\",status=\"success\"} 1"
        ));
        assert!(text.contains(
            "homelab_deploy_builder_host_builds_total{host=\"ns2\",repo=\"r\",status=\"failed\"} 1"
        ));
        assert!(text.contains(
            "homelab_deploy_builder_host_last_success_timestamp_seconds{host=\"ns1\",repo=\"r\"} 1800000000"
        ));
        assert!(!text.contains("last_success_timestamp_seconds{host=\"ns2\""));
        assert!(
            text.contains("homelab_deploy_builder_builds_total{repo=\"r\",status=\"failed\"} 1")
        );
        assert!(text.contains(
            "homelab_deploy_builder_build_duration_seconds_bucket{repo=\"r\",le=\"30\"} 1"
        ));
    }
    #[test]
    fn closure_sizes_are_a_gauge_per_host() {
        let metrics = Metrics::new(["r"]).unwrap();
        metrics.set_host_closure_size("r", "ns1", 1_288_490_188);
        metrics.set_host_closure_size("r", "ns1", 1_288_490_189);
        assert!(metrics.render().contains(
            "homelab_deploy_builder_host_closure_size_bytes{host=\"ns1\",repo=\"r\"} 1288490189"
        ));
    }
}
