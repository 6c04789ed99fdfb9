//! The browser harness itself (tests/common/browser.rs), against a tiny page
//! served here: a real headless Chromium sees a Server-Sent Event the test
//! sends only once the page has loaded change the page, without a reload;
//! and a wait for what never appears fails, leaving a screenshot and the
//! page source behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt as _;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use common::browser::Browser;

const PAGE: &str = r#"<!doctype html>
<html>
<head><meta charset="utf-8"><title>harness</title></head>
<body>
<p id="line" data-stream="connecting">waiting</p>
<ul id="log"></ul>
<script>
(() => {
  const line = document.getElementById("line");
  const log = document.getElementById("log");
  const events = new EventSource("/events");
  events.onopen = () => { line.dataset.stream = "open"; };
  events.onerror = () => { line.dataset.stream = "error"; };
  events.onmessage = (event) => {
    line.textContent = event.data;
    const item = document.createElement("li");
    item.textContent = event.data;
    log.append(item);
  };
})();
</script>
</body>
</html>
"#;

/// Serves [`PAGE`] at `/` and, at `/events`, an event stream that stays
/// open and carries every message sent on the returned channel after the
/// stream's headers went out.
async fn serve_page() -> (String, broadcast::Sender<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (events, _) = broadcast::channel(16);
    let sender = events.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(answer(stream, sender.subscribe()));
        }
    });
    (addr, events)
}

async fn answer(mut stream: TcpStream, mut events: broadcast::Receiver<String>) {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let _ = match path {
        "/" => {
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
                PAGE.len()
            );
            stream.write_all(response.as_bytes()).await
        }
        "/events" => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                        Cache-Control: no-cache\r\n\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            while let Ok(message) = events.recv().await {
                let event = format!("data: {message}\n\n");
                if stream.write_all(event.as_bytes()).await.is_err() {
                    return;
                }
            }
            Ok(())
        }
        _ => {
            let response =
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            stream.write_all(response.as_bytes()).await
        }
    };
}

#[tokio::test]
async fn a_live_page_changes_without_a_reload() {
    let (addr, events) = serve_page().await;
    let browser = Browser::start().await;
    let url = format!("http://{addr}/");
    browser.goto(&url).await;
    assert_eq!(browser.text("#line").await.as_deref(), Some("waiting"));
    assert_eq!(browser.count("#log li").await, 0);
    // Survives only as long as this document does.
    browser.execute("window.harnessMark = 'kept';", &[]).await;

    // Nothing is sent before the page follows the stream.
    browser
        .wait_for_attribute("#line", "data-stream", "open")
        .await;
    assert_eq!(browser.text("#line").await.as_deref(), Some("waiting"));

    events.send("built 1 of 2".to_owned()).unwrap();
    let text = browser.wait_for_text("#line", "built 1 of 2").await;
    assert_eq!(text, "built 1 of 2");
    events.send("built 2 of 2".to_owned()).unwrap();
    browser
        .wait_until(
            "two messages in the log",
            Duration::from_secs(10),
            async || browser.count("#log li").await,
            |count| *count == 2,
        )
        .await;
    assert_eq!(browser.text("#line").await.as_deref(), Some("built 2 of 2"));

    // The same document all along: one navigation, the mark still there.
    assert_eq!(
        browser.execute("return window.harnessMark;", &[]).await,
        json!("kept")
    );
    assert_eq!(
        browser
            .execute(
                "return performance.getEntriesByType('navigation').length;",
                &[]
            )
            .await,
        json!(1)
    );
    assert_eq!(browser.url().await, url);
    assert!(
        browser
            .page_source()
            .await
            .contains("<li>built 2 of 2</li>")
    );

    let bytes = browser.resources_transferred().await;
    eprintln!("page weight: {bytes} bytes transferred");
    assert!(
        bytes >= u64::try_from(PAGE.len()).unwrap(),
        "{bytes} bytes transferred, the page alone has {}",
        PAGE.len()
    );
}

#[tokio::test]
async fn a_wait_for_what_never_appears_fails_with_a_screenshot() {
    let (addr, _events) = serve_page().await;
    let browser = Browser::start().await;
    browser.goto(&format!("http://{addr}/")).await;
    assert_eq!(browser.text("#missing").await, None);
    assert_eq!(browser.attribute("#line", "data-missing").await, None);
    assert_eq!(browser.count("#missing").await, 0);

    let failed = AssertUnwindSafe(browser.wait_for_text_within(
        "#line",
        "a text that never comes",
        Duration::from_secs(1),
        |text| text.contains("never"),
    ))
    .catch_unwind()
    .await;
    let panic = failed.expect_err("the wait did not fail");
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .expect("a formatted panic message");
    assert!(message.contains("timed out after 1s waiting for a text that never comes"));
    assert!(message.contains(r#"last: Some("waiting")"#), "{message}");

    let saved = |label: &str| {
        let line = message
            .lines()
            .find_map(|line| line.strip_prefix(label))
            .unwrap_or_else(|| panic!("no `{label}` in: {message}"));
        std::path::PathBuf::from(line)
    };
    let png = saved("screenshot: ");
    let html = saved("page source: ");
    assert!(png.starts_with(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/browser-failures"
    )));
    let image = std::fs::read(&png).unwrap();
    assert!(
        image.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        png.display()
    );
    assert!(
        image.len() > 1000,
        "{} has {} bytes",
        png.display(),
        image.len()
    );
    let source = std::fs::read_to_string(&html).unwrap();
    assert!(source.contains(r#"<p id="line" data-stream="#), "{source}");
    std::fs::remove_file(png).unwrap();
    std::fs::remove_file(html).unwrap();
}
