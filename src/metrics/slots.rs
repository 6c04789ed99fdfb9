//! Which connections the metrics server serves. At most so many at once and
//! so many per source; when all slots are taken, a new connection gets the
//! slot of the one that has waited longest without a complete request head,
//! so clients that connect and say nothing cannot keep a scrape out.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Where a served connection is between request and response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No complete request head yet, since `since`: just accepted, or
    /// kept alive after a response went out.
    Waiting { since: Instant },
    /// A request head arrived; its response is not all written yet.
    Answering,
    /// The response is written to the connection's buffer but not yet
    /// flushed to the socket.
    Sending,
}

#[derive(Debug)]
struct Entry {
    source: IpAddr,
    phase: Phase,
    evict: CancellationToken,
}

/// Why a new connection is closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Its source holds as many connections as one source may.
    Source,
    /// Every slot is taken by a connection being answered.
    Full,
}

/// A connection given a slot.
#[derive(Debug)]
pub(super) struct Admitted {
    pub id: u64,
    /// Cancelled when the connection must close: evicted, or shutdown.
    pub evict: CancellationToken,
    /// Whether another connection was evicted to make room.
    pub evicted: bool,
}

/// The served connections and what each is doing.
#[derive(Debug)]
pub(super) struct Slots {
    connections: usize,
    per_source: usize,
    next_id: u64,
    entries: HashMap<u64, Entry>,
}

impl Slots {
    pub fn new(connections: usize, per_source: usize) -> Self {
        Self {
            connections,
            per_source,
            next_id: 0,
            entries: HashMap::new(),
        }
    }

    /// Gives a connection from `peer`, accepted at `now`, a slot, evicting
    /// the longest-waiting connection without a request head if need be.
    /// Its token is a child of `parent`.
    pub fn admit(
        &mut self,
        peer: IpAddr,
        now: Instant,
        parent: &CancellationToken,
    ) -> Result<Admitted, Refusal> {
        let source = source(peer);
        let from_source = self.entries.values().filter(|e| e.source == source);
        if from_source.count() >= self.per_source {
            return Err(Refusal::Source);
        }
        let evicted = if self.entries.len() >= self.connections {
            let victim = self.longest_waiting().ok_or(Refusal::Full)?;
            if let Some(entry) = self.entries.remove(&victim) {
                entry.evict.cancel();
            }
            true
        } else {
            false
        };
        let id = self.next_id;
        self.next_id += 1;
        let evict = parent.child_token();
        let phase = Phase::Waiting { since: now };
        self.entries.insert(
            id,
            Entry {
                source,
                phase,
                evict: evict.clone(),
            },
        );
        Ok(Admitted { id, evict, evicted })
    }

    /// The connection that has waited longest for a request head; the
    /// earlier accepted one of two that started waiting at once.
    fn longest_waiting(&self) -> Option<u64> {
        self.entries
            .iter()
            .filter_map(|(id, entry)| match entry.phase {
                Phase::Waiting { since } => Some((since, *id)),
                Phase::Answering | Phase::Sending => None,
            })
            .min()
            .map(|(_, id)| id)
    }

    fn set(&mut self, id: u64, phase: Phase) {
        // An evicted connection is gone from the table already.
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.phase = phase;
        }
    }

    fn head_received(&mut self, id: u64) {
        self.set(id, Phase::Answering);
    }

    fn response_written(&mut self, id: u64) {
        if self.phase(id) == Some(Phase::Answering) {
            self.set(id, Phase::Sending);
        }
    }

    fn flushed(&mut self, id: u64, now: Instant) {
        if self.phase(id) == Some(Phase::Sending) {
            self.set(id, Phase::Waiting { since: now });
        }
    }

    fn phase(&self, id: u64) -> Option<Phase> {
        self.entries.get(&id).map(|entry| entry.phase)
    }

    fn release(&mut self, id: u64) {
        self.entries.remove(&id);
    }

    #[cfg(test)]
    fn holds(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }
}

/// What one source may hold: an IPv4 address, or the /64 of an IPv6 one
/// (what a single host is usually given).
fn source(peer: IpAddr) -> IpAddr {
    match peer.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & (u128::MAX << 64))),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// The table, shared by the accept loop and every connection.
pub(super) type Shared = Arc<Mutex<Slots>>;

/// Locks the table; a panic elsewhere leaves it consistent (every change
/// is one map operation), so a poisoned lock is used as it is.
pub(super) fn lock(slots: &Shared) -> MutexGuard<'_, Slots> {
    slots.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One connection's slot: the connection reports its phase through it.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    slots: Shared,
    id: u64,
}

impl Slot {
    pub fn new(slots: Shared, id: u64) -> Self {
        Self { slots, id }
    }

    /// Frees the slot when the returned guard is dropped.
    pub fn hold(&self) -> Held {
        Held(self.clone())
    }

    /// A complete request head arrived.
    pub fn head_received(&self) {
        lock(&self.slots).head_received(self.id);
    }

    /// `body` as a response body that reports when it is all written.
    pub fn answer(&self, body: super::server::Body) -> Answer {
        Answer {
            body,
            slot: self.clone(),
        }
    }

    /// `io` reporting when what was written reached the socket.
    pub fn watch<S>(&self, io: S) -> Watched<S> {
        Watched {
            io,
            slot: self.clone(),
        }
    }
}

/// Frees its slot when dropped.
#[derive(Debug)]
pub(super) struct Held(Slot);

