//! The Nix the tests run: its PATH, its settings (offline, no sandbox),
//! building plain expressions, and recording the builder's Nix calls.

use super::process::output_ok;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use homelab_deploy::nix::NixVersion;

pub fn require_tool(name: &str) {
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
    let out = output_ok(
        nix_command("nix-build")
            .args(["--no-out-link", "--quiet"])
            .arg(&file),
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
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
