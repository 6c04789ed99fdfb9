//! A second Nix store reached over SSH: a remote builder on this machine.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use homelab_deploy::nix::NixVersion;

use super::net::free_port;
use super::nix::{nix_config, nix_system, nix_version};
use super::wait::{WAIT, wait_for};

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
    pub async fn start() -> Self {
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
        wait_for("sshd to listen", WAIT, || {
            if let Some(status) = remote.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("sshd exited ({status}):\n{}", remote.log_text());
            }
            remote.log_text().contains("Server listening")
        })
        .await;
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
