//! Connecting to NATS: server URLs, NKey seed or `.creds` authentication,
//! and the connection's state as a [`watch`] channel.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, Event, ServerAddr};
use thiserror::Error;
use tokio::sync::watch;

/// How to authenticate to the server.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    /// No credentials (a server without authorization, or tests).
    #[default]
    None,
    /// An NKey user seed file.
    NkeySeedFile(PathBuf),
    /// A `.creds` file with a user JWT and seed.
    CredentialsFile(PathBuf),
}

/// TLS files beyond the system's trust roots.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificate to verify the server with.
    pub ca: Option<PathBuf>,
    /// Client certificate and key.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Everything needed to open a connection.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// Server URLs (`nats://`, `tls://`, ...); any of them will do.
    pub urls: Vec<String>,
    /// Credentials.
    pub auth: Auth,
    /// TLS trust and client certificate.
    pub tls: TlsFiles,
    /// Connection name shown by the server's monitoring.
    pub name: String,
    /// Keep trying when no server is reachable at start (the daemon) instead
    /// of failing at once (the CLI).
    pub retry_initial_connect: bool,
    /// Messages a subscription holds before the client drops them; `None`
    /// keeps the library's default.
    pub subscription_capacity: Option<usize>,
}

impl ConnectSettings {
    /// The daemon's settings from its `[nats]` config.
    pub fn from_config(config: &crate::config::NatsConfig, name: &str) -> Self {
        Self {
            urls: config.url.to_vec(),
            auth: match (&config.nkey_seed_file, &config.credentials_file) {
                (Some(seed), _) => Auth::NkeySeedFile(seed.clone()),
                (None, Some(creds)) => Auth::CredentialsFile(creds.clone()),
                (None, None) => Auth::None,
            },
            tls: TlsFiles {
                ca: config.tls_ca_file.clone(),
                client: config
                    .tls_cert_file
                    .clone()
                    .zip(config.tls_key_file.clone()),
            },
            name: name.to_owned(),
            retry_initial_connect: true,
            subscription_capacity: None,
        }
    }
}

/// Why no connection could be made.
#[derive(Debug, Error)]
pub enum NatsError {
    #[error("NKey seed file {path}: {source}")]
    SeedUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "NKey seed file {path} is readable by every user; restrict it (chmod 600) before using it"
    )]
    SeedWorldReadable { path: PathBuf },
    #[error(
        "NKey seed file {path} does not hold a valid user seed (a line starting with \"SU\"): {reason}"
    )]
    BadSeed { path: PathBuf, reason: String },
    #[error("credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "credentials file {path} is readable by every user; restrict it (chmod 600) before using it"
    )]
    CredentialsWorldReadable { path: PathBuf },
    #[error(
        "credentials file {path} holds no valid user seed (a line starting with \"SU\" after \"BEGIN USER NKEY SEED\")"
    )]
    CredentialsWithoutSeed { path: PathBuf },
    #[error("invalid NATS server URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to NATS at {urls}: {source}")]
    Connect {
        urls: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

impl NatsError {
    /// Whether the local configuration is at fault (a file, a URL), as
    /// opposed to the server being unreachable or refusing.
    pub fn is_local(&self) -> bool {
        match self {
            Self::SeedUnreadable { .. }
            | Self::SeedWorldReadable { .. }
            | Self::BadSeed { .. }
            | Self::Credentials { .. }
            | Self::CredentialsWorldReadable { .. }
            | Self::CredentialsWithoutSeed { .. }
            | Self::BadUrl { .. } => true,
            Self::Connect { .. } => false,
        }
    }
}

/// Reads a secret file, refusing one that every user on the host can read.
fn read_private(
    path: &Path,
    world_readable: impl FnOnce() -> NatsError,
    unreadable: impl Fn(std::io::Error) -> NatsError,
) -> Result<String, NatsError> {
    let metadata = std::fs::metadata(path).map_err(&unreadable)?;
    if metadata.permissions().mode() & 0o004 != 0 {
        return Err(world_readable());
    }
    std::fs::read_to_string(path).map_err(unreadable)
}

/// Reads an NKey seed file, refusing one that every user on the host can read.
pub fn read_seed(path: &Path) -> Result<String, NatsError> {
    let seed = read_private(
        path,
        || NatsError::SeedWorldReadable {
            path: path.to_owned(),
        },
        |source| NatsError::SeedUnreadable {
            path: path.to_owned(),
            source,
        },
    )?;
    let seed = seed.trim().to_owned();
    nkeys::KeyPair::from_seed(&seed).map_err(|err| NatsError::BadSeed {
        path: path.to_owned(),
        reason: err.to_string(),
    })?;
    Ok(seed)
}

/// Reads the user seed out of a `.creds` file (after its `BEGIN USER NKEY
/// SEED` marker), refusing a file that every user on the host can read.
pub fn read_credentials_seed(path: &Path) -> Result<String, NatsError> {
    let text = read_private(
        path,
        || NatsError::CredentialsWorldReadable {
            path: path.to_owned(),
        },
        |source| NatsError::Credentials {
            path: path.to_owned(),
            source,
        },
    )?;
    text.lines()
        .skip_while(|line| !line.contains("BEGIN USER NKEY SEED"))
        .map(str::trim)
        .find(|line| line.starts_with("SU"))
        .filter(|seed| nkeys::KeyPair::from_seed(seed).is_ok())
        .map(str::to_owned)
        .ok_or_else(|| NatsError::CredentialsWithoutSeed {
            path: path.to_owned(),
        })
}

/// Parses the server URLs.
pub fn server_addrs(urls: &[String]) -> Result<Vec<ServerAddr>, NatsError> {
    urls.iter()
        .map(|url| {
            ServerAddr::from_str(url).map_err(|err| NatsError::BadUrl {
                url: url.clone(),
                reason: err.to_string(),
            })
        })
        .collect()
}

/// Counts messages NATS dropped because the reader fell behind, and logs
/// the count at most once a second.
#[derive(Default)]
struct DropCounter {
    dropped: std::sync::atomic::AtomicU64,
    logged_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl DropCounter {
    fn note(&self) {
        use std::sync::atomic::Ordering;
        self.dropped.fetch_add(1, Ordering::Relaxed);
        let mut logged_at = crate::sync::lock(&self.logged_at);
        if logged_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            *logged_at = Some(std::time::Instant::now());
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                "NATS slow consumer: incoming messages were dropped"
            );
        }
    }
}