impl Drop for Held {
    fn drop(&mut self) {
        lock(&self.0.slots).release(self.0.id);
    }
}

/// A response body; hyper drops it once it has written all of it.
#[derive(Debug)]
pub(super) struct Answer {
    body: super::server::Body,
    slot: Slot,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        lock(&self.slot.slots).response_written(self.slot.id);
    }
}

/// A connection's socket; a completed flush after a written response
/// means the connection waits for the next request head.
#[derive(Debug)]
pub(super) struct Watched<S> {
    io: S,
    slot: Slot,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            lock(&self.slot.slots).flushed(self.slot.id, Instant::now());
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    /// `Slots` and a clock starting now, one second a tick.
    fn table(connections: usize, per_source: usize) -> (Slots, impl Fn(u64) -> Instant) {
        let start = Instant::now();
        let at = move |tick| start + Duration::from_secs(tick);
        (Slots::new(connections, per_source), at)
    }

    #[test]
    fn a_full_table_evicts_the_longest_waiting_connection_not_the_newest() {
        let (mut slots, at) = table(3, 8);
        let stop = CancellationToken::new();
        let oldest = slots.admit(v4(1), at(0), &stop).unwrap();
        let middle = slots.admit(v4(2), at(1), &stop).unwrap();
        let newest = slots.admit(v4(3), at(2), &stop).unwrap();
        assert!(!newest.evicted);

        let scrape = slots.admit(v4(4), at(3), &stop).unwrap();
        assert!(scrape.evicted);
        assert!(oldest.evict.is_cancelled());
        assert!(!slots.holds(oldest.id));
        for kept in [&middle, &newest, &scrape] {
            assert!(!kept.evict.is_cancelled());
            assert!(slots.holds(kept.id));
        }
    }

    #[test]
    fn connections_being_answered_are_never_evicted_and_a_full_table_of_them_refuses() {
        let (mut slots, at) = table(2, 8);
        let stop = CancellationToken::new();
        let answering = slots.admit(v4(1), at(0), &stop).unwrap();
        let sending = slots.admit(v4(2), at(1), &stop).unwrap();
        slots.head_received(answering.id);
        slots.head_received(sending.id);
        slots.response_written(sending.id);

        assert_eq!(slots.admit(v4(3), at(2), &stop).unwrap_err(), Refusal::Full);
        assert!(!answering.evict.is_cancelled());
        assert!(!sending.evict.is_cancelled());

        // Flushed, `sending` waits for its next head from now on: evictable.
        slots.flushed(sending.id, at(3));
        let next = slots.admit(v4(3), at(4), &stop).unwrap();
        assert!(next.evicted);
        assert!(sending.evict.is_cancelled());
        assert!(slots.holds(answering.id));
    }

    #[test]
    fn a_kept_alive_connection_waits_from_its_last_response_not_from_its_accept() {
        let (mut slots, at) = table(2, 8);
        let stop = CancellationToken::new();
        let kept = slots.admit(v4(1), at(0), &stop).unwrap();
        let silent = slots.admit(v4(2), at(1), &stop).unwrap();
        slots.head_received(kept.id);
        slots.response_written(kept.id);
        slots.flushed(kept.id, at(5));

        slots.admit(v4(3), at(6), &stop).unwrap();
        assert!(silent.evict.is_cancelled());
        assert!(!kept.evict.is_cancelled());
    }

    #[test]
    fn a_flush_before_the_response_is_written_keeps_the_connection_answered() {
        let (mut slots, at) = table(1, 8);
        let stop = CancellationToken::new();
        let busy = slots.admit(v4(1), at(0), &stop).unwrap();
        slots.head_received(busy.id);
        slots.flushed(busy.id, at(1));
        assert_eq!(slots.admit(v4(2), at(2), &stop).unwrap_err(), Refusal::Full);
    }

    #[test]
    fn one_source_holds_at_most_its_share_and_is_refused_rather_than_evicting() {
        let (mut slots, at) = table(4, 2);
        let stop = CancellationToken::new();
        let first = slots.admit(v4(1), at(0), &stop).unwrap();
        slots.admit(v4(1), at(1), &stop).unwrap();
        assert_eq!(
            slots.admit(v4(1), at(2), &stop).unwrap_err(),
            Refusal::Source
        );
        assert!(!first.evict.is_cancelled());
        // Other sources are served, and a freed share is usable again.
        slots.admit(v4(2), at(3), &stop).unwrap();
        slots.release(first.id);
        slots.admit(v4(1), at(4), &stop).unwrap();
    }

    #[test]
    fn an_evicted_connection_no_longer_counts_against_its_source() {
        let (mut slots, at) = table(1, 1);
        let stop = CancellationToken::new();
        let first = slots.admit(v4(1), at(0), &stop).unwrap();
        slots.admit(v4(2), at(1), &stop).unwrap();
        assert!(first.evict.is_cancelled());
        // Its task may not have ended yet; the source may connect again.
        slots.admit(v4(1), at(2), &stop).unwrap();
    }

    #[test]
    fn ipv6_sources_are_their_64_prefix_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source(a), source(b));
        assert_ne!(source(a), source(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source(mapped), v4(7));
    }

    #[test]
    fn shutdown_reaches_every_connection() {
        let (mut slots, at) = table(2, 2);
        let stop = CancellationToken::new();
        let one = slots.admit(v4(1), at(0), &stop).unwrap();
        stop.cancel();
        assert!(one.evict.is_cancelled());
    }
}
