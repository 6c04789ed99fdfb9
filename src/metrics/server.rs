//! The tiny HTTP server of `GET /metrics`, `GET /healthz` and, when the
//! web is on, the pages and the API ([`crate::web`]), hardened so
//! idle or slow clients can neither exhaust the builder's file descriptors
//! nor keep scrapes out (see [`Limits`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::MetricsError;
use super::slots::{self, Refusal, Slot, Slots};
use crate::web::{EVENT_STREAM_KEEPALIVE, EVENT_STREAM_LIFETIME, EventStream, Web, WebResponse};

/// Whether the service is healthy, and why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub nats_connected: bool,
    pub worker_alive: bool,
}

impl Health {
    fn body(self) -> (StatusCode, String) {
        let healthy = self.nats_connected && self.worker_alive;
        let body = serde_json::json!({
            "status": if healthy { "ok" } else { "unhealthy" },
            "nats": if self.nats_connected { "connected" } else { "disconnected" },
            "worker": if self.worker_alive { "running" } else { "stopped" },
        });
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body.to_string())
    }
}

/// What the HTTP endpoint serves.
pub trait Exporter: Send + Sync + 'static {
    /// The metrics, current as of now. Sent as they are: credentials in
    /// label values must be masked already (see [`super::Masked`]).
    fn metrics(&self) -> String;
    /// The service's health.
    fn health(&self) -> Health;
}

/// Binds the metrics address (so a taken port fails the start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Bounds on the HTTP server, so idle or slow clients cannot take the
/// builder's file descriptors (which every `nix` it starts needs) nor keep
/// scrapes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once. One more takes the slot of the
    /// connection that has waited longest without a complete request head;
    /// if every one is being answered, it is closed as soon as accepted.
    pub connections: usize,
    /// Connections served at once from one source (an IPv4 address, an
    /// IPv6 /64); one more is closed as soon as accepted.
    pub per_source: usize,
    /// Longest wait for a request's headers, the first or the next on a
    /// kept-alive connection; then the connection is closed.
    pub header_read: Duration,
    /// Longest any connection stays open, whatever it does.
    pub lifetime: Duration,
    /// First pause after a failed `accept` (out of file descriptors, say);
    /// it doubles on each failure in a row, up to `max_accept_pause`.
    pub accept_pause: Duration,
    /// Longest pause after failed `accept`s.
    pub max_accept_pause: Duration,
}

/// The limits the builder serves with.
pub const LIMITS: Limits = Limits {
    connections: 64,
    per_source: 8,
    header_read: Duration::from_secs(5),
    lifetime: Duration::from_secs(60),
    accept_pause: Duration::from_millis(100),
    max_accept_pause: Duration::from_secs(1),
};

/// Serves `/metrics`, `/healthz` and, with `web`, the pages and the API
/// until `shutdown`, within [`LIMITS`].
pub async fn serve(
    listener: TcpListener,
    exporter: Arc<dyn Exporter>,
    web: Option<Arc<Web>>,
    shutdown: CancellationToken,
) {
    serve_with(listener, exporter, web, LIMITS, shutdown).await;
}

/// Serves `/metrics`, `/healthz` and, with `web`, the pages and the API
/// until `shutdown`, within `limits`.
pub async fn serve_with(
    listener: TcpListener,
    exporter: Arc<dyn Exporter>,
    web: Option<Arc<Web>>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots: slots::Shared = Arc::new(Mutex::new(Slots::new(
        limits.connections,
        limits.per_source,
    )));
    let mut connections = tokio::task::JoinSet::new();
    let mut pause = AcceptPause::new(&limits);
    let mut pressure = Pressure::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        // Reap finished connections as we go.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                pause.reset();
                accepted
            }
            Err(err) => {
                // Out of file descriptors the same error comes back at once:
                // pause instead of spinning (and give Nix its fds back).
                let wait = pause.next();
                tracing::warn!(
                    %err,
                    pause = %humantime::format_duration(wait),
                    "metrics: cannot accept a connection"
                );
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let admitted = slots::lock(&slots).admit(peer.ip(), Instant::now(), &shutdown);
        let admitted = match admitted {
            Ok(admitted) => admitted,
            Err(refusal) => {
                // Closed at once: a waiting connection would hold an fd too.
                pressure.record(Pressed::Refused(refusal), &limits);
                drop(stream);
                continue;
            }
        };
        if admitted.evicted {
            pressure.record(Pressed::Evicted, &limits);
        } else {
            pressure.relieve();
        }
        let slot = Slot::new(Arc::clone(&slots), admitted.id);
        let exporter = Arc::clone(&exporter);
        connections.spawn(serve_connection(
            stream,
            slot,
            admitted.evict,
            Routes {
                exporter,
                web: web.clone(),
            },
            limits,
        ));
    }
    connections.shutdown().await;
}

