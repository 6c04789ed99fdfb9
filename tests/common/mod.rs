//! Shared helpers for the integration tests: a real nats-server on a free
//! loopback port, the real builder binary, offline fixture flakes built by
//! the real `nix`, and waiting with deadlines instead of sleeping.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use homelab_deploy::nix::NixVersion;
use homelab_deploy::protocol::{ErrorCode, Event, HostStatus, Reply};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_homelab-deploy");

/// Longest any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `condition` until it holds or `timeout` passes; panics with `what`.
pub async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `probe` until what it returns is `done`, for at most [`WAIT`];
/// returns that value, or panics with `what` and the last value seen.
pub async fn poll<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = probe().await;
        if done(&value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking variant of [`wait_for`] for synchronous helpers.
pub fn wait_for_blocking(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn require_tool(name: &str) {
    assert!(
        which(name).is_some(),
        "`{name}` is not installed; run ./scripts/test, which installs it (Debian: apt-get install nats-server nix-bin)"
    );
}

/// Names the directory holding the `nix` and `nix-store` the tests run
/// (scripts/test sets it to the private Nix 2.26); unset, the first `nix`
/// on PATH.
pub const NIX_BIN_VAR: &str = "HOMELAB_DEPLOY_TEST_NIX_BIN";

/// PATH for every process the tests start: the selected Nix first.
pub fn test_path() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    match std::env::var_os(NIX_BIN_VAR) {
        Some(dir) if !dir.is_empty() => format!("{}:{path}", Path::new(&dir).display()),
        _ => path,
    }
}

/// Where `program` is on the tests' PATH.
pub fn which(program: &str) -> Option<String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .env("PATH", test_path())
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !path.is_empty()).then_some(path)
}

/// `nix --version` of the Nix the tests run, with its path.
pub fn nix_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let Some(nix) = which("nix") else {
            return "none on PATH".to_owned();
        };
        let out = Command::new(&nix).arg("--version").output().unwrap();
        format!("{} ({nix})", String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// Says once per test (cargo shows it with a failing test's output) which
/// Nix the test runs.
fn announce_nix() {
    thread_local! {
        static ANNOUNCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !ANNOUNCED.replace(true) {
        eprintln!("nix: {}", nix_version());
    }
}

/// A command for `program` (`nix`, `nix-store`, ...) of the selected Nix,
/// with the tests' PATH and `NIX_CONFIG`.
pub fn nix_command(program: &str) -> Command {
    let mut command = Command::new(program);
    command
        .env("PATH", test_path())
        .env("NIX_CONFIG", nix_config());
    command
}

/// A directory that lives as long as the test process, for files every test
/// shares (the empty flake registry).
fn shared_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// `NIX_CONFIG` for every Nix the tests start: no binary cache, no global
/// flake registry, nothing leaves the machine.
pub fn nix_config() -> String {
    static REGISTRY: OnceLock<PathBuf> = OnceLock::new();
    let registry = REGISTRY.get_or_init(|| {
        let path = shared_dir().join("registry.json");
        std::fs::write(&path, r#"{"flakes":[],"version":2}"#).unwrap();
        path
    });
    announce_nix();
    // `build-users-group =`: Debian's nix-bin (2.8 and 2.26) defaults to
    // `nixbld`, a group only nix-setup-systemd creates; the tests build as
    // root with single-user Nix.
    // `extra-experimental-features`: Nix 2.26 reads NIX_CONFIG before the
    // command line's `--extra-experimental-features`, and without flakes
    // enabled by then it ignores `flake-registry` (warning on every call).
    // That the builder enables flakes itself is proven by its argv tests.
    let mut config = format!(
        "substituters =\nflake-registry = {}\nsandbox = false\nwarn-dirty = false\n\
         build-users-group =\nextra-experimental-features = nix-command flakes\n",
        registry.display()
    );
    // `build-hook =` and `builders =`: the private Nix 2.26 runs through its
    // own dynamic loader (scripts/lib/nix-versions.sh), so /proc/self/exe is
    // the loader and Nix's build hook (`/proc/self/exe __build-remote`)
    // cannot start; nothing here builds remotely anyway. Nix 2.8 cannot
    // have it: it runs the empty hook command and fails ("unexpected EOF
    // reading a line"), so it keeps its default hook, which declines.
    if NixVersion::parse(nix_version()).is_some_and(|v| v > NixVersion::new(2, 8, 0)) {
        config.push_str("build-hook =\nbuilders =\n");
    }
    config
}

// ---------------------------------------------------------------------------
// nats-server

/// A nats-server child process on 127.0.0.1; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    config: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free port (see [`free_port`]).
    pub fn start() -> Self {
        Self::start_with(None, None)
    }

    /// Starts a server with a config file (authorization etc.).
    pub fn start_with_config(config: &str) -> Self {
        Self::start_with(Some(config), None)
    }

    /// Starts a server on a given port.
    pub fn start_on(port: u16, config: Option<&str>) -> Self {
        Self::start_with(config, Some(port))
    }

    fn start_with(config: Option<&str>, port: Option<u16>) -> Self {
        require_tool("nats-server");
        let dir = tempfile::tempdir().unwrap();
        let config_path = config.map(|text| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, text).unwrap();
            path
        });
        let port = port.unwrap_or_else(free_port);
        let child = spawn_nats(config_path.as_deref(), port, dir.path());
        Self {
            child: Some(child),
            port,
            config: config_path,
            _dir: dir,
        }
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server (an outage).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let child = spawn_nats(self.config.as_deref(), self.port, self._dir.path());
        self.child = Some(child);
    }

    /// A client connection for the test itself.
    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }
}

