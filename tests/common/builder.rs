//! The real `homelab-deploy builder` process under test: its config, its
//! start (ready when it says so on its notify socket), its log and its end.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::cli::BIN;
use super::flake::Flake;
use super::nats::NatsServer;
use super::net::{free_port, http_get};
use super::nix::{nix_config, test_path};
use super::notify::{Notified, NotifySocket, SERVING};
use super::wait::{WAIT, poll};

/// Options for a builder under test.
#[derive(Debug, Clone)]
pub struct BuilderOptions {
    pub host_timeout: String,
    pub repos: Vec<(String, String, Option<String>)>,
    pub extra_builder: String,
    pub extra_repo: String,
    /// Directory prepended to PATH (e.g. a recording `nix` wrapper).
    pub path_prefix: Option<PathBuf>,
    /// Extra environment for the builder process.
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments (after `builder --config ...`).
    pub args: Vec<String>,
    /// Extra lines for the `[nats]` table (e.g. `nkey_seed_file`).
    pub extra_nats: String,
    /// Lines of the `[auth]` table.
    pub auth: String,
    /// Lines of `[web]`; the section is left out when empty.
    pub web: String,
    /// The metrics endpoint's port (a free one).
    pub metrics_port: u16,
}

impl BuilderOptions {
    /// One repo called `homelab` pointing at `flake`.
    pub fn new(flake: &Flake) -> Self {
        Self {
            host_timeout: "60s".into(),
            repos: vec![("homelab".into(), flake.url(), None)],
            extra_builder: String::new(),
            extra_repo: String::new(),
            path_prefix: None,
            env: Vec::new(),
            args: Vec::new(),
            extra_nats: String::new(),
            auth: String::new(),
            web: String::new(),
            metrics_port: free_port(),
        }
    }

    /// Extra lines for the `[nats]` table.
    pub fn nats(mut self, lines: &str) -> Self {
        self.extra_nats.push_str(lines);
        self.extra_nats.push('\n');
        self
    }

    /// The builder signs its replies with this NKey seed file.
    pub fn signing_with(self, seed_file: &Path) -> Self {
        self.nats(&format!("nkey_seed_file = \"{}\"", seed_file.display()))
    }

    /// Lines for the `[auth]` table.
    pub fn auth(mut self, lines: &str) -> Self {
        self.auth.push_str(lines);
        self.auth.push('\n');
        self
    }

    /// Sets an environment variable for the builder.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Adds a command-line argument.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// `[builder] host_timeout`, 60s unless set.
    pub fn host_timeout(mut self, timeout: &str) -> Self {
        self.host_timeout = timeout.into();
        self
    }

    /// Extra lines for the `[builder]` table.
    pub fn builder(mut self, lines: &str) -> Self {
        self.extra_builder.push_str(lines);
        self.extra_builder.push('\n');
        self
    }

    /// Extra lines for the (first) repo's table.
    pub fn web(mut self, lines: &str) -> Self {
        self.web.push_str(lines);
        self.web.push('\n');
        self
    }

    pub fn repo(mut self, lines: &str) -> Self {
        self.extra_repo.push_str(lines);
        self.extra_repo.push('\n');
        self
    }

    /// Runs the builder with `dir` first on PATH (e.g. a [`NixRecorder`]).
    pub fn path_prefix(mut self, dir: PathBuf) -> Self {
        self.path_prefix = Some(dir);
        self
    }

    pub fn add_repo(mut self, name: &str, url: &str) -> Self {
        self.repos.push((name.into(), url.into(), None));
        self
    }

