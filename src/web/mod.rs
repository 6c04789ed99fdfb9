//! The builder's web pages and read-only JSON API, served on its HTTP
//! listener beside `/metrics` when `[web] enabled` (docs/web.md).
//!
//! Everything here only reads: the builder's status (what `build.status`
//! answers), the history database, and the live feed of events. Paths
//! are checked before anything is looked up: names as the protocol allows
//! them, build ids as the builder makes them.

pub mod badge;
pub mod chart;
mod html;
pub mod pages;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hyper::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

use crate::history::{BuildQuery, EventTap, LatestHost, RecordStatus, Store};
use crate::protocol::{BuilderStatus, HostStatus, is_valid_name};
use crate::sync::lock;

/// `/api/v1/events` streams open at once at most; more are refused (503)
/// so they never take the slots scrapes need.
pub const MAX_EVENT_STREAMS: usize = 16;
/// Longest an event stream stays open; a browser reconnects by itself.
pub const EVENT_STREAM_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// A comment line this often keeps proxies from closing an idle stream
/// and lets the builder notice a reader that is gone.
pub const EVENT_STREAM_KEEPALIVE: Duration = Duration::from_secs(15);
/// Entries of a host's history a page or an answer shows at most.
pub const HOST_HISTORY_LIMIT: usize = 100;
/// Recent builds on `/`.
const RECENT_BUILDS: usize = 20;

/// What a web request is answered with.
pub enum WebResponse {
    /// A whole body.
    Body {
        status: StatusCode,
        content_type: &'static str,
        body: Bytes,
    },
    /// `/api/v1/events`: the live feed, for as long as the stream lives.
    Events(EventStream),
}

/// An open `/api/v1/events` stream: its events and its place among
/// [`MAX_EVENT_STREAMS`].
pub struct EventStream {
    pub events: broadcast::Receiver<Bytes>,
    pub permit: OwnedSemaphorePermit,
}

impl WebResponse {
    fn json<T: serde::Serialize>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self::Body {
                status: StatusCode::OK,
                content_type: "application/json",
                body: Bytes::from(crate::redact::redact_owned(
                    String::from_utf8_lossy(&body).into_owned(),
                )),
            },
            Err(err) => Self::error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
        }
    }

    fn html(status: StatusCode, page: String) -> Self {
        Self::Body {
            status,
            content_type: "text/html; charset=utf-8",
            body: Bytes::from(crate::redact::redact_owned(page)),
        }
    }

    fn svg(image: String) -> Self {
        Self::Body {
            status: StatusCode::OK,
            content_type: "image/svg+xml",
            body: Bytes::from(image),
        }
    }

    /// An error as JSON: `{"error": "..."}`.
    fn error(status: StatusCode, message: &str) -> Self {
        Self::Body {
            status,
            content_type: "application/json",
            body: Bytes::from(serde_json::json!({ "error": message }).to_string()),
        }
    }
}

/// Serves the pages and the API.
pub struct Web {
    status: Box<dyn Fn() -> BuilderStatus + Send + Sync>,
    tap: Arc<EventTap>,
    history: Option<History>,
    streams: Arc<Semaphore>,
}

/// The history database, opened for reading when first needed.
struct History {
    path: PathBuf,
    store: Arc<Mutex<Option<Store>>>,
}

impl std::fmt::Debug for Web {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Web")
            .field("history", &self.history.as_ref().map(|h| &h.path))
            .finish_non_exhaustive()
    }
}

/// A request path split into its parts, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Index,
    Build(String),
    Host(String, String),
    HostBadge(String, String),
    RepoBadge(String),
    ApiStatus,
    ApiBuilds,
    ApiBuild(String),
    ApiHost(String, String),
    ApiEvents,
}

/// Whether `id` could be a build id the builder made (hex, bounded).
fn is_build_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Route {
    /// The route of `path`; `None`: not one of the web's paths.
    fn of(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let name = |text: &str| is_valid_name(text).then(|| text.to_owned());
        let id = |text: &str| is_build_id(text).then(|| text.to_owned());
        Some(match parts.as_slice() {
            [""] => Self::Index,
            ["builds", build] => Self::Build(id(build)?),
            ["hosts", repo, host] => Self::Host(name(repo)?, name(host)?),
            ["badge", repo, host] => {
                Self::HostBadge(name(repo)?, name(host.strip_suffix(".svg")?)?)
            }
            ["badge", repo] => Self::RepoBadge(name(repo.strip_suffix(".svg")?)?),
            ["api", "v1", "status"] => Self::ApiStatus,
            ["api", "v1", "builds"] => Self::ApiBuilds,
            ["api", "v1", "builds", build] => Self::ApiBuild(id(build)?),
            ["api", "v1", "hosts", repo, host] => Self::ApiHost(name(repo)?, name(host)?),
            ["api", "v1", "events"] => Self::ApiEvents,
            _ => return None,
        })
    }
}