/// What the server answers with.
#[derive(Clone)]
struct Routes {
    exporter: Arc<dyn Exporter>,
    web: Option<Arc<Web>>,
}

/// Serves one connection in `slot` until it ends, outlives its lifetime or
/// `evict` is cancelled. A connection carrying `/api/v1/events` lives up
/// to [`EVENT_STREAM_LIFETIME`] instead (such streams are few: see
/// [`crate::web::MAX_EVENT_STREAMS`]).
async fn serve_connection(
    stream: tokio::net::TcpStream,
    slot: Slot,
    evict: CancellationToken,
    routes: Routes,
    limits: Limits,
) {
    let _held = slot.hold();
    let io = TokioIo::new(slot.watch(stream));
    let streaming = Arc::new(AtomicBool::new(false));
    let service = service_fn({
        let slot = slot.clone();
        let streaming = Arc::clone(&streaming);
        move |request: Request<Incoming>| {
            slot.head_received();
            let (slot, routes, streaming) = (slot.clone(), routes.clone(), Arc::clone(&streaming));
            async move {
                let (response, events) = respond(&request, &routes).await;
                if events {
                    streaming.store(true, Ordering::Relaxed);
                }
                Ok::<_, Infallible>(response.map(|body| slot.answer(body)))
            }
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(io, service);
    let opened = tokio::time::Instant::now();
    let lifetime = tokio::time::sleep(limits.lifetime);
    tokio::pin!(connection, lifetime);
    loop {
        tokio::select! {
            _ = &mut connection => break,
            () = &mut lifetime => {
                let longer = opened + EVENT_STREAM_LIFETIME;
                if streaming.load(Ordering::Relaxed) && tokio::time::Instant::now() < longer {
                    lifetime.as_mut().reset(longer);
                    continue;
                }
                break;
            }
            () = evict.cancelled() => break,
        }
    }
}

/// What the server did to a connection because of the limits.
#[derive(Debug, Clone, Copy)]
enum Pressed {
    Evicted,
    Refused(Refusal),
}

/// Counts evictions and refusals while the server is under pressure, to log
/// one line when it starts and one when it ends rather than one a
/// connection.
#[derive(Debug, Default)]
struct Pressure {
    evicted: u64,
    refused_full: u64,
    refused_source: u64,
}

impl Pressure {
    fn record(&mut self, pressed: Pressed, limits: &Limits) {
        if self.evicted + self.refused_full + self.refused_source == 0 {
            tracing::warn!(
                limit = limits.connections,
                per_source = limits.per_source,
                "metrics: too many connections; closing silent ones that waited longest, \
                 or new ones, until some end"
            );
        }
        match pressed {
            Pressed::Evicted => self.evicted += 1,
            Pressed::Refused(Refusal::Full) => self.refused_full += 1,
            Pressed::Refused(Refusal::Source) => self.refused_source += 1,
        }
    }

    /// A connection was given a free slot.
    fn relieve(&mut self) {
        if self.evicted + self.refused_full + self.refused_source > 0 {
            tracing::info!(
                evicted = self.evicted,
                refused_full = self.refused_full,
                refused_source = self.refused_source,
                "metrics: taking connections again"
            );
            *self = Self::default();
        }
    }
}

/// The pause after failed `accept`s: doubling from the first to the
/// longest, back to the first after a success.
#[derive(Debug)]
struct AcceptPause {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl AcceptPause {
    fn new(limits: &Limits) -> Self {
        Self {
            first: limits.accept_pause,
            max: limits.max_accept_pause,
            next: limits.accept_pause,
        }
    }

    /// The pause after one more failure.
    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (now * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A response body: whole, or the stream of `/api/v1/events`.
pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

fn whole(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

/// The response to `request`, and whether it is an event stream.
async fn respond(request: &Request<Incoming>, routes: &Routes) -> (Response<Body>, bool) {
    let path = request.uri().path();
    let web = routes.web.as_ref().filter(|_| Web::serves(path));
    let (status, content_type, body) = match (request.method(), path, web) {
        (&Method::GET, "/metrics", _) => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            whole(routes.exporter.metrics()),
        ),
        (&Method::GET, "/healthz", _) => {
            let (status, body) = routes.exporter.health().body();
            (status, "application/json", whole(body))
        }
        (&Method::GET, _, Some(web)) => match web.respond(path, request.uri().query()).await {
            WebResponse::Body {
                status,
                content_type,
                body,
            } => (status, content_type, whole(body)),
            WebResponse::Events(stream) => {
                let mut response = Response::new(event_stream(stream));
                let headers = response.headers_mut();
                for (name, value) in [
                    (hyper::header::CONTENT_TYPE, "text/event-stream"),
                    (hyper::header::CACHE_CONTROL, "no-store"),
                ] {
                    headers.insert(name, hyper::header::HeaderValue::from_static(value));
                }
                return (response, true);
            }
        },
        (&Method::GET, _, None) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            whole(if routes.web.is_some() {
                "not found; try /, /metrics or /healthz\n"
            } else {
                "not found; try /metrics or /healthz\n"
            }),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            whole("only GET\n"),
        ),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    (response, false)
}

/// The body of `/api/v1/events`: one `data:` line per event, a comment
/// every [`EVENT_STREAM_KEEPALIVE`], ended after [`EVENT_STREAM_LIFETIME`].
/// A reader too slow for the feed skips what it missed (said in a comment).
fn event_stream(stream: EventStream) -> Body {
    let deadline = tokio::time::Instant::now() + EVENT_STREAM_LIFETIME;
    let opening = Bytes::from_static(b"retry: 2000\n: homelab-deploy events\n\n");
    let frames = futures_util::stream::unfold(
        (stream, Some(opening)),
        move |(mut stream, first)| async move {
            if let Some(first) = first {
                return Some((Ok(Frame::data(first)), (stream, None)));
            }
            let chunk = tokio::select! {
                received = stream.events.recv() => match received {
                    Ok(event) => {
                        let mut chunk = Vec::with_capacity(event.len() + 8);
                        chunk.extend_from_slice(b"data: ");
                        chunk.extend_from_slice(&event);
                        chunk.extend_from_slice(b"\n\n");
                        Bytes::from(chunk)
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Bytes::from(format!(": {missed} events skipped\n\n"))
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = tokio::time::sleep(EVENT_STREAM_KEEPALIVE) => Bytes::from_static(b": keepalive\n\n"),
                () = tokio::time::sleep_until(deadline) => return None,
            };
            Some((Ok(Frame::data(chunk)), (stream, None)))
        },
    );
    StreamBody::new(frames).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Exporter for Fixed {
        fn metrics(&self) -> String {
            "up 1\n".to_owned()
        }
        fn health(&self) -> Health {
            Health {
                nats_connected: true,
                worker_alive: true,
            }
        }
    }

    const GENEROUS: Limits = Limits {
        connections: 64,
        per_source: 64,
        header_read: Duration::from_secs(30),
        lifetime: Duration::from_secs(60),
        accept_pause: Duration::from_millis(100),
        max_accept_pause: Duration::from_secs(1),
    };

    /// A server with `limits` on a free loopback port; stops with the guard.
    async fn server(limits: Limits) -> (SocketAddr, tokio_util::sync::DropGuard) {
        serve_for(Arc::new(Fixed), limits).await
    }

    async fn serve_for(
        exporter: Arc<dyn Exporter>,
        limits: Limits,
    ) -> (SocketAddr, tokio_util::sync::DropGuard) {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve_with(listener, exporter, None, limits, stop.clone()));
        (addr, stop.drop_guard())
    }

    /// Reads until the server closes the connection; what it sent, or
    /// `None` if it was still open after 5 s.
    async fn until_closed(stream: &mut tokio::net::TcpStream) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut received = Vec::new();
        let read = stream.read_to_end(&mut received);
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(_)) => Some(String::from_utf8_lossy(&received).into_owned()),
            Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                Some(String::from_utf8_lossy(&received).into_owned())
            }
            Ok(Err(err)) => panic!("read failed: {err}"),
            Err(_) => None,
        }
    }

    async fn get(addr: SocketAddr, close: bool) -> (tokio::net::TcpStream, String) {
        exchange(tokio::net::TcpStream::connect(addr).await.unwrap(), close).await
    }

    /// Sends `GET /metrics` on `stream`; with `close`, reads the response.
    async fn exchange(
        mut stream: tokio::net::TcpStream,
        close: bool,
    ) -> (tokio::net::TcpStream, String) {
        use tokio::io::AsyncWriteExt;
        let connection = if close { "close" } else { "keep-alive" };
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let response = if close {
            until_closed(&mut stream).await.unwrap_or_default()
        } else {
            String::new()
        };
        (stream, response)
    }

    /// A connection to `addr` from the loopback address `source`.
    async fn connect_from(source: [u8; 4], addr: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// Whether the server has closed `stream`, without waiting.
    fn closed(stream: &tokio::net::TcpStream) -> bool {
        let mut byte = [0; 1];
        match stream.try_read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
        }
    }

    #[tokio::test]
    async fn a_full_server_closes_the_silent_connection_that_waited_longest_for_a_new_one() {
        let limits = Limits {
            connections: 2,
            ..GENEROUS
        };
        let (addr, _stop) = server(limits).await;
        let mut oldest = tokio::net::TcpStream::connect(addr).await.unwrap();
        let newer = tokio::net::TcpStream::connect(addr).await.unwrap();

        let (_, response) = get(addr, true).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        // Closed long before the 30 s header timeout: it was evicted.
        assert_eq!(until_closed(&mut oldest).await.as_deref(), Some(""));
        assert!(
            !closed(&newer),
            "the newer silent connection was closed too"
        );
    }

    #[tokio::test]
    async fn a_kept_alive_connection_whose_response_went_out_can_be_evicted() {
        use tokio::io::AsyncReadExt;
        let limits = Limits {
            connections: 1,
            ..GENEROUS
        };
        let (addr, _stop) = server(limits).await;
        let (mut kept, _) = get(addr, false).await;
        let mut response = Vec::new();
        let read_all = async {
            let mut chunk = [0; 4096];
            while !response.ends_with(b"up 1\n") {
                let n = kept.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before the response was complete");
                response.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read_all)
            .await
            .unwrap();

        let (_, next) = get(addr, true).await;
        assert!(next.starts_with("HTTP/1.1 200"), "{next}");
        assert_eq!(until_closed(&mut kept).await.as_deref(), Some(""));
    }

    #[tokio::test]
    async fn connections_over_the_per_source_limit_are_closed_at_once_and_slots_come_back() {
        let limits = Limits {
            per_source: 1,
            ..GENEROUS
        };
        let (addr, _stop) = server(limits).await;
        let held = connect_from([127, 0, 0, 1], addr).await;
        let mut second = connect_from([127, 0, 0, 1], addr).await;
        // Closed long before the 30 s header timeout: it was refused.
        assert_eq!(until_closed(&mut second).await.as_deref(), Some(""));
        assert!(!closed(&held), "the held connection was closed");

        // Another source is served meanwhile.
        let other = connect_from([127, 0, 0, 2], addr).await;
        let (_, response) = exchange(other, true).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");

        drop(held);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (_, response) = get(addr, true).await;
            if response.starts_with("HTTP/1.1 200") {
                assert!(response.ends_with("up 1\n"), "{response}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a freed slot was never reused"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn silent_and_idle_kept_alive_connections_are_closed_after_the_header_timeout() {
        let limits = Limits {
            header_read: Duration::from_millis(300),
            ..GENEROUS
        };
        let (addr, _stop) = server(limits).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(
            until_closed(&mut silent).await.is_some(),
            "a silent connection stayed open"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));

        let (mut kept, _) = get(addr, false).await;
        let response = until_closed(&mut kept).await;
        let response = response.expect("an idle kept-alive connection stayed open");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    #[tokio::test]
    async fn no_connection_outlives_its_lifetime() {
        let limits = Limits {
            lifetime: Duration::from_millis(300),
            ..GENEROUS
        };
        let (addr, _stop) = server(limits).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(until_closed(&mut silent).await.is_some());
    }

    #[test]
    fn accept_pauses_double_up_to_the_longest_and_start_over_after_a_success() {
        let mut pause = AcceptPause::new(&LIMITS);
        let ms = |pause: &mut AcceptPause| pause.next().as_millis();
        let seen: Vec<_> = (0..6).map(|_| ms(&mut pause)).collect();
        assert_eq!(seen, [100, 200, 400, 800, 1000, 1000]);
        pause.reset();
        assert_eq!(ms(&mut pause), 100);
    }

    #[test]
    fn health_is_503_unless_connected_and_working() {
        let ok = Health {
            nats_connected: true,
            worker_alive: true,
        };
        assert_eq!(ok.body().0, StatusCode::OK);
        let (code, body) = Health {
            nats_connected: false,
            worker_alive: true,
        }
        .body();
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"nats\":\"disconnected\""), "{body}");
    }
}