/// Time before reconnection attempt `attempts`: quick at first, then at
/// most a second apart, so both the builder and its requesters are back
/// soon after the server returns (replies sent before a requester is back
/// are lost: NATS core keeps nothing).
pub fn reconnect_delay(attempts: usize) -> Duration {
    match attempts {
        0 | 1 => Duration::ZERO,
        n => Duration::from_millis(50u64.saturating_mul(1 << n.min(5))).min(Duration::from_secs(1)),
    }
}

/// The connection's state, as the client's events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionState {
    /// Connected now.
    pub connected: bool,
    /// Connections made so far: the first, then one per reconnection.
    pub connects: u64,
    /// When `connected` last changed.
    pub since: std::time::Instant,
}

impl ConnectionState {
    /// Whether this connection is a reconnection (not the first).
    pub fn is_reconnection(&self) -> bool {
        self.connects > 1
    }

    fn on_event(&mut self, event: &Event) -> bool {
        let connected = match event {
            Event::Connected => true,
            Event::Disconnected | Event::Closed => false,
            _ => return false,
        };
        if connected == self.connected {
            return false;
        }
        self.connected = connected;
        self.connects += u64::from(connected);
        self.since = std::time::Instant::now();
        true
    }
}

/// An open connection and a live view of its state.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The client.
    pub client: async_nats::Client,
    /// Changes whenever the client connects or loses its connection.
    pub state: watch::Receiver<ConnectionState>,
    /// Signs messages with the NKey the connection authenticates with
    /// (none without one).
    pub signer: Option<Arc<crate::signing::Signer>>,
}