/// `key=value&…` of a query string, percent-decoded; `None` for a
/// malformed one.
fn query_pairs(query: &str) -> Option<HashMap<String, String>> {
    let mut pairs = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.insert(percent_decode(key)?, percent_decode(value)?);
    }
    Some(pairs)
}

fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.bytes();
    while let Some(b) = rest.next() {
        match b {
            b'%' => {
                let hex = [rest.next()?, rest.next()?];
                bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => bytes.push(b' '),
            b => bytes.push(b),
        }
    }
    String::from_utf8(bytes).ok()
}

/// The query of `GET /api/v1/builds`, checked.
fn build_query(query: Option<&str>) -> Result<BuildQuery, String> {
    let pairs = query_pairs(query.unwrap_or("")).ok_or("malformed query string")?;
    let mut parsed = BuildQuery::default();
    for (key, value) in pairs {
        match key.as_str() {
            "repo" if is_valid_name(&value) => parsed.repo = Some(value),
            "host" if is_valid_name(&value) => parsed.host = Some(value),
            "status" => {
                parsed.status = Some(
                    RecordStatus::parse(&value)
                        .ok_or("status is one of running, success, failed, cancelled")?,
                );
            }
            "limit" => {
                let limit: usize = value.parse().map_err(|_| "limit is a number")?;
                parsed.limit = Some(limit.clamp(1, crate::history::MAX_LIST));
            }
            "before" if is_build_id(&value) => parsed.before = Some(value),
            "repo" | "host" | "before" => return Err(format!("{key} is not a valid {key}")),
            _ => return Err(format!("unknown parameter {key}")),
        }
    }
    Ok(parsed)
}

impl Web {
    /// Pages and API over `status` (what `build.status` answers), the
    /// events `tap` sees and the history at `history_db`, if kept.
    pub fn new(
        status: impl Fn() -> BuilderStatus + Send + Sync + 'static,
        tap: Arc<EventTap>,
        history_db: Option<PathBuf>,
    ) -> Self {
        Self {
            status: Box::new(status),
            tap,
            history: history_db.map(|path| History {
                path,
                store: Arc::new(Mutex::new(None)),
            }),
            streams: Arc::new(Semaphore::new(MAX_EVENT_STREAMS)),
        }
    }

    /// Whether `path` is one of the web's.
    pub fn serves(path: &str) -> bool {
        Route::of(path).is_some()
            || path.starts_with("/api/")
            || ["/builds/", "/hosts/", "/badge/"]
                .iter()
                .any(|prefix| path.starts_with(prefix))
    }

