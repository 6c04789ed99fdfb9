//! The builder's state as systemd sees it: a unix datagram socket passed
//! to the builder as `NOTIFY_SOCKET`, and the `KEY=value` lines it sends
//! there (`READY=1`, `STATUS=...`, `STOPPING=1`).

use std::path::{Path, PathBuf};

use tokio::net::UnixDatagram;

/// Everything the builder has told its notify socket so far.
#[derive(Debug, Clone, Default)]
pub struct Notified {
    /// `READY=1` came.
    pub ready: bool,
    /// The last `STATUS=` line.
    pub status: Option<String>,
    /// `STOPPING=1` came.
    pub stopping: bool,
}

impl Notified {
    fn apply(&mut self, datagram: &str) {
        for line in datagram.lines() {
            match line.split_once('=') {
                Some(("READY", "1")) => self.ready = true,
                Some(("STOPPING", "1")) => self.stopping = true,
                Some(("STATUS", status)) => self.status = Some(status.to_owned()),
                _ => {}
            }
        }
    }
}

/// The status the builder reports once subscribed after a wait for NATS
/// (src/builder); subscribed at once, it says `READY=1` alone.
pub const SERVING: &str = "serving";

/// A bound notify socket; the datagrams are read as they are awaited.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    notified: Notified,
}

impl NotifySocket {
    /// Binds `notify.sock` in `dir` (which must outlive the socket).
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        Self {
            socket,
            path,
            notified: Notified::default(),
        }
    }

    /// The value for `NOTIFY_SOCKET`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What came so far, reading whatever is queued without waiting.
    pub fn notified(&mut self) -> &Notified {
        let mut buffer = [0; 4096];
        while let Ok(n) = self.socket.try_recv(&mut buffer) {
            self.notified.apply(&String::from_utf8_lossy(&buffer[..n]));
        }
        &self.notified
    }

    /// Waits for the next datagram (at most until `deadline`); `false` if
    /// none came in time.
    pub async fn next(&mut self, deadline: tokio::time::Instant) -> bool {
        let mut buffer = [0; 4096];
        match tokio::time::timeout_at(deadline, self.socket.recv(&mut buffer)).await {
            Ok(Ok(n)) => {
                self.notified.apply(&String::from_utf8_lossy(&buffer[..n]));
                true
            }
            Ok(Err(err)) => panic!("reading the notify socket: {err}"),
            Err(_) => false,
        }
    }
}
