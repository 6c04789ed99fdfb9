//! The build queue: one running request, at most `queue_limit` waiting,
//! across all repos (they share one store and machine), shared fairly
//! between owners: at most `queue_per_owner` of one owner wait at once, and
//! the next job is the earliest one of the owner served longest ago (round
//! robin), so one requester's many long builds cannot lock out the others.
//! Unsigned requests count as one owner.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use tokio::sync::Notify;

/// What [`Queue::take_if`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take<J> {
    /// The job, out of the queue.
    Taken(J),
    /// A matching job that may not be taken; it stays.
    Refused,
    /// No matching job.
    Missing,
}

/// Why a request could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// `queue_limit` requests are already waiting.
    Full,
    /// `queue_per_owner` requests of the same owner are already waiting.
    OwnerFull,
    /// The builder is shutting down.
    Closed,
    /// The request could not be journaled (the intake's own refusal).
    Unrecorded,
}

/// Whose a job is; `None`: unsigned.
type Owner = Option<String>;

struct State<J> {
    /// In arrival order.
    waiting: VecDeque<J>,
    running: bool,
    closed: bool,
    /// When each owner with waiting jobs was last served (a count of jobs
    /// taken); never served: absent, which comes first.
    last_served: HashMap<Owner, u64>,
    taken: u64,
}

/// A fair queue with a single consumer that knows whether it is busy.
pub(crate) struct Queue<J> {
    state: Mutex<State<J>>,
    wake: Notify,
    limit: usize,
    per_owner: usize,
    owner: fn(&J) -> Owner,
}

impl<J> Queue<J> {
    /// A first-come first-served queue that lets `limit` jobs wait behind
    /// the running one.
    #[cfg(test)]
    pub(crate) fn new(limit: usize) -> Self {
        Self::shared(limit, limit, |_| None)
    }