/// Opens a connection. With `retry_initial_connect` this returns at once
/// and the state says when the server is reached.
pub async fn connect(settings: &ConnectSettings) -> Result<Connection, NatsError> {
    let addrs = server_addrs(&settings.urls)?;
    let (mut options, seed) = match &settings.auth {
        Auth::None => (ConnectOptions::new(), None),
        Auth::NkeySeedFile(path) => {
            let seed = read_seed(path)?;
            (ConnectOptions::with_nkey(seed.clone()), Some(seed))
        }
        Auth::CredentialsFile(path) => {
            let seed = read_credentials_seed(path)?;
            let options = ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|source| NatsError::Credentials {
                    path: path.clone(),
                    source,
                })?;
            (options, Some(seed))
        }
    };
    // The seed was checked as it was read.
    let signer = seed
        .and_then(|seed| crate::signing::Signer::from_seed(&seed).ok())
        .map(Arc::new);
    let (state, watched) = watch::channel(ConnectionState {
        connected: false,
        connects: 0,
        since: std::time::Instant::now(),
    });
    let state = Arc::new(state);
    let slow_consumer = Arc::new(DropCounter::default());
    options = options
        .name(&settings.name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback({
            let state = Arc::clone(&state);
            move |event| {
                let state = Arc::clone(&state);
                let slow_consumer = Arc::clone(&slow_consumer);
                async move {
                    match &event {
                        Event::Connected => tracing::info!("connected to NATS"),
                        Event::Disconnected => {
                            tracing::warn!("disconnected from NATS; reconnecting")
                        }
                        Event::ServerError(err) => tracing::warn!(%err, "NATS server error"),
                        Event::ClientError(err) => tracing::warn!(%err, "NATS client error"),
                        // One event per dropped message: counted, logged once a second.
                        Event::SlowConsumer(_) => slow_consumer.note(),
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                    state.send_if_modified(|state| state.on_event(&event));
                }
            }
        });
    if settings.retry_initial_connect {
        options = options
            .retry_on_initial_connect()
            // Keep retrying, but never leave a recovered server unused for long.
            .reconnect_delay_callback(reconnect_delay);
    } else {
        options = options.reconnect_delay_callback(reconnect_delay);
    }
    if let Some(capacity) = settings.subscription_capacity {
        options = options.subscription_capacity(capacity);
    }
    if let Some(ca) = &settings.tls.ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &settings.tls.client {
        options = options
            .add_client_certificate(cert.clone(), key.clone())
            .require_tls(true);
    }
    if settings.urls.iter().any(|url| url.starts_with("tls://")) {
        options = options.require_tls(true);
    }
    let client = options
        .connect(addrs)
        .await
        .map_err(|source| NatsError::Connect {
            urls: settings.urls.join(", "),
            source,
        })?;
    // A connection made before returning (no retry) is known now; its
    // event, when it comes, changes nothing.
    if client.connection_state() == async_nats::connection::State::Connected {
        state.send_if_modified(|state| state.on_event(&Event::Connected));
    }
    Ok(Connection {
        client,
        state: watched,
        signer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_seed(dir: &Path, content: &str, mode: u32) -> PathBuf {
        let path = dir.join("seed");
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn seeds_are_trimmed_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let pair = nkeys::KeyPair::new_user();
        let seed = pair.seed().unwrap();
        let path = write_seed(dir.path(), &format!("  {seed}\n"), 0o600);
        assert_eq!(read_seed(&path).unwrap(), seed);
    }

    #[test]
    fn world_readable_seeds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let path = write_seed(dir.path(), &seed, 0o644);
        assert!(matches!(
            read_seed(&path),
            Err(NatsError::SeedWorldReadable { .. })
        ));
    }

    #[test]
    fn missing_and_garbage_seeds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_seed(&dir.path().join("absent")),
            Err(NatsError::SeedUnreadable { .. })
        ));
        let path = write_seed(dir.path(), "not a seed", 0o600);
        assert!(matches!(read_seed(&path), Err(NatsError::BadSeed { .. })));
    }

    #[test]
    fn the_seed_is_read_from_a_creds_file_with_a_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\neyJhbGciOi.x.y\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        );
        let path = dir.path().join("user.creds");
        std::fs::write(&path, &creds).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_credentials_seed(&path).unwrap(), seed);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_credentials_seed(&path),
            Err(NatsError::CredentialsWorldReadable { .. })
        ));
        std::fs::write(&path, "-----BEGIN USER NKEY SEED-----\nnot a seed\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_credentials_seed(&path),
            Err(NatsError::CredentialsWithoutSeed { .. })
        ));
    }

    #[test]
    fn reconnects_are_quick_and_at_most_a_second_apart() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert!(reconnect_delay(2) < Duration::from_secs(1));
        assert_eq!(reconnect_delay(50), Duration::from_secs(1));
        assert!((2..60).all(|n| reconnect_delay(n) <= reconnect_delay(n + 1)));
    }

    #[test]
    fn the_state_counts_connections_once_each() {
        let mut state = ConnectionState {
            connected: false,
            connects: 0,
            since: std::time::Instant::now(),
        };
        assert!(state.on_event(&Event::Connected));
        // The first connection's own event after it was already seen.
        assert!(!state.on_event(&Event::Connected));
        assert!(!state.is_reconnection());
        assert!(!state.on_event(&Event::LameDuckMode));
        assert!(state.on_event(&Event::Disconnected));
        assert!(!state.connected);
        assert!(state.on_event(&Event::Connected));
        assert_eq!(state.connects, 2);
        assert!(state.is_reconnection());
    }

    #[test]
    fn urls_are_parsed() {
        assert_eq!(
            server_addrs(&["nats://127.0.0.1:4222".into(), "tls://h:4443".into()])
                .unwrap()
                .len(),
            2
        );
        assert!(server_addrs(&["nats://bad host:1".into()]).is_err());
    }
}
