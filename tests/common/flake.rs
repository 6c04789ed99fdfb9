//! Offline fixture flakes in git repositories, built by the real Nix, and
//! one served over HTTP.

use super::process::output_ok;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::net::free_port;
use super::nix::{nix_system, require_tool};
use super::wait::{WAIT, wait_for};

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
    /// Its evaluation holds a list of `million` million numbers at once
    /// (about 60 MB of evaluator memory per million), then builds quickly.
    EvalHeavy { million: u32 },
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
        output_ok(
            Command::new("git")
                .args(args)
                .current_dir(self.path())
                .env("GIT_AUTHOR_NAME", "test")
                .env("GIT_AUTHOR_EMAIL", "test@localhost")
                .env("GIT_COMMITTER_NAME", "test")
                .env("GIT_COMMITTER_EMAIL", "test@localhost")
                .env("GIT_CONFIG_GLOBAL", "/dev/null"),
        )
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
                Host::EvalHeavy { million } => format!(
                    r#"mk "{name}" "echo $marker ${{toString (builtins.foldl' (a: b: a + b) 0 (builtins.genList (i: i) ({million} * 1000000)))}} > $out""#
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

/// A bare copy of a fixture flake's repository (branches and tags) served
/// over git's dumb HTTP protocol on 127.0.0.1; stopped on drop.
pub struct GitOverHttp {
    server: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl GitOverHttp {
    /// Serves `flake`'s repository as `repo.git`.
    pub async fn serve(flake: &Flake) -> Self {
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
        wait_for("the git HTTP server", WAIT, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
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

/// A flake whose host `ns1` references one derivation per entry of its
/// `packages.nix` (name with version, and content), so commits can bump,
/// add and remove packages; host `ns2` builds, or fails while `fail.nix`
/// says `true`. Nothing is committed yet: see [`commit_packages`].
pub fn package_flake() -> Flake {
    Flake::with_source(|salt, system| {
        format!(
            r#"{{
  outputs = {{ self }}:
    let
      system = "{system}";
      salt = "{salt}";
      drv = name: script: deps: derivation {{
        inherit name system salt deps;
        builder = "/bin/sh";
        args = [ "-c" script ];
      }};
      packages = map (p: drv p.name "echo ${{p.content}} > $out" [ ]) (import ./packages.nix);
      fail = import ./fail.nix;
    in {{
      nixosConfigurations.ns1.config.system.build.toplevel =
        drv "nixos-system-ns1" "echo $deps > $out" packages;
      nixosConfigurations.ns2.config.system.build.toplevel =
        drv "nixos-system-ns2"
          (if fail then "echo ns2 cannot build >&2; exit 3" else "echo ok > $out") [ ];
    }};
}}
"#
        )
    })
}

/// Commits `packages` (name-version, content) as a [`package_flake`]'s
/// package list, and whether its `ns2` fails.
pub fn commit_packages(flake: &Flake, packages: &[(&str, &str)], ns2_fails: bool, message: &str) {
    let list: String = packages
        .iter()
        .map(|(name, content)| format!("  {{ name = \"{name}\"; content = \"{content}\"; }}\n"))
        .collect();
    std::fs::write(flake.path().join("packages.nix"), format!("[\n{list}]\n")).unwrap();
    std::fs::write(flake.path().join("fail.nix"), format!("{ns2_fails}\n")).unwrap();
    flake.git(&["add", "-A"]);
    flake.git(&["commit", "-q", "-m", message]);
}