    /// Answers `GET path?query`.
    pub async fn respond(&self, path: &str, query: Option<&str>) -> WebResponse {
        let api = path.starts_with("/api/");
        let Some(route) = Route::of(path) else {
            return if api {
                WebResponse::error(StatusCode::NOT_FOUND, "no such API path")
            } else {
                WebResponse::html(StatusCode::NOT_FOUND, pages::not_found(path))
            };
        };
        match route {
            Route::ApiStatus => WebResponse::json(&(self.status)()),
            Route::ApiEvents => match Arc::clone(&self.streams).try_acquire_owned() {
                Ok(permit) => WebResponse::Events(EventStream {
                    events: self.tap.subscribe(),
                    permit,
                }),
                Err(_) => WebResponse::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many event streams open; try again later",
                ),
            },
            Route::ApiBuilds => match build_query(query) {
                Ok(query) => self
                    .read(move |store| store.builds(&query))
                    .await
                    .map_or_else(|e| e, |builds| WebResponse::json(&builds)),
                Err(message) => WebResponse::error(StatusCode::BAD_REQUEST, &message),
            },
            Route::ApiBuild(build_id) => match self.read(move |s| s.build(&build_id)).await {
                Ok(Some(record)) => WebResponse::json(&record),
                Ok(None) => WebResponse::error(StatusCode::NOT_FOUND, "no such build"),
                Err(answer) => answer,
            },
            Route::ApiHost(repo, host) => self
                .read(move |s| s.host_history(&repo, &host, HOST_HISTORY_LIMIT))
                .await
                .map_or_else(|e| e, |entries| WebResponse::json(&entries)),
            Route::Index => {
                let status = (self.status)();
                let (latest, recent) = match self.history {
                    Some(_) => self
                        .read(|s| {
                            let latest = s.latest_hosts()?;
                            let recent = s.builds(&BuildQuery {
                                limit: Some(RECENT_BUILDS),
                                ..BuildQuery::default()
                            })?;
                            Ok((latest, recent))
                        })
                        .await
                        .unwrap_or_default(),
                    None => (Vec::new(), Vec::new()),
                };
                let latest = merge_latest(&status, latest);
                WebResponse::html(StatusCode::OK, pages::index(&status, &latest, &recent))
            }
            Route::Build(build_id) => {
                let wanted = build_id.clone();
                match self.read(move |s| s.build(&wanted)).await {
                    Ok(Some(record)) => WebResponse::html(StatusCode::OK, pages::build(&record)),
                    Ok(None) => WebResponse::html(
                        StatusCode::NOT_FOUND,
                        pages::not_found(&format!("build {build_id}")),
                    ),
                    Err(answer) => answer,
                }
            }
            Route::Host(repo, host) => {
                let (r, h) = (repo.clone(), host.clone());
                match self
                    .read(move |s| s.host_history(&r, &h, HOST_HISTORY_LIMIT))
                    .await
                {
                    Ok(entries) => {
                        WebResponse::html(StatusCode::OK, pages::host(&repo, &host, &entries))
                    }
                    Err(answer) => answer,
                }
            }
            Route::HostBadge(repo, host) => {
                let status = (self.status)();
                let last = status
                    .last_results
                    .iter()
                    .filter(|r| r.repo == repo && r.host == host && r.git_ref.is_none())
                    .map(|r| r.status)
                    .next();
                WebResponse::svg(badge::badge(&host, last))
            }
            Route::RepoBadge(repo) => {
                let status = (self.status)();
                let mut results = status
                    .last_results
                    .iter()
                    .filter(|r| r.repo == repo && r.git_ref.is_none() && !r.pinned)
                    .map(|r| r.status)
                    .peekable();
                let overall = results.peek().is_some().then(|| {
                    results
                        .find(|s| *s != HostStatus::Success)
                        .unwrap_or(HostStatus::Success)
                });
                WebResponse::svg(badge::badge(&repo, overall))
            }
        }
    }

    /// Runs `query` on the history's read connection, off the runtime.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&Store) -> Result<T, crate::history::HistoryError> + Send + 'static,
    ) -> Result<T, WebResponse> {
        let Some(history) = &self.history else {
            return Err(WebResponse::error(
                StatusCode::NOT_FOUND,
                "the builder keeps no history ([builder] history_db)",
            ));
        };
        let (path, store) = (history.path.clone(), Arc::clone(&history.store));
        let read = tokio::task::spawn_blocking(move || {
            let mut opened = lock(&store);
            let store = match &mut *opened {
                Some(store) => store,
                empty @ None => empty.insert(Store::open_read_only(&path)?),
            };
            query(store)
        })
        .await;
        match read {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                tracing::warn!(%err, "web: cannot read the history");
                Err(WebResponse::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the history cannot be read now",
                ))
            }
            Err(_) => Err(WebResponse::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "history read failed",
            )),
        }
    }
}

