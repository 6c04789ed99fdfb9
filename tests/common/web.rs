//! The builder's web side as a client sees it: JSON answers and the
//! `/api/v1/events` stream, read over plain loopback HTTP.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::net::http_get;
use super::wait::WAIT;

/// `GET path` answered 200 with JSON; its value.
pub async fn get_json(addr: &str, path: &str) -> Value {
    let (status, body) = http_get(addr, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|err| panic!("GET {path}: {err}: {body}"))
}

/// One event of `/api/v1/events` and when it arrived.
#[derive(Debug, Clone)]
pub struct StreamedEvent {
    pub reply: Value,
    pub at: std::time::Instant,
}

/// An open `/api/v1/events` stream, read by a task as events arrive.
pub struct EventFeed {
    events: mpsc::UnboundedReceiver<StreamedEvent>,
    /// Everything the stream sent, comments included.
    pub raw: std::sync::Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventFeed {
    /// Opens the stream and waits for its first line (it is live then).
    pub async fn open(addr: &str) -> Self {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(WAIT, reader.read_line(&mut line))
                .await
                .expect("no answer from /api/v1/events")
                .unwrap();
            assert!(read > 0, "/api/v1/events closed: {head}");
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{head}"
        );
        let raw = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (sender, events) = mpsc::unbounded_channel();
        let task = tokio::spawn({
            let raw = std::sync::Arc::clone(&raw);
            async move {
                // The body is chunked: size lines and SSE lines interleave;
                // only `data:` lines matter.
                let mut line = String::new();
                while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    raw.lock().unwrap().push_str(&line);
                    if let Some(data) = line.strip_prefix("data: ") {
                        let reply: Value = serde_json::from_str(data.trim_end()).unwrap();
                        let _ = sender.send(StreamedEvent {
                            reply,
                            at: std::time::Instant::now(),
                        });
                    }
                    line.clear();
                }
            }
        });
        Self { events, raw, task }
    }

    /// The next event whose reply satisfies `wanted`, skipping others;
    /// panics after `timeout`.
    pub async fn next_matching(
        &mut self,
        timeout: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> StreamedEvent {
        let deadline = Instant::now() + timeout;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("no matching event on /api/v1/events in time")
                .expect("/api/v1/events ended");
            if wanted(&event.reply) {
                return event;
            }
        }
    }

    /// Every event received so far.
    pub fn drain(&mut self) -> Vec<StreamedEvent> {
        let mut events = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            events.push(event);
        }
        events
    }
}

impl Drop for EventFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}