    /// The config file: the metrics endpoint on the port chosen in
    /// [`BuilderOptions::new`], known before the builder starts.
    pub fn config_text(&self, nats_url: &str) -> String {
        let mut text = format!(
            "[nats]\nurl = \"{nats_url}\"\n{}\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\n[builder]\nhost_timeout = \"{}\"\n{}\n[auth]\n{}\n",
            self.extra_nats, self.metrics_port, self.host_timeout, self.extra_builder, self.auth
        );
        if !self.web.is_empty() {
            let _ = writeln!(text, "[web]\n{}", self.web);
        }
        for (i, (name, url, git_ref)) in self.repos.iter().enumerate() {
            let _ = writeln!(text, "[repos.{name}]\nurl = \"{url}\"");
            if let Some(git_ref) = git_ref {
                let _ = writeln!(text, "ref = \"{git_ref}\"");
            }
            if i == 0 {
                text.push_str(&self.extra_repo);
            }
        }
        text
    }
}

/// The real `homelab-deploy builder` process; stopped on drop.
pub struct Builder {
    child: Option<Child>,
    pub log: PathBuf,
    notify: NotifySocket,
    /// `[metrics] listen` of its config.
    metrics: Option<String>,
    /// Whether the metrics endpoint has accepted a connection.
    metrics_up: bool,
    spawned_at: Instant,
    _dir: tempfile::TempDir,
}

/// How long the builder waits for NATS before it says `READY=1` anyway
/// (`NATS_READY_WAIT` in src/builder): a `READY=1` read sooner than this
/// after the start cannot be that one.
const NATS_READY_WAIT: Duration = Duration::from_secs(5);

/// The builder's subscriptions to status and cancel requests, by the name
/// of the connection holding them; its build requests are on
/// `homelab-deploy-builder`, `build.<repo>.*` for each repo.
const QUERY_SUBSCRIPTIONS: &[(&str, &str)] = &[
    (
        "homelab-deploy-builder-queries",
        homelab_deploy::protocol::STATUS_SUBJECT,
    ),
    (
        "homelab-deploy-builder-queries",
        homelab_deploy::protocol::CANCEL_SUBJECT,
    ),
];

impl Builder {
    /// Starts the builder and waits until it is ready and nats-server
    /// holds its subscriptions: a request sent then reaches it.
    pub async fn start(nats: &NatsServer, options: &BuilderOptions) -> Self {
        let before = nats.last_client_id().await;
        let mut builder = Self::spawn_with(&options.config_text(&nats.url()), options);
        builder.wait_serving().await;
        let repos: Vec<String> = options
            .repos
            .iter()
            .map(|(repo, ..)| homelab_deploy::protocol::repo_subscription(repo))
            .collect();
        let mut wanted: Vec<(&str, &str)> = repos
            .iter()
            .map(|subject| ("homelab-deploy-builder", subject.as_str()))
            .collect();
        wanted.extend_from_slice(QUERY_SUBSCRIPTIONS);
        nats.wait_subscribed(before, &wanted).await;
        builder
    }

    /// Starts the builder from a config text and the process options of
    /// `options`, without waiting for readiness. Its `NOTIFY_SOCKET` is
    /// the harness's, unless `options` sets one.
    pub fn spawn_with(config: &str, options: &BuilderOptions) -> Self {
        let path_prefix = options.path_prefix.as_deref();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("builder.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let notify = NotifySocket::bind(dir.path());
        let mut command = Command::new(BIN);
        command
            .arg("builder")
            .arg("--config")
            .arg(&config_path)
            .env("NIX_CONFIG", nix_config())
            .env("RUST_LOG", "homelab_deploy=debug,info")
            .env("NOTIFY_SOCKET", notify.path())
            .args(&options.args)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        match path_prefix {
            Some(prefix) => command.env("PATH", format!("{}:{}", prefix.display(), test_path())),
            None => command.env("PATH", test_path()),
        };
        let child = command.spawn().unwrap();
        Self {
            child: Some(child),
            log,
            notify,
            metrics: metrics_listen(config),
            metrics_up: false,
            spawned_at: Instant::now(),
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Panics with the log if the builder has exited.
    fn assert_running(&mut self, waiting_for: &str) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!(
                "builder exited ({status}) while waiting for {waiting_for}:\n{}",
                self.log_text()
            );
        }
    }

    /// Waits until the builder has told its notify socket that it is
    /// ready and subscribed: `READY=1` before it could mean "up without
    /// NATS", or `STATUS=serving` after that.
    pub async fn wait_serving(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let notified = self.notify.notified();
            let early_ready = notified.ready
                && notified.status.is_none()
                && self.spawned_at.elapsed() < NATS_READY_WAIT;
            if early_ready || notified.status.as_deref() == Some(SERVING) {
                return;
            }
            self.assert_running("READY=1");
            assert!(
                Instant::now() < deadline,
                "builder not ready; notified {:?}:\n{}",
                self.notified(),
                self.log_text()
            );
            // Woken by the next notification, or to check on the process.
            let wake = deadline.min(Instant::now() + Duration::from_millis(200));
            self.notify.next(wake).await;
        }
    }