    /// A queue that lets `limit` jobs wait behind the running one, at most
    /// `per_owner` of each `owner`, served round robin between owners.
    pub(crate) fn shared(limit: usize, per_owner: usize, owner: fn(&J) -> Owner) -> Self {
        Self {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                running: false,
                closed: false,
                last_served: HashMap::new(),
                taken: 0,
            }),
            wake: Notify::new(),
            limit,
            per_owner,
            owner,
        }
    }

    /// The indices of the waiting jobs in the order they will be taken:
    /// each time, the earliest job of the owner served longest ago. That
    /// is a round robin over the owners, each taking its jobs in arrival
    /// order, starting with the owners never served (by their earliest
    /// job), then the others by when they were served; linear in the
    /// number of waiting jobs, as every accepted request asks for it.
    fn service_order(&self, state: &State<J>) -> Vec<usize> {
        // Each owner's jobs, owners in the order of their earliest job.
        let mut turns: Vec<(Option<u64>, Vec<usize>)> = Vec::new();
        let mut slots: HashMap<Owner, usize> = HashMap::new();
        for (index, job) in state.waiting.iter().enumerate() {
            let owner = (self.owner)(job);
            let slot = *slots.entry(owner).or_insert_with_key(|owner| {
                turns.push((state.last_served.get(owner).copied(), Vec::new()));
                turns.len() - 1
            });
            turns[slot].1.push(index);
        }
        // Stable: owners never served (`None`) keep their earliest job's
        // order; served ones have distinct times.
        turns.sort_by_key(|(served, _)| *served);
        let mut round: VecDeque<_> = turns
            .into_iter()
            .map(|(_, jobs)| jobs.into_iter())
            .collect();
        let mut order = Vec::with_capacity(state.waiting.len());
        while let Some(mut jobs) = round.pop_front() {
            if let Some(index) = jobs.next() {
                order.push(index);
                round.push_back(jobs);
            }
        }
        order
    }

    /// Where the job at `index` of `waiting` stands (0: it starts now).
    fn position(&self, state: &State<J>, index: usize) -> usize {
        let place = self
            .service_order(state)
            .iter()
            .position(|&i| i == index)
            .unwrap_or(index);
        place + usize::from(state.running)
    }

    fn check_room(&self, state: &State<J>, job: &J) -> Result<(), PushError> {
        let owner = (self.owner)(job);
        if state.closed {
            Err(PushError::Closed)
        } else if state.waiting.len() >= self.limit {
            Err(PushError::Full)
        } else if state
            .waiting
            .iter()
            .filter(|waiting| (self.owner)(waiting) == owner)
            .count()
            >= self.per_owner
        {
            Err(PushError::OwnerFull)
        } else {
            Ok(())
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<J>> {
        crate::sync::lock(&self.state)
    }

    /// Appends a job; returns how many jobs are ahead of it (0: it starts now).
    #[cfg(test)]
    fn push(&self, job: J) -> Result<usize, PushError> {
        self.push_announced(job, |_| {})
    }

    /// Appends a job and calls `announce` with its position before the
    /// consumer can take it, so whatever `announce` sends comes first.
    pub(crate) fn push_announced(
        &self,
        job: J,
        announce: impl FnOnce(usize),
    ) -> Result<usize, PushError> {
        let mut state = self.lock();
        self.check_room(&state, &job)?;
        // Under the lock: the consumer cannot take it before `announce`.
        state.waiting.push_back(job);
        let position = self.position(&state, state.waiting.len() - 1);
        announce(position);
        drop(state);
        self.wake.notify_one();
        Ok(position)
    }

    /// Whether a push of `job` now would be taken (the intake, the only
    /// producer, asks before it journals a request).
    pub(crate) fn has_room(&self, job: &J) -> Result<(), PushError> {
        self.check_room(&self.lock(), job)
    }

    /// Appends a job picked up again after a restart: it was accepted
    /// before, so `queue_limit` does not apply to it.
    pub(crate) fn restore(&self, job: J) {
        self.lock().waiting.push_back(job);
        self.wake.notify_one();
    }

    /// Finds the first waiting job that `matches` and calls `join` with it
    /// and its position, while the consumer cannot take it. Returns whether
    /// one was found.
    pub(crate) fn join(&self, matches: impl Fn(&J) -> bool, join: impl FnOnce(&J, usize)) -> bool {
        let state = self.lock();
        if state.closed {
            return false;
        }
        match state.waiting.iter().position(matches) {
            Some(index) => {
                join(&state.waiting[index], self.position(&state, index));
                true
            }
            None => false,
        }
    }

    /// Takes the first waiting job that `matches` out of the queue, if
    /// `allow` lets it go.
    pub(crate) fn take_if(
        &self,
        matches: impl Fn(&J) -> bool,
        allow: impl FnOnce(&J) -> bool,
    ) -> Take<J> {
        let mut state = self.lock();
        let Some(index) = state.waiting.iter().position(matches) else {
            return Take::Missing;
        };
        if !allow(&state.waiting[index]) {
            return Take::Refused;
        }
        match state.waiting.remove(index) {
            Some(job) => Take::Taken(job),
            None => Take::Missing,
        }
    }

    /// Waits for the next job and marks the queue busy until [`Self::done`].
    /// Returns `None` once the queue is closed.
    #[cfg(test)]
    async fn next(&self) -> Option<J> {
        self.next_with(|_| {}).await
    }

    /// [`Self::next`], calling `on_take` with the job while it is taken, so
    /// that for others it is never neither waiting nor running.
    pub(crate) async fn next_with(&self, on_take: impl Fn(&J)) -> Option<J> {
        loop {
            let notified = self.wake.notified();
            {
                let mut state = self.lock();
                if state.closed {
                    return None;
                }
                let next = self.service_order(&state).first().copied();
                if let Some(job) = next.and_then(|index| state.waiting.remove(index)) {
                    state.running = true;
                    state.taken += 1;
                    let owner = (self.owner)(&job);
                    let taken = state.taken;
                    state.last_served.insert(owner.clone(), taken);
                    // Only owners still waiting need remembering.
                    let waiting: HashSet<Owner> = state.waiting.iter().map(self.owner).collect();
                    state
                        .last_served
                        .retain(|served, _| *served == owner || waiting.contains(served));
                    on_take(&job);
                    return Some(job);
                }
            }
            notified.await;
        }
    }

    /// The running job is finished.
    pub(crate) fn done(&self) {
        self.lock().running = false;
    }

    /// Refuses new jobs and hands back the ones still waiting.
    pub(crate) fn close(&self) -> Vec<J> {
        let mut state = self.lock();
        state.closed = true;
        let waiting = state.waiting.drain(..).collect();
        drop(state);
        self.wake.notify_waiters();
        waiting
    }

    /// A summary of every waiting job, in the order they will run.
    pub(crate) fn snapshot<T>(&self, summarize: impl Fn(&J) -> T) -> Vec<T> {
        let state = self.lock();
        self.service_order(&state)
            .into_iter()
            .map(|index| summarize(&state.waiting[index]))
            .collect()
    }

    /// Number of jobs waiting (not counting the running one).
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn positions_count_the_running_job_and_those_waiting() {
        let queue = Queue::new(2);
        assert_eq!(queue.push("a"), Ok(0));
        assert_eq!(queue.next().await, Some("a"));
        assert_eq!(queue.push("b"), Ok(1));
        assert_eq!(queue.push("c"), Ok(2));
        assert_eq!(queue.push("d"), Err(PushError::Full));
        queue.done();
        assert_eq!(queue.next().await, Some("b"));
        assert_eq!(queue.push("e"), Ok(2));
    }

    #[tokio::test]
    async fn waiting_jobs_can_be_joined_and_removed() {
        let queue = Queue::new(4);
        queue.push(1).unwrap();
        assert_eq!(queue.next().await, Some(1));
        queue.push(2).unwrap();
        queue.push(3).unwrap();
        let mut joined = None;
        assert!(queue.join(|j| *j == 3, |j, position| joined = Some((*j, position))));
        assert_eq!(joined, Some((3, 2)));
        assert!(
            !queue.join(|j| *j == 1, |_, _| {}),
            "the running job is not waiting"
        );
        assert_eq!(queue.take_if(|j| *j == 2, |_| false), Take::Refused);
        assert_eq!(queue.waiting(), 2, "a refused job stays");
        assert_eq!(queue.take_if(|j| *j == 2, |_| true), Take::Taken(2));
        assert_eq!(queue.take_if(|j| *j == 2, |_| true), Take::Missing);
        assert_eq!(queue.waiting(), 1);
        let mut announced = None;
        queue
            .push_announced(5, |position| announced = Some(position))
            .unwrap();
        assert_eq!(announced, Some(2));
    }

    /// Jobs named `owner:n`.
    fn fair(limit: usize, per_owner: usize) -> Queue<&'static str> {
        Queue::shared(limit, per_owner, |job| {
            job.split_once(':').map(|(owner, _)| owner.to_owned())
        })
    }

    #[tokio::test]
    async fn owners_take_turns_whatever_the_arrival_order() {
        let queue = fair(16, 8);
        for job in ["a:1", "a:2", "a:3", "a:4", "b:1", "c:1", "b:2"] {
            queue.push(job).unwrap();
        }
        assert_eq!(
            queue.snapshot(|j| *j),
            ["a:1", "b:1", "c:1", "a:2", "b:2", "a:3", "a:4"]
        );
        let mut ran = Vec::new();
        for _ in 0..3 {
            ran.push(queue.next().await.unwrap());
            queue.done();
        }
        assert_eq!(ran, ["a:1", "b:1", "c:1"]);
        // A newcomer goes before the owners served already.
        assert_eq!(queue.push("d:1"), Ok(0));
        assert_eq!(queue.next().await, Some("d:1"));
        queue.done();
        assert_eq!(queue.push("b:3"), Ok(3), "after a:2, b:2 and a:3");
    }

    /// The order [`Queue::service_order`] computes, one pick at a time as
    /// its documentation says: the earliest job of the owner served
    /// longest ago (never served first, then the earliest job first).
    fn order_by_picking(
        owners: &[Owner],
        last_served: &HashMap<Owner, u64>,
        taken: u64,
    ) -> Vec<usize> {
        let mut last_served = last_served.clone();
        let mut taken_count = taken;
        let mut taken = vec![false; owners.len()];
        let mut order = Vec::new();
        for _ in 0..owners.len() {
            let mut seen = HashSet::new();
            let next = (0..owners.len())
                .filter(|&i| !taken[i] && seen.insert(&owners[i]))
                .min_by_key(|&i| (last_served.get(&owners[i]).copied(), i))
                .unwrap();
            taken[next] = true;
            taken_count += 1;
            last_served.insert(owners[next].clone(), taken_count);
            order.push(next);
        }
        order
    }

    proptest::proptest! {
        #[test]
        fn the_service_order_picks_the_earliest_job_of_the_owner_served_longest_ago(
            steps in proptest::collection::vec(proptest::option::of(0u8..5), 0..60),
        ) {
            // Pushes by owners 0..4 (4: unsigned), with a job taken now and then.
            let queue: Queue<(Owner, usize)> = Queue::shared(64, 64, |job| job.0.clone());
            for (n, step) in steps.into_iter().enumerate() {
                match step {
                    Some(owner) => {
                        let owner = (owner < 4).then(|| owner.to_string());
                        queue.lock().waiting.push_back((owner, n));
                    }
                    None => {
                        let mut state = queue.lock();
                        let Some(&first) = queue.service_order(&state).first() else { continue };
                        let job = state.waiting.remove(first).unwrap();
                        state.taken += 1;
                        let taken = state.taken;
                        state.last_served.insert(job.0, taken);
                    }
                }
                let state = queue.lock();
                let owners: Vec<Owner> = state.waiting.iter().map(|job| job.0.clone()).collect();
                proptest::prop_assert_eq!(
                    queue.service_order(&state),
                    order_by_picking(&owners, &state.last_served, state.taken)
                );
            }
        }
    }

    #[test]
    fn one_owner_cannot_fill_the_queue() {
        let queue = fair(16, 2);
        assert_eq!(queue.push("a:1"), Ok(0));
        assert_eq!(queue.push("a:2"), Ok(1));
        assert_eq!(queue.push("a:3"), Err(PushError::OwnerFull));
        assert_eq!(queue.has_room(&"a:4"), Err(PushError::OwnerFull));
        assert_eq!(queue.push("b:1"), Ok(1), "b goes before a's second");
    }

    #[tokio::test]
    async fn next_waits_for_a_push() {
        let queue = std::sync::Arc::new(Queue::new(1));
        let consumer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(queue.push(7), Ok(0));
        assert_eq!(consumer.await.unwrap(), Some(7));
    }

    #[tokio::test]
    async fn close_returns_waiting_jobs_and_refuses_more() {
        let queue = std::sync::Arc::new(Queue::new(4));
        queue.push(1).unwrap();
        queue.push(2).unwrap();
        assert_eq!(queue.close(), vec![1, 2]);
        assert_eq!(queue.push(3), Err(PushError::Closed));
        assert_eq!(queue.next().await, None);
    }

    #[tokio::test]
    async fn close_wakes_an_idle_consumer() {
        let queue = std::sync::Arc::new(Queue::<u8>::new(1));
        let consumer = tokio::spawn({
            let queue = queue.clone();
            async move { queue.next().await }
        });
        tokio::task::yield_now().await;
        queue.close();
        assert_eq!(consumer.await.unwrap(), None);
    }
}
