//! A flood of requests in plain NATS protocol.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::nats::NatsServer;
use super::wait::{WAIT, wait_for};

/// A connection that publishes messages as fast as loopback takes them, in
/// plain NATS protocol (no client library to slow it down), while it reads
/// and throws away whatever the server sends it. Stopped on drop.
pub struct Flood {
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    received: std::sync::Arc<std::sync::atomic::AtomicU64>,
    writer: tokio::task::JoinHandle<std::io::Result<Duration>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Flood {
    /// Publishes `count` messages on `subject`, message `i` with the reply
    /// subject `{reply_prefix}.{i}` and the body `bodies[i % bodies.len()]`.
    /// With `listen`, the connection also subscribes to `{reply_prefix}.>`,
    /// so the server must deliver every answer to it, as to an attacker
    /// who reads them.
    pub async fn start(
        nats: &NatsServer,
        count: usize,
        subject: &str,
        reply_prefix: &str,
        bodies: &[&[u8]],
        listen: bool,
    ) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

        let stream = tokio::net::TcpStream::connect(("127.0.0.1", nats.port))
            .await
            .unwrap();
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::new(read);
        let mut line = String::new();
        read.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("INFO "), "{line}");
        let mut hello =
            String::from("CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"flood\"}\r\n");
        if listen {
            let _ = write!(hello, "SUB {reply_prefix}.> 1\r\n");
        }
        hello.push_str("PING\r\n");
        write.write_all(hello.as_bytes()).await.unwrap();
        line.clear();
        tokio::time::timeout(WAIT, read.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            line, "PONG\r\n",
            "the server refused the flood's connection"
        );

        let received = Arc::new(AtomicU64::new(0));
        let reader = tokio::spawn({
            let received = Arc::clone(&received);
            async move {
                let mut buffer = vec![0; 1 << 16];
                while let Ok(n @ 1..) = read.read(&mut buffer).await {
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
        let sent = Arc::new(AtomicUsize::new(0));
        let writer = tokio::spawn({
            let sent = Arc::clone(&sent);
            let (subject, reply_prefix) = (subject.to_owned(), reply_prefix.to_owned());
            let bodies: Vec<Vec<u8>> = bodies.iter().map(|b| b.to_vec()).collect();
            async move {
                const CHUNK: usize = 4096;
                let started = Instant::now();
                let mut chunk = Vec::new();
                for start in (0..count).step_by(CHUNK) {
                    chunk.clear();
                    for i in start..count.min(start + CHUNK) {
                        let body = &bodies[i % bodies.len()];
                        let head = format!("PUB {subject} {reply_prefix}.{i} {}\r\n", body.len());
                        chunk.extend_from_slice(head.as_bytes());
                        chunk.extend_from_slice(body);
                        chunk.extend_from_slice(b"\r\n");
                    }
                    write.write_all(&chunk).await?;
                    sent.store(count.min(start + CHUNK), Ordering::Relaxed);
                }
                write.flush().await?;
                Ok(started.elapsed())
            }
        });
        Self {
            sent,
            received,
            writer,
            reader,
        }
    }

    /// Messages handed to the server so far.
    pub fn sent(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes the server delivered to the flood's connection so far.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until `count` messages are sent.
    pub async fn wait_sent(&self, count: usize, timeout: Duration) {
        wait_for(&format!("{count} flood messages sent"), timeout, || {
            self.sent() >= count
        })
        .await;
    }

    /// Waits (at most [`WAIT`]) until every message is sent, then closes
    /// the connection; returns how many were sent, in how long.
    pub async fn finish(mut self) -> (usize, Duration) {
        let took = tokio::time::timeout(WAIT, &mut self.writer)
            .await
            .expect("the flood did not end in time")
            .unwrap()
            .expect("the server closed the flood's connection");
        (self.sent(), took)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.writer.abort();
        self.reader.abort();
    }
}