/// Every host's latest result: the status's last results (the default
/// ref's, which survive without history too), with what history adds.
fn merge_latest(status: &BuilderStatus, recorded: Vec<LatestHost>) -> Vec<LatestHost> {
    let mut latest: Vec<LatestHost> = status
        .last_results
        .iter()
        .filter(|r| r.git_ref.is_none() && !r.pinned)
        .map(|r| {
            let known = recorded
                .iter()
                .find(|h| h.repo == r.repo && h.host == r.host && h.rev == r.rev);
            LatestHost {
                repo: r.repo.clone(),
                host: r.host.clone(),
                status: r.status,
                finished_at: r.finished_at.clone(),
                rev: r.rev.clone(),
                build_id: known.and_then(|h| h.build_id.clone()),
                closure_size: known.and_then(|h| h.closure_size),
                changed_packages: known.and_then(|h| h.changed_packages),
            }
        })
        .collect();
    for host in recorded {
        if !latest
            .iter()
            .any(|h| h.repo == host.repo && h.host == host.host)
        {
            latest.push(host);
        }
    }
    latest.sort_by(|a, b| (&a.repo, &a.host).cmp(&(&b.repo, &b.host)));
    latest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_before_anything_is_looked_up() {
        assert_eq!(Route::of("/"), Some(Route::Index));
        assert_eq!(
            Route::of("/builds/0a1b2c"),
            Some(Route::Build("0a1b2c".into()))
        );
        assert_eq!(
            Route::of("/hosts/nixos-servers/ns1"),
            Some(Route::Host("nixos-servers".into(), "ns1".into()))
        );
        assert_eq!(
            Route::of("/badge/nixos-servers/ns1.svg"),
            Some(Route::HostBadge("nixos-servers".into(), "ns1".into()))
        );
        assert_eq!(
            Route::of("/badge/nixos-servers.svg"),
            Some(Route::RepoBadge("nixos-servers".into()))
        );
        for bad in [
            "/builds/../etc",
            "/builds/not-hex!",
            "/hosts/a/..",
            "/hosts/a/b%20c",
            "/hosts/-x/y",
            "/badge/a/b",
            "/api/v1/builds/x y",
            "/api/v2/status",
            "/builds/",
        ] {
            assert_eq!(Route::of(bad), None, "{bad}");
        }
    }

    fn idle_status() -> BuilderStatus {
        BuilderStatus {
            builder: None,
            version: "test".into(),
            repos: Vec::new(),
            running: None,
            queue: Vec::new(),
            last_results: Vec::new(),
            machines: Vec::new(),
            omitted_results: 0,
            web_url: None,
        }
    }

    #[tokio::test]
    async fn event_streams_are_bounded_and_free_their_place_when_closed() {
        let web = Web::new(idle_status, EventTap::new(None), None);
        let mut open = Vec::new();
        for _ in 0..MAX_EVENT_STREAMS {
            match web.respond("/api/v1/events", None).await {
                WebResponse::Events(stream) => open.push(stream),
                WebResponse::Body { status, .. } => panic!("refused: {status}"),
            }
        }
        let WebResponse::Body { status, .. } = web.respond("/api/v1/events", None).await else {
            panic!("a stream beyond the limit");
        };
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        // Pages still answer.
        let WebResponse::Body { status, .. } = web.respond("/", None).await else {
            panic!("no page");
        };
        assert_eq!(status, StatusCode::OK);
        open.pop();
        assert!(matches!(
            web.respond("/api/v1/events", None).await,
            WebResponse::Events(_)
        ));
    }

    #[tokio::test]
    async fn without_history_its_answers_say_so_and_the_rest_works() {
        let web = Web::new(idle_status, EventTap::new(None), None);
        for path in ["/api/v1/builds", "/api/v1/hosts/r/h", "/api/v1/builds/abc"] {
            let WebResponse::Body { status, body, .. } = web.respond(path, None).await else {
                panic!("{path}: a stream");
            };
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert!(
                String::from_utf8_lossy(&body).contains("history_db"),
                "{path}"
            );
        }
        for path in ["/", "/api/v1/status", "/badge/r.svg", "/badge/r/h.svg"] {
            let WebResponse::Body { status, .. } = web.respond(path, None).await else {
                panic!("{path}: a stream");
            };
            assert_eq!(status, StatusCode::OK, "{path}");
        }
    }

    #[test]
    fn the_builds_query_is_checked() {
        let query = build_query(Some("repo=nixos-servers&host=ns1&status=failed&limit=5000"))
            .expect("valid");
        assert_eq!(query.repo.as_deref(), Some("nixos-servers"));
        assert_eq!(query.host.as_deref(), Some("ns1"));
        assert_eq!(query.status, Some(RecordStatus::Failed));
        assert_eq!(query.limit, Some(crate::history::MAX_LIST));
        assert!(build_query(Some("status=bogus")).is_err());
        assert!(build_query(Some("repo=a%27%3B--")).is_err());
        assert!(build_query(Some("limit=-1")).is_err());
        assert!(build_query(Some("sort=asc")).is_err());
        assert!(build_query(Some("before=%ZZ")).is_err());
        assert_eq!(build_query(None), Ok(BuildQuery::default()));
    }
}
