//! A real nats-server on a free loopback port.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::net::{free_port, http_get};
use super::nix::require_tool;
use super::wait::{WAIT, poll};

/// A nats-server child process on 127.0.0.1; killed on drop.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    /// The server's monitoring port (`/connz`), on 127.0.0.1 too.
    monitor: u16,
    config: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server on a free port (see [`free_port`]).
    pub async fn start() -> Self {
        Self::start_with(None, None).await
    }

    /// Starts a server with a config file (authorization etc.).
    pub async fn start_with_config(config: &str) -> Self {
        Self::start_with(Some(config), None).await
    }

    /// Starts a server on a given port.
    pub async fn start_on(port: u16, config: Option<&str>) -> Self {
        Self::start_with(config, Some(port)).await
    }

    async fn start_with(config: Option<&str>, port: Option<u16>) -> Self {
        require_tool("nats-server");
        let dir = tempfile::tempdir().unwrap();
        let config_path = config.map(|text| {
            let path = dir.path().join("nats.conf");
            std::fs::write(&path, text).unwrap();
            path
        });
        let port = port.unwrap_or_else(free_port);
        let monitor = free_port();
        let child = spawn_nats(config_path.as_deref(), port, monitor, dir.path()).await;
        Self {
            child: Some(child),
            port,
            monitor,
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
    pub async fn restart(&mut self) {
        self.stop();
        let child = spawn_nats(
            self.config.as_deref(),
            self.port,
            self.monitor,
            self._dir.path(),
        )
        .await;
        self.child = Some(child);
    }

    /// The client connections the server has open, with their
    /// subscriptions, as its monitoring endpoint lists them.
    pub async fn connections(&self) -> Vec<ClientConnection> {
        let (status, body) = http_get(
            &format!("127.0.0.1:{}", self.monitor),
            "/connz?subs=1&limit=100000",
        )
        .await;
        assert_eq!(status, 200, "nats-server /connz: {body}");
        let connz: serde_json::Value = serde_json::from_str(&body).unwrap();
        connz["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|connection| ClientConnection {
                cid: connection["cid"].as_u64().unwrap(),
                name: connection["name"].as_str().unwrap_or_default().to_owned(),
                subscriptions: connection["subscriptions_list"]
                    .as_array()
                    .map(|subjects| {
                        subjects
                            .iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The highest client id the server has given out to an open
    /// connection (0 if none): connections made later have higher ones.
    pub async fn last_client_id(&self) -> u64 {
        self.connections()
            .await
            .iter()
            .map(|c| c.cid)
            .max()
            .unwrap_or(0)
    }

    /// Waits until the server itself holds, on connections newer than
    /// `after_cid`, every `(connection name, subject)` subscription given.
    /// A client's flush only says its SUB left the socket; the server's
    /// own list says a publish from any other connection will match it.
    pub async fn wait_subscribed(&self, after_cid: u64, wanted: &[(&str, &str)]) {
        let holds = |connections: &Vec<ClientConnection>| {
            wanted.iter().all(|(name, subject)| {
                connections.iter().any(|c| {
                    c.cid > after_cid
                        && c.name == *name
                        && c.subscriptions.iter().any(|s| s == subject)
                })
            })
        };
        let what = format!("nats-server to hold {wanted:?} after cid {after_cid}");
        poll(&what, async || self.connections().await, holds).await;
    }

    /// A client connection for the test itself.
    pub async fn connect(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }
}

/// One client connection as nats-server's `/connz` lists it.
#[derive(Debug)]
pub struct ClientConnection {
    pub cid: u64,
    pub name: String,
    pub subscriptions: Vec<String>,
}

/// Starts nats-server and waits until it says it listens (its stderr,
/// read by a thread, is copied to a log file in `dir`).
async fn spawn_nats(config: Option<&Path>, port: u16, monitor: u16, dir: &Path) -> Child {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut command = Command::new("nats-server");
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        command.args(["-m", &monitor.to_string()]);
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
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
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
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(true)) => return child,
            _ => {
                // A restart can race the old socket's release; retry.
                let _ = child.kill();
                let _ = child.wait();
                assert!(Instant::now() < deadline, "nats-server did not start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