    /// Everything the builder has told its notify socket so far.
    pub fn notified(&mut self) -> Notified {
        self.notify.notified().clone()
    }

    /// The address the metrics endpoint listens on (`[metrics] listen`,
    /// a fixed port), once it accepts connections.
    pub async fn metrics_addr(&mut self) -> String {
        let addr = self
            .metrics
            .clone()
            .expect("the config has no fixed [metrics] listen address");
        let deadline = Instant::now() + WAIT;
        while !self.metrics_up {
            self.metrics_up = tokio::net::TcpStream::connect(&addr).await.is_ok();
            if !self.metrics_up {
                self.assert_running("the metrics endpoint");
                assert!(
                    Instant::now() < deadline,
                    "metrics never listened on {addr}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        addr
    }

    /// Waits until the builder has said `STOPPING=1` (after SIGTERM).
    pub async fn wait_stopping(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.notify.notified().stopping {
            self.assert_running("STOPPING=1");
            assert!(
                Instant::now() < deadline,
                "builder never said STOPPING=1:\n{}",
                self.log_text()
            );
            let wake = deadline.min(Instant::now() + Duration::from_millis(200));
            self.notify.next(wake).await;
        }
    }

    /// Waits until `/healthz` says NATS is disconnected (an outage seen).
    pub async fn wait_nats_disconnected(&mut self) {
        let addr = self.metrics_addr().await;
        poll(
            "the builder to see NATS disconnected",
            async || http_get(&addr, "/healthz").await,
            |(_, body)| body.contains(r#""nats":"disconnected""#),
        )
        .await;
    }

    /// Waits until `/metrics` counts `count` finished build requests.
    pub async fn wait_builds_finished(&mut self, count: f64) {
        let addr = self.metrics_addr().await;
        poll(
            &format!("{count} finished builds in the metrics"),
            async || builds_finished(&http_get(&addr, "/metrics").await.1),
            |finished| *finished >= count,
        )
        .await;
    }

    /// Everything the builder logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log otherwise.
    /// For tests whose behaviour is a log line; readiness comes from
    /// [`Builder::wait_serving`].
    pub async fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log_text().contains(needle) {
            self.assert_running(&format!("{needle:?} in the log"));
            assert!(
                Instant::now() < deadline,
                "builder never logged {needle:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the builder with SIGKILL (a crash) and reaps it; the Nix
    /// processes it started live on in their own process groups.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("builder did not exit after SIGTERM:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Finished build requests in a metrics text, whatever their repo and
/// status.
fn builds_finished(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with("homelab_deploy_builder_builds_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `[metrics] listen` of a config text, unless its port is chosen at run
/// time (0).
fn metrics_listen(config: &str) -> Option<String> {
    let config: toml::Table = config.parse().ok()?;
    let listen = config.get("metrics")?.get("listen")?.as_str()?;
    (!listen.ends_with(":0")).then(|| listen.to_owned())
}

impl Drop for Builder {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a nats-server and a builder for `flake` with `options` applied.
pub async fn start_service(
    flake: &Flake,
    configure: impl FnOnce(BuilderOptions) -> BuilderOptions,
) -> (NatsServer, Builder) {
    let nats = NatsServer::start().await;
    let options = configure(BuilderOptions::new(flake));
    let builder = Builder::start(&nats, &options).await;
    (nats, builder)
}