fn spawn_nats(config: Option<&Path>, port: u16, dir: &Path) -> Child {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut command = Command::new("nats-server");
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(config) = config {
            command.arg("-c").arg(config);
        }
        let log = dir.join(format!("nats-{}.log", std::process::id()));
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            let mut file = std::fs::File::create(log).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = file.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(file, "{line}");
                }
                if !sent && line.contains("Listening for client connections on ") {
                    let _ = tx.send(true);
                    sent = true;
                }
            }
            let _ = tx.send(false);
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(true) => return child,
            _ => {
                // A restart can race the old socket's release; retry.
                let _ = child.kill();
                let _ = child.wait();
                assert!(Instant::now() < deadline, "nats-server did not start");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Fixture flakes

/// The Nix system string of this machine (`x86_64-linux`, `aarch64-linux`).
pub fn nix_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

/// Builds `expression` (plain derivations, no flake) with `nix-build`,
/// writing it to `<dir>/<name>.nix`; returns its out path (not rooted).
pub fn nix_build_expression(dir: &Path, name: &str, expression: &str) -> String {
    let file = dir.join(format!("{name}.nix"));
    std::fs::write(&file, expression).unwrap();
    // The selected Nix's own nix-build, with the settings made for it.
    let out = nix_command("nix-build")
        .args(["--no-out-link", "--quiet"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// What a host of a fixture flake does.
#[derive(Debug, Clone)]
pub enum Host {
    /// Builds quickly, depending on the flake's shared derivation.
    Ok,
    /// Its build fails (exit code 3) after printing a few lines.
    FailBuild,
    /// Its evaluation throws.
    FailEval,
    /// Its build waits until the gate file exists (bounded to ~60 s).
    Gated,
    /// Builds after printing `lines` lines of log.
    Noisy { lines: u32 },
    /// Prints `lines` lines of 1000 characters (a log flood), then builds.
    Flood { lines: u32 },
    /// Its evaluation fails with an error `builtins.tryEval` could not catch.
    FailEvalHard,
    /// Its evaluation waits until the gate file exists: it imports from a
    /// derivation (IFD) whose build waits on the gate.
    EvalGated,
    /// Its build takes `millis` milliseconds (at most a minute).
    Slow { millis: u32 },
}

/// An offline homelab flake in a git repository: plain derivations with
/// `builder = "/bin/sh"`, no nixpkgs. Every fixture has a random salt so its
/// derivations are new to the store and really build.
pub struct Flake {
    dir: tempfile::TempDir,
    pub salt: String,
    hosts: BTreeMap<String, Host>,
    /// A complete flake.nix to use instead of one made from `hosts`.
    source: Option<String>,
}

impl Flake {
    /// A flake with these hosts, committed on branch `master`.
    pub fn new(hosts: &[(&str, Host)]) -> Self {
        require_tool("nix");
        let flake = Self {
            salt: homelab_deploy::protocol::random_hex::<6>(),
            dir: tempfile::tempdir().unwrap(),
            hosts: hosts
                .iter()
                .map(|(name, host)| ((*name).to_owned(), host.clone()))
                .collect(),
            source: None,
        };
        flake.init();
        flake
    }

    /// A flake whose flake.nix is `source(salt, system)`.
    pub fn with_source(source: impl FnOnce(&str, &str) -> String) -> Self {
        require_tool("nix");
        let salt = homelab_deploy::protocol::random_hex::<6>();
        let flake = Self {
            source: Some(source(&salt, &nix_system())),
            salt,
            dir: tempfile::tempdir().unwrap(),
            hosts: BTreeMap::new(),
        };
        flake.init();
        flake
    }

    /// A flake whose `nixosConfigurations` has one quick host under each
    /// attribute name as written in Nix (`ns1`, `"a.b"`, `${expr}`), for
    /// names [`Host`] fixtures cannot have.
    pub fn with_attribute_names(attributes: &[&str]) -> Self {
        let hosts: String = attributes
            .iter()
            .enumerate()
            .map(|(i, attribute)| {
                format!(
                    "        {attribute} = {{ config.system.build.toplevel = mk \"host-{i}\"; }};\n"
                )
            })
            .collect();
        Self::with_source(|salt, system| {
            format!(
                r#"{{
  outputs = {{ self }}:
    let
      mk = name: derivation {{
        inherit name;
        system = "{system}";
        salt = "{salt}";
        builder = "/bin/sh";
        args = [ "-c" "echo built > $out" ];
      }};
    in {{
      nixosConfigurations = {{
{hosts}      }};
    }};
}}
"#
            )
        })
    }

    fn init(&self) {
        let flake = self;
        flake.git(&["init", "-q", "-b", "master"]);
        flake.write_files("initial");
        flake.git(&["add", "-A"]);
        flake.git(&["commit", "-q", "-m", "initial"]);
    }

    /// The usual fixture: two hosts sharing a dependency, one that fails to
    /// build and one that fails to evaluate.
    pub fn homelab() -> Self {
        Self::new(&[
            ("ns1", Host::Ok),
            ("ns2", Host::Ok),
            ("broken-build", Host::FailBuild),
            ("broken-eval", Host::FailEval),
        ])
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `git+file://...` URL of the repository.
    pub fn url(&self) -> String {
        format!("git+file://{}", self.path().display())
    }

    /// The gate file of `Gated` hosts; creating it lets them finish.
    pub fn gate(&self) -> PathBuf {
        self.path().join(".gate")
    }

    pub fn open_gate(&self) {
        std::fs::write(self.gate(), "open").unwrap();
    }

    /// Commits a change that alters every host's output, on the current branch.
    pub fn commit_change(&self, marker: &str) -> String {
        self.write_files(marker);
        self.git(&["commit", "-q", "-am", marker]);
        self.head()
    }

    /// Changes every host's output in the work tree without committing it:
    /// the flake becomes dirty, without a rev.
    pub fn change_uncommitted(&self, marker: &str) {
        self.write_files(marker);
    }

    /// Tags the current head as `tag`.
    pub fn tag(&self, tag: &str) {
        self.git(&["tag", tag]);
    }

    /// Creates `branch` from the current head and switches to it.
    pub fn branch(&self, branch: &str) {
        self.git(&["checkout", "-q", "-b", branch]);
    }

    pub fn checkout(&self, branch: &str) {
        self.git(&["checkout", "-q", branch]);
    }

    /// The commit the current branch points at.
    pub fn head(&self) -> String {
        self.rev_of("HEAD")
    }

    pub fn rev_of(&self, reference: &str) -> String {
        let out = self.git(&["rev-parse", reference]);
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Runs git in the repository; panics with its stderr on failure.
    pub fn git(&self, args: &[&str]) -> Output {
        let out = Command::new("git")
            .args(args)
            .current_dir(self.path())
            .env("GIT_AUTHOR_NAME", "test")
            .env("GIT_AUTHOR_EMAIL", "test@localhost")
            .env("GIT_COMMITTER_NAME", "test")
            .env("GIT_COMMITTER_EMAIL", "test@localhost")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn write_files(&self, marker: &str) {
        std::fs::write(self.path().join("marker.txt"), marker).unwrap();
        std::fs::write(self.path().join("flake.nix"), self.flake_nix()).unwrap();
    }

    fn flake_nix(&self) -> String {
        if let Some(source) = &self.source {
            return source.clone();
        }
        let gate = self.gate();
        let mut hosts = String::new();
        for (name, host) in &self.hosts {
            let toplevel = match host {
                Host::Ok => {
                    format!(r#"mk "{name}" "echo building {name}; echo $marker $shared > $out""#)
                }
                Host::FailBuild => format!(
                    r#"mk "{name}" "echo about to fail; echo 'error detail from {name}'; exit 3""#
                ),
                Host::FailEval => format!(r#"throw "host {name} does not evaluate""#),
                Host::Gated => format!(
                    r#"mk "{name}" "i=0; while [ ! -e {gate} ]; do i=$((i+1)); if [ $i -gt 1200 ]; then exit 7; fi; /bin/sleep 0.05; done; echo $marker > $out""#,
                    gate = gate.display()
                ),
                Host::FailEvalHard => r#"(1 + "not a number")"#.to_owned(),
                Host::Flood { lines } => format!(
                    r#"mk "{name}" "line=$(printf '%01000d' 0); /usr/bin/yes $line | /usr/bin/head -n {lines}; echo $marker > $out""#
                ),
                Host::EvalGated => format!(
                    r#"mk "{name}" (builtins.readFile (mk "{name}-ifd" "i=0; while [ ! -e {gate} ]; do i=$((i+1)); if [ $i -gt 1200 ]; then exit 7; fi; /bin/sleep 0.05; done; echo 'echo evaluated > $out' > $out"))"#,
                    gate = gate.display()
                ),
                Host::Noisy { lines } => format!(
                    r#"mk "{name}" "i=0; while [ $i -lt {lines} ]; do echo log line $i of {name}; i=$((i+1)); done; echo $marker > $out""#
                ),
                Host::Slow { millis } => format!(
                    r#"mk "{name}" "/bin/sleep {}.{:03}; echo $marker > $out""#,
                    millis.min(&60_000) / 1000,
                    millis.min(&60_000) % 1000
                ),
            };
            let _ = writeln!(
                hosts,
                "      {name} = {{ config.system.build.toplevel = {toplevel}; }};"
            );
        }
        format!(
            r#"{{
  description = "homelab-deploy test fixture";
  outputs = {{ self }}:
    let
      system = "{system}";
      salt = "{salt}";
      marker = builtins.readFile ./marker.txt;
      shared = derivation {{
        name = "shared-dep"; inherit system salt;
        builder = "/bin/sh";
        args = [ "-c" "echo shared > $out" ];
      }};
      mk = name: script: derivation {{
        inherit name system salt marker shared;
        builder = "/bin/sh";
        args = [ "-c" script ];
      }};
    in {{
      nixosConfigurations = {{
{hosts}      }};
    }};
}}
"#,
            salt = self.salt,
            system = nix_system()
        )
    }
}

// ---------------------------------------------------------------------------
// A flake served over HTTP

/// A bare copy of a fixture flake's repository (branches and tags) served
/// over git's dumb HTTP protocol on 127.0.0.1; stopped on drop.
pub struct GitOverHttp {
    server: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl GitOverHttp {
    /// Serves `flake`'s repository as `repo.git`.
    pub fn serve(flake: &Flake) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bare = dir.path().join("repo.git");
        flake.git(&["clone", "-q", "--bare", ".", bare.to_str().unwrap()]);
        flake.git(&["--git-dir", bare.to_str().unwrap(), "update-server-info"]);
        let port = free_port();
        let server = Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed to serve a git repository over HTTP");
        wait_for_blocking("the git HTTP server", WAIT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { server, port, dir }
    }

    /// Adds `other`'s master as branch `branch` of the served repository.
    pub fn push_branch(&self, other: &Flake, branch: &str) {
        let bare = self.dir.path().join("repo.git");
        let bare = bare.to_str().unwrap();
        other.git(&["push", "-q", bare, &format!("master:{branch}")]);
        other.git(&["--git-dir", bare, "update-server-info"]);
    }

    /// The repository's flake URL, with `userinfo@` when given.
    pub fn url(&self, userinfo: Option<&str>) -> String {
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        format!("git+http://{userinfo}127.0.0.1:{}/repo.git", self.port)
    }
}

impl Drop for GitOverHttp {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

// ---------------------------------------------------------------------------
// The builder

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

    pub fn config_text(&self, nats_url: &str) -> String {
        let mut text = format!(
            "[nats]\nurl = \"{nats_url}\"\n{}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[builder]\nhost_timeout = \"{}\"\n{}\n[auth]\n{}\n",
            self.extra_nats, self.host_timeout, self.extra_builder, self.auth
        );
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
    _dir: tempfile::TempDir,
}

impl Builder {
    /// Starts the builder and waits until it has subscribed.
    pub fn start(nats: &NatsServer, options: &BuilderOptions) -> Self {
        let mut builder = Self::spawn_with(&options.config_text(&nats.url()), options);
        builder.wait_for_log("builder ready");
        builder
    }

    /// Starts the builder from a config text without waiting for readiness.
    pub fn spawn(config: &str, path_prefix: Option<&Path>) -> Self {
        let options = BuilderOptions {
            host_timeout: String::new(),
            repos: Vec::new(),
            extra_builder: String::new(),
            extra_repo: String::new(),
            path_prefix: path_prefix.map(Path::to_owned),
            env: Vec::new(),
            args: Vec::new(),
            extra_nats: String::new(),
            auth: String::new(),
        };
        Self::spawn_with(config, &options)
    }

    /// Starts the builder from a config text and the process options of
    /// `options`, without waiting for readiness.
    pub fn spawn_with(config: &str, options: &BuilderOptions) -> Self {
        let path_prefix = options.path_prefix.as_deref();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.path().join("builder.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("builder")
            .arg("--config")
            .arg(&config_path)
            .env("NIX_CONFIG", nix_config())
            .env("RUST_LOG", "homelab_deploy=debug,info")
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
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The address the metrics endpoint listens on (from the log).
    pub fn metrics_addr(&mut self) -> String {
        self.wait_for_log("metrics listening");
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("metrics listening"))
            .unwrap();
        let addr = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix("addr="))
            .or_else(|| {
                // JSON logs
                line.split("\"addr\":\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
            })
            .unwrap_or_else(|| panic!("no addr in {line}"));
        addr.trim_matches('"').to_owned()
    }

    /// Everything the builder logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics with the log otherwise.
    pub fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "builder exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "builder never logged {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    /// Kills the builder with SIGKILL (a crash) and reaps it; the Nix
    /// processes it started live on in their own process groups.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("builder did not exit after SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Builder {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A directory with `nix` and `nix-store` wrappers that record every
/// invocation's argv and then run the real program.
pub struct NixRecorder {
    dir: tempfile::TempDir,
}

impl NixRecorder {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for program in ["nix", "nix-store"] {
            let real = which(program).unwrap_or_else(|| panic!("{program} not found"));
            let script = format!(
                // One write per line, so concurrent invocations do not interleave.
                "#!/bin/sh\nline={program}\nfor a in \"$@\"; do line=\"$line$(printf '\\037')$a\"; done\nprintf '%s\\n' \"$line\" >> {log}\nexec {real} \"$@\"\n",
                log = dir.path().join("argv.log").display()
            );
            let path = dir.path().join(program);
            std::fs::write(&path, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Self { dir }
    }

    /// The directory to put first on the builder's PATH.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Every recorded invocation: program name, then its arguments.
    pub fn invocations(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.dir.path().join("argv.log"))
            .unwrap_or_default()
            .lines()
            .map(|line| line.split('\u{1f}').map(str::to_owned).collect())
            .collect()
    }

    /// Invocations whose arguments include `word`.
    pub fn with_arg(&self, word: &str) -> Vec<Vec<String>> {
        self.invocations()
            .into_iter()
            .filter(|argv| argv.iter().any(|a| a == word))
            .collect()
    }

    /// Forgets what was recorded so far.
    pub fn clear(&self) {
        let _ = std::fs::remove_file(self.dir.path().join("argv.log"));
    }
}

/// `GET path` on `addr` over plain HTTP/1.1; returns status and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("no HTTP response in time")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The value of one exact series (`name{labels}`) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A loopback port nothing listens on (at the time of asking), taken from
/// below the kernel's ephemeral range: the ports the kernel hands out by
/// itself, to outgoing connections among others, never collide with it,
/// not even while a test has stopped its server for an outage.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    if ephemeral_low < 10_000 {
        // No room below it: let the kernel pick.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = 8_000;
    let base = ephemeral_low - span;
    // Test binaries run one after the other; each starts elsewhere.
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(base + offset).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {base}..{ephemeral_low}");
}

/// NKey identities of the plan's permission table, and an outsider who
/// may not build; each a seed file and its public key.
pub struct Identities {
    _dir: tempfile::TempDir,
    pub builder: (PathBuf, String),
    pub test_deployer: (PathBuf, String),
    pub admin: (PathBuf, String),
    pub outsider: (PathBuf, String),
}

impl Identities {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            builder: nkey_user(dir.path(), "builder"),
            test_deployer: nkey_user(dir.path(), "test-deployer"),
            admin: nkey_user(dir.path(), "admin"),
            outsider: nkey_user(dir.path(), "outsider"),
            _dir: dir,
        }
    }

    /// The shipped server config `docs/<file>` with these keys, plus a
    /// user that may only publish deploy.test.> (no build rights).
    pub fn server_config(&self, file: &str) -> String {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut text = std::fs::read_to_string(format!("{root}/docs/{file}")).unwrap();
        for (variable, key) in [
            ("BUILDER_NKEY", &self.builder.1),
            ("TEST_DEPLOYER_NKEY", &self.test_deployer.1),
            ("ADMIN_DEPLOYER_NKEY", &self.admin.1),
        ] {
            let start = text.find(&format!("{variable}: \"")).unwrap() + variable.len() + 3;
            let end = start + text[start..].find('"').unwrap();
            text.replace_range(start..end, key);
        }
        let outsider = format!(
            "      {{\n        nkey: \"{}\"\n        permissions {{\n          publish {{ allow: [\"deploy.test.>\"] }}\n          subscribe {{ allow: [\"build.responses.>\"] }}\n        }}\n      }}\n    ]",
            self.outsider.1
        );
        let end = text.rfind("    ]").unwrap();
        text.replace_range(end..end + 5, &outsider);
        text
    }
}

/// A [`Requester`] authenticated with the NKey seed in `seed_file`.
pub async fn connect_as(nats: &NatsServer, seed_file: &Path) -> Requester {
    let seed = std::fs::read_to_string(seed_file).unwrap();
    Requester::with_options(
        &nats.url(),
        async_nats::ConnectOptions::with_nkey(seed.trim().to_owned()),
    )
    .await
}

/// Writes a fresh NKey user seed (mode 0600) into `dir`; returns the seed
/// file and the public key.
pub fn nkey_user(dir: &Path, name: &str) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let pair = nkeys::KeyPair::new_user();
    let path = dir.join(format!("{name}.nk"));
    std::fs::write(&path, pair.seed().unwrap()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, pair.public_key())
}

/// Resident memory of `pid` (`VmRSS`) or its peak (`VmHWM`), in KiB.
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Pids of the direct children of `pid`.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                children.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    children
}

/// Pids of processes whose command line contains `needle`.
pub fn processes_matching(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------
// Talking to the builder as a client

/// One reply with the moment it arrived.
#[derive(Debug, Clone)]
pub struct Timed {
    pub reply: Reply,
    pub at: Instant,
}

/// A raw protocol client for tests.
pub struct Requester {
    pub nats: async_nats::Client,
    next: std::sync::atomic::AtomicU64,
    id: String,
}

/// The events of one request as they arrive.
pub struct Pending {
    pub subscriber: async_nats::Subscriber,
    pub reply_to: String,
}

impl Requester {
    pub async fn new(nats: &NatsServer) -> Self {
        Self::with_options(&nats.url(), async_nats::ConnectOptions::new()).await
    }

    /// A requester connecting with `options` (credentials, reconnect
    /// behaviour), which reconnects as quickly as the CLI does.
    pub async fn with_options(url: &str, options: async_nats::ConnectOptions) -> Self {
        let nats = options
            .reconnect_delay_callback(homelab_deploy::nats::reconnect_delay)
            .connect(url)
            .await
            .unwrap();
        Self {
            nats,
            next: Default::default(),
            id: homelab_deploy::protocol::random_hex::<4>(),
        }
    }

    /// A fresh reply subject under build.responses.
    pub fn reply_subject(&self) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("build.responses.test{}.{n}", self.id)
    }

    /// Publishes `body` on `subject` with a fresh reply subject.
    pub async fn send(&self, subject: &str, body: &str) -> Pending {
        let reply_to = self.reply_subject();
        let subscriber = self.nats.subscribe(reply_to.clone()).await.unwrap();
        self.nats
            .publish_with_reply(subject.to_owned(), reply_to.clone(), body.to_owned().into())
            .await
            .unwrap();
        self.nats.flush().await.unwrap();
        Pending {
            subscriber,
            reply_to,
        }
    }

    /// Sends a build request (no options) and waits until its first host
    /// has started; returns the request and the events so far.
    pub async fn send_until_started(&self, subject: &str) -> (Pending, Vec<Timed>) {
        let mut pending = self.send(subject, "").await;
        let events = pending
            .until(|e| matches!(e, Event::HostStarted { .. }))
            .await;
        (pending, events)
    }

    /// Asks `build.status` and returns the builder's report.
    pub async fn status(&self) -> homelab_deploy::protocol::BuilderStatus {
        let mut pending = self.send("build.status", "").await;
        let message = tokio::time::timeout(WAIT, pending.subscriber.next())
            .await
            .expect("no status reply in time")
            .expect("subscription closed");
        let homelab_deploy::protocol::StatusEvent::Status(status) =
            serde_json::from_slice(&message.payload).unwrap();
        status
    }

    /// Sends a request and collects its events up to the terminal one.
    pub async fn build(&self, subject: &str, body: &str) -> Vec<Reply> {
        let mut pending = self.send(subject, body).await;
        pending
            .until_terminal()
            .await
            .into_iter()
            .map(|t| t.reply)
            .collect()
    }
}

impl Pending {
    /// The next reply, failing the test after [`WAIT`].
    pub async fn next(&mut self) -> Timed {
        let message = tokio::time::timeout(WAIT, self.subscriber.next())
            .await
            .expect("timed out waiting for a reply")
            .expect("subscription closed");
        let reply: Reply = serde_json::from_slice(&message.payload).unwrap_or_else(|err| {
            panic!(
                "malformed reply {err}: {}",
                String::from_utf8_lossy(&message.payload)
            )
        });
        Timed {
            reply,
            at: Instant::now(),
        }
    }

    /// Collects replies up to and including the terminal one.
    pub async fn until_terminal(&mut self) -> Vec<Timed> {
        let mut replies = Vec::new();
        loop {
            let timed = self.next().await;
            let terminal = timed.reply.is_terminal();
            replies.push(timed);
            if terminal {
                return replies;
            }
        }
    }

    /// Collects replies until one matches `stop` (inclusive).
    pub async fn until(&mut self, stop: impl Fn(&Event) -> bool) -> Vec<Timed> {
        let mut replies = Vec::new();
        loop {
            let timed = self.next().await;
            let matched = stop(&timed.reply.event);
            replies.push(timed);
            if matched {
                return replies;
            }
        }
    }

    /// Whether a reply is already waiting (without blocking).
    pub fn try_next(&mut self) -> Option<Reply> {
        use futures_util::FutureExt;
        let message = self.subscriber.next().now_or_never()??;
        serde_json::from_slice(&message.payload).ok()
    }
}

/// What `host_finished` said about one host.
#[derive(Debug, Clone)]
pub struct HostOutcome {
    pub host: String,
    pub status: HostStatus,
    pub cached: bool,
    pub code: Option<ErrorCode>,
    pub message: String,
    pub out_path: Option<String>,
    /// Derivations built on each machine.
    pub machines: BTreeMap<String, u64>,
}

/// Every `host_finished` of a reply sequence, in order.
pub fn host_outcomes(replies: &[Reply]) -> Vec<HostOutcome> {
    replies
        .iter()
        .filter_map(|r| match &r.event {
            Event::HostFinished {
                host,
                status,
                cached,
                error,
                out_path,
                machines,
                ..
            } => Some(HostOutcome {
                host: host.clone(),
                status: *status,
                cached: *cached,
                code: error.as_ref().map(|e| e.code),
                message: error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default(),
                out_path: out_path.clone(),
                machines: machines.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Every line of every `log` event, in order.
pub fn log_lines(replies: &[Reply]) -> Vec<&String> {
    replies
        .iter()
        .filter_map(|r| match &r.event {
            Event::Log { lines, .. } => Some(lines),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The names of events, in order.
pub fn event_names(replies: &[Reply]) -> Vec<&'static str> {
    replies.iter().map(|r| r.event.name()).collect()
}

/// The terminal event of a reply sequence.
pub fn terminal(replies: &[Reply]) -> &Event {
    &replies.last().expect("no replies").event
}

/// `homelab-deploy <args>` against the test's NATS URL, with no key or
/// builder key from the environment.
fn cli_command(nats_url: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(args)
        .env("HOMELAB_DEPLOY_NATS_URL", nats_url)
        .env("PATH", test_path())
        .env_remove("HOMELAB_DEPLOY_NKEY_FILE")
        .env_remove("HOMELAB_DEPLOY_CREDS_FILE")
        .env_remove("HOMELAB_DEPLOY_BUILDER_KEY")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Starts the CLI with the test's NATS URL, its output piped, without
/// waiting.
pub fn spawn_cli(nats_url: &str, args: &[&str]) -> tokio::process::Child {
    cli_command(nats_url, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs the CLI with the test's NATS URL; bounded by [`WAIT`].
pub async fn run_cli(nats_url: &str, args: &[&str]) -> Output {
    let output = cli_command(nats_url, args).output();
    tokio::time::timeout(WAIT, output)
        .await
        .unwrap_or_else(|_| panic!("CLI {args:?} did not exit in time"))
        .unwrap()
}

/// Stdout and stderr of a CLI run, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "exit {:?}
--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Starts a nats-server and a builder for `flake` with `options` applied.
pub fn start_service(
    flake: &Flake,
    configure: impl FnOnce(BuilderOptions) -> BuilderOptions,
) -> (NatsServer, Builder) {
    let nats = NatsServer::start();
    let options = configure(BuilderOptions::new(flake));
    let builder = Builder::start(&nats, &options);
    (nats, builder)
}

// ---------------------------------------------------------------------------
// A second Nix store reached over SSH (a remote builder on this machine)

/// A second "machine" for Nix's distributed builds: `sshd` on 127.0.0.1
/// and a free port, in a private mount namespace with an empty directory
/// bind-mounted over `/nix`, so the `nix-daemon --stdio` each connection
/// runs has its own store and database. Stopped on drop.
pub struct RemoteStore {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// Where Debian's openssh-server puts the daemon (outside a user's PATH).
const SSHD: &str = "/usr/sbin/sshd";

impl RemoteStore {
    /// Whether remote builds can be tested with the selected Nix: the
    /// private Nix 2.26 runs through its own loader and cannot start the
    /// build hook; `None` when they can, else why not.
    pub fn unsupported() -> Option<String> {
        if !Path::new(SSHD).exists() {
            return Some(format!(
                "{SSHD} is missing (scripts/test installs openssh-server)"
            ));
        }
        NixVersion::parse(nix_version())
            .is_some_and(|v| v > NixVersion::new(2, 8, 0))
            .then(|| {
                format!(
                    "{} cannot run Nix's build hook here (it runs through a private loader, so /proc/self/exe is not nix)",
                    nix_version()
                )
            })
    }

    /// Starts sshd and waits until it listens.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("nix")).unwrap();
        for key in ["host", "client"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(root.join(key))
                .status()
                .unwrap();
            assert!(status.success(), "ssh-keygen failed");
        }
        // The remote Nix gets the tests' settings (no sandbox, no binary
        // cache, no nixbld group) whatever command the client asks for.
        let daemon = root.join("daemon.sh");
        std::fs::write(
            &daemon,
            format!(
                "#!/bin/sh\nexport NIX_CONFIG='{}'\nexec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
                nix_config()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&daemon, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let port = free_port();
        let config = root.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {root}/host\n\
                 AuthorizedKeysFile {root}/client.pub\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\n\
                 UsePAM no\nPidFile none\nForceCommand {daemon}\n",
                root = root.display(),
                daemon = daemon.display(),
            ),
        )
        .unwrap();
        let log = root.join("sshd.log");
        let script = format!(
            "mkdir -p /run/sshd && mount --bind '{}' /nix && exec {SSHD} -D -e -f '{}'",
            root.join("nix").display(),
            config.display()
        );
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut remote = Self {
            child: Some(child),
            port,
            dir,
        };
        wait_for_blocking("sshd to listen", WAIT, || {
            if let Some(status) = remote.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("sshd exited ({status}):\n{}", remote.log_text());
            }
            remote.log_text().contains("Server listening")
        });
        remote
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// The store URI Nix reaches it by.
    pub fn uri(&self) -> String {
        format!(
            "ssh-ng://root@127.0.0.1?ssh-key={}",
            self.dir.path().join("client").display()
        )
    }

    /// `NIX_SSHOPTS` for the builder's Nix: the port, and no host key
    /// checking for a server that exists for one test.
    pub fn ssh_opts(&self) -> String {
        format!(
            "-p {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            self.port
        )
    }

    /// `NIX_CONFIG` for a builder that sends builds here: the tests'
    /// settings plus this machine in `builders` (4 jobs), and with
    /// `local_jobs = 0` no local builds at all.
    pub fn nix_config(&self, local_jobs: Option<u32>) -> String {
        let mut config = nix_config();
        let _ = writeln!(
            config,
            "builders = {} {} - 4 1\nbuilders-use-substitutes = true",
            self.uri(),
            nix_system()
        );
        if let Some(jobs) = local_jobs {
            let _ = writeln!(config, "max-jobs = {jobs}");
        }
        config
    }

    /// Whether `store_path` exists in this store.
    pub fn has(&self, store_path: &str) -> bool {
        let relative = store_path.trim_start_matches('/');
        self.dir.path().join(relative).exists()
    }

    /// Stops sshd: the machine is down.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RemoteStore {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Floods

/// A connection that publishes messages as fast as loopback takes them, in
/// plain NATS protocol (no client library to slow it down), while it reads
/// and throws away whatever the server sends it. Stopped on drop.
pub struct Flood {
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    writer: tokio::task::JoinHandle<std::io::Result<Duration>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Flood {
    /// Publishes `count` messages on `subject`, message `i` with the reply
    /// subject `{reply_prefix}.{i}` and the body `bodies[i % bodies.len()]`.
    /// With `listen`, the connection also subscribes to `{reply_prefix}.>`,
    /// so the server must deliver every answer to it, as to an attacker
    /// who reads them.
    pub async fn start(
        nats: &NatsServer,
        count: usize,
        subject: &str,
        reply_prefix: &str,
        bodies: &[&[u8]],
        listen: bool,
    ) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

        let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port))
            .await
            .unwrap();
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::new(read);
        let mut line = String::new();
        read.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("INFO "), "{line}");
        let mut hello =
            String::from("CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"flood\"}\r\n");
        if listen {
            let _ = write!(hello, "SUB {reply_prefix}.> 1\r\n");
        }
        hello.push_str("PING\r\n");
        write.write_all(hello.as_bytes()).await.unwrap();
        line.clear();
        tokio::time::timeout(WAIT, read.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            line, "PONG\r\n",
            "the server refused the flood's connection"
        );

        let received = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn({
            let received = Arc::clone(&received);
            async move {
                let mut buffer = vec![0; 1 << 16];
                while let Ok(n @ 1..) = read.read(&mut buffer).await {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
        let sent = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn({
            let sent = Arc::clone(&sent);
            let (subject, reply_prefix) = (subject.to_owned(), reply_prefix.to_owned());
            let bodies: Vec<Vec<u8>> = bodies.iter().map(|b| b.to_vec()).collect();
            async move {
                const CHUNK: usize = 4096;
                let started = Instant::now();
                let mut chunk = Vec::new();
                for start in (0..count).step_by(CHUNK) {
                    chunk.clear();
                    for i in start..count.min(start + CHUNK) {
                        let body = &bodies[i % bodies.len()];
                        let head = format!("PUB {subject} {reply_prefix}.{i} {}\r\n", body.len());
                        chunk.extend_from_slice(head.as_bytes());
                        chunk.extend_from_slice(body);
                        chunk.extend_from_slice(b"\r\n");
                    }
                    write.write_all(&chunk).await?;
                    sent.store(count.min(start + CHUNK), Ordering::Relaxed);
                }
                write.flush().await?;
                Ok(started.elapsed())
            }
        });
        Self {
            sent,
            received,
            writer,
            reader,
        }
    }

    /// Messages handed to the server so far.
    pub fn sent(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes the server delivered to the flood's connection so far.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until `count` messages are sent.
    pub async fn wait_sent(&self, count: usize, timeout: Duration) {
        wait_for(&format!("{count} flood messages sent"), timeout, || {
            self.sent() >= count
        })
        .await;
    }

    /// Waits (at most [`WAIT`]) until every message is sent, then closes
    /// the connection; returns how many were sent, in how long.
    pub async fn finish(mut self) -> (usize, Duration) {
        let took = tokio::time::timeout(WAIT, &mut self.writer)
            .await
            .expect("the flood did not end in time")
            .unwrap()
            .expect("the server closed the flood's connection");
        (self.sent(), took)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.writer.abort();
        self.reader.abort();
    }
}
