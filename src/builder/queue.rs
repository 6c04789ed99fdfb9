//! The build queue: one running request, at most `queue_limit` waiting, in
//! arrival order across all repos (they share one store and machine).

use std::collections::VecDeque;
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
    /// The builder is shutting down.
    Closed,
    /// The request could not be journaled (the intake's own refusal).
    Unrecorded,
}

struct State<J> {
    waiting: VecDeque<J>,
    running: bool,
    closed: bool,
}

/// A FIFO with a single consumer that knows whether it is busy.
pub(crate) struct Queue<J> {
    state: Mutex<State<J>>,
    wake: Notify,
    limit: usize,
}

impl<J> Queue<J> {
    /// A queue that lets `limit` jobs wait behind the running one.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                waiting: VecDeque::new(),
                running: false,
                closed: false,
            }),
            wake: Notify::new(),
            limit,
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
        if state.closed {
            return Err(PushError::Closed);
        }
        if state.waiting.len() >= self.limit {
            return Err(PushError::Full);
        }
        let position = state.waiting.len() + usize::from(state.running);
        announce(position);
        state.waiting.push_back(job);
        drop(state);
        self.wake.notify_one();
        Ok(position)
    }

    /// Whether a push now would be taken (the intake, the only producer,
    /// asks before it journals a request).
    pub(crate) fn has_room(&self) -> Result<(), PushError> {
        let state = self.lock();
        if state.closed {
            Err(PushError::Closed)
        } else if state.waiting.len() >= self.limit {
            Err(PushError::Full)
        } else {
            Ok(())
        }
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
        let running = usize::from(state.running);
        match state.waiting.iter().position(matches) {
            Some(index) => {
                join(&state.waiting[index], index + running);
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
                if let Some(job) = state.waiting.pop_front() {
                    state.running = true;
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

    /// A summary of every waiting job, in queue order.
    pub(crate) fn snapshot<T>(&self, summarize: impl Fn(&J) -> T) -> Vec<T> {
        self.lock().waiting.iter().map(summarize).collect()
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
