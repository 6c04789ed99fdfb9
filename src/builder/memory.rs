//! The evaluators' shared memory budget (`eval_memory_budget`): the sum of
//! what every evaluator process holds stays under it. A process reserves
//! what its next host is expected to need before it starts, and more as it
//! grows; what does not fit waits, first come first served, so a host that
//! needs the whole budget gets it once everything before it is released.
//! Releasing is dropping the [`Reservation`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::config::MemoryShare;
use crate::sync::lock;

/// The machine's memory, when `/proc/meminfo` cannot say: a share of it
/// is then a share of this.
const ASSUMED_MACHINE_MEMORY: u64 = 8 << 30;

/// The budget `share` makes on this machine.
pub(crate) fn budget_bytes(share: MemoryShare) -> u64 {
    let machine = machine_memory().unwrap_or_else(|| {
        if matches!(share, MemoryShare::OfMachine(_)) {
            tracing::warn!(
                assumed = ASSUMED_MACHINE_MEMORY,
                "cannot read the machine's memory from /proc/meminfo; eval_memory_budget is a share of the assumed size"
            );
        }
        ASSUMED_MACHINE_MEMORY
    });
    share.bytes(machine)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The budget and what is reserved of it.
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    total: u64,
    ledger: Mutex<Ledger>,
    released: Notify,
}

#[derive(Debug, Default)]
struct Ledger {
    reserved: u64,
    /// Tickets of the reservations waiting, in arrival order: only the
    /// first may take what is free.
    waiting: VecDeque<u64>,
    next_ticket: u64,
    /// Resident memory of each evaluator, as last sampled, by reservation.
    resident: std::collections::HashMap<u64, u64>,
}

impl MemoryBudget {
    pub(crate) fn new(total: u64) -> Arc<Self> {
        Arc::new(Self {
            total,
            ledger: Mutex::default(),
            released: Notify::new(),
        })
    }

    /// The whole budget.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// What is reserved now.
    pub(crate) fn reserved(&self) -> u64 {
        lock(&self.ledger).reserved
    }

    /// The summed resident memory of the evaluators, as last sampled.
    pub(crate) fn resident(&self) -> u64 {
        lock(&self.ledger).resident.values().sum()
    }

    /// Reservations waiting for room.
    pub(crate) fn waiting(&self) -> usize {
        lock(&self.ledger).waiting.len()
    }

    /// Reserves `amount` (at most the whole budget), waiting for room
    /// behind every reservation that asked before.
    pub(crate) async fn reserve(self: &Arc<Self>, amount: u64) -> Reservation {
        let amount = amount.min(self.total);
        let ticket = {
            let mut ledger = lock(&self.ledger);
            let ticket = ledger.next_ticket;
            ledger.next_ticket += 1;
            ledger.waiting.push_back(ticket);
            ticket
        };
        // Leaves the line if the wait is given up (the request ends).
        let mut line = Line {
            budget: self,
            ticket: Some(ticket),
        };
        loop {
            let released = self.released.notified();
            {
                let mut ledger = lock(&self.ledger);
                let first = ledger.waiting.front() == Some(&ticket);
                if first && ledger.reserved + amount <= self.total {
                    ledger.waiting.pop_front();
                    ledger.reserved += amount;
                    line.ticket = None;
                    drop(ledger);
                    // The next in line may fit too.
                    self.released.notify_waiters();
                    return Reservation {
                        budget: Arc::clone(self),
                        ticket,
                        held: amount,
                    };
                }
            }
            released.await;
        }
    }
}

/// A place in the line; leaving it (a wait given up) lets the next one on.
struct Line<'a> {
    budget: &'a MemoryBudget,
    ticket: Option<u64>,
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket {
            lock(&self.budget.ledger).waiting.retain(|t| *t != ticket);
            self.budget.released.notify_waiters();
        }
    }
}

/// Memory held of the budget until dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<MemoryBudget>,
    ticket: u64,
    held: u64,
}

impl Reservation {
    /// What it holds.
    pub(crate) fn held(&self) -> u64 {
        self.held
    }

    /// Whether it holds the whole budget: nothing else can be reserved.
    pub(crate) fn is_whole_budget(&self) -> bool {
        self.held >= self.budget.total
    }

    /// Grows to `amount` if that fits now (never past the whole budget);
    /// `false` if not. A running evaluator may grow into room a waiting
    /// reservation could not use yet: stopping it instead would throw its
    /// work away, and it releases everything when its process ends.
    pub(crate) fn try_grow(&mut self, amount: u64) -> bool {
        if amount <= self.held {
            return true;
        }
        let mut ledger = lock(&self.budget.ledger);
        let more = amount - self.held;
        if amount > self.budget.total || ledger.reserved + more > self.budget.total {
            return false;
        }
        ledger.reserved += more;
        self.held = amount;
        true
    }

    /// Records the evaluator's resident memory as sampled now.
    pub(crate) fn sampled(&self, resident: u64) {
        lock(&self.budget.ledger)
            .resident
            .insert(self.ticket, resident);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut ledger = lock(&self.budget.ledger);
            ledger.reserved -= self.held;
            ledger.resident.remove(&self.ticket);
        }
        self.budget.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `future` is still waiting after everything else ran.
    async fn still_waiting<T>(future: &mut std::pin::Pin<Box<impl Future<Output = T>>>) -> bool {
        tokio::select! {
            biased;
            _ = future.as_mut() => false,
            () = tokio::time::sleep(Duration::from_millis(1)) => true,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn what_does_not_fit_waits_until_it_does() {
        let budget = MemoryBudget::new(100);
        let first = budget.reserve(60).await;
        let second = budget.reserve(40).await;
        assert_eq!(budget.reserved(), 100);
        let mut third = Box::pin(budget.reserve(30));
        assert!(still_waiting(&mut third).await);
        assert_eq!(budget.waiting(), 1);
        drop(second);
        let third = third.await;
        assert_eq!((third.held(), budget.reserved()), (30, 90));
        drop((first, third));
        assert_eq!(budget.reserved(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_reservation_is_not_overtaken_by_small_ones() {
        let budget = MemoryBudget::new(100);
        let small = budget.reserve(50).await;
        let mut whole = Box::pin(budget.reserve(500));
        assert!(still_waiting(&mut whole).await);
        // A small one that would fit waits behind the large one.
        let mut later = Box::pin(budget.reserve(10));
        assert!(still_waiting(&mut later).await);
        drop(small);
        let whole = whole.await;
        assert!(whole.is_whole_budget(), "capped at the whole budget");
        assert_eq!(whole.held(), 100);
        assert!(still_waiting(&mut later).await);
        drop(whole);
        assert_eq!(later.await.held(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn growing_takes_only_free_room() {
        let budget = MemoryBudget::new(100);
        let mut growing = budget.reserve(30).await;
        let other = budget.reserve(50).await;
        assert!(growing.try_grow(50));
        assert!(!growing.try_grow(51), "only 50 are free");
        assert_eq!(growing.held(), 50);
        drop(other);
        let mut waiting = Box::pin(budget.reserve(60));
        assert!(still_waiting(&mut waiting).await);
        assert!(growing.try_grow(90), "free room may be grown into");
        assert!(!growing.try_grow(101), "never past the whole budget");
        drop(growing);
        assert_eq!(waiting.await.held(), 60);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_given_up_lets_the_next_one_on() {
        let budget = MemoryBudget::new(100);
        let held = budget.reserve(90).await;
        let mut given_up = Box::pin(budget.reserve(50));
        assert!(still_waiting(&mut given_up).await);
        let mut next = Box::pin(budget.reserve(10));
        assert!(still_waiting(&mut next).await);
        drop(given_up);
        assert_eq!(next.await.held(), 10);
        assert_eq!(budget.waiting(), 0);
        drop(held);
    }

    #[test]
    fn resident_memory_is_summed_over_the_evaluators_holding_reservations() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let budget = MemoryBudget::new(100);
        let (a, b) =
            runtime.block_on(async { (budget.reserve(10).await, budget.reserve(10).await) });
        a.sampled(7);
        b.sampled(5);
        a.sampled(8);
        assert_eq!(budget.resident(), 13);
        drop(a);
        assert_eq!(budget.resident(), 5);
        drop(b);
    }
}
