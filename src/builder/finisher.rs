//! The one way a request ends, and the one way it pauses. The order of the
//! steps is the contract: everything that answers status and queue
//! questions is settled before the requester hears `finished`; the
//! request leaves the live requests once that event is queued for sending
//! (so a requester who asks again never finds a request that is neither
//! running nor answered), and the journal once it has been sent (so a
//! restart never drops a request whose requesters were not answered).

use std::sync::Arc;

use super::journal::{Journaling, Record};
use super::live::LiveRequests;
use super::monitor::Monitor;
use super::queue::Queue;
use super::request::{Job, Report};
use crate::protocol::Event;

/// Where a request was when it ended or paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// In the queue (or never queued: a journaled request that no longer
    /// fits the config).
    Waiting,
    /// Taken by the worker: the queue counts it as running.
    Running,
}

/// Ends and pauses requests for the intake and the worker.
pub(crate) struct Finisher {
    monitor: Arc<Monitor>,
    queue: Arc<Queue<Job>>,
    journal: Journaling,
    live: Arc<LiveRequests>,
}

impl Finisher {
    pub(crate) fn new(
        monitor: Arc<Monitor>,
        queue: Arc<Queue<Job>>,
        journal: Journaling,
        live: Arc<LiveRequests>,
    ) -> Self {
        Self {
            monitor,
            queue,
            journal,
            live,
        }
    }

    /// Ends `job` with `report`: counted and off the status, the queue free
    /// for the next job, `finished` to every requester, then out of the
    /// journal and the live requests.
    pub(crate) fn finish(&self, job: &Job, report: Report, stage: Stage) {
        self.monitor
            .build_finished(&job.build_id, &job.repo, report.status, report.duration);
        if stage == Stage::Running {
            self.queue.done();
        }
        // Out of the journal only once `finished` has left for the server:
        // a builder killed before that resumes the request at its next
        // start and sends it again, rather than leaving its requesters
        // waiting for an event that never comes.
        let (journal, build_id) = (self.journal.clone(), job.build_id.clone());
        job.finish(
            report,
            Box::new(move || journal.note(Record::Ended { build_id })),
        );
        self.live.remove(&job.build_id);
    }

    /// Pauses `job` for the next start: its requesters hear `interrupted`,
    /// and it stays in the journal (and is not counted as finished).
    pub(crate) fn interrupt(&self, job: &Job, stage: Stage) {
        if stage == Stage::Running {
            self.monitor.build_interrupted(&job.build_id);
            self.queue.done();
        }
        job.replies
            .send(&job.build_id, Event::Interrupted { resume: true });
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use tokio::sync::watch;

    use super::*;
    use crate::builder::cancel::{Cancellation, StopReason};
    use crate::builder::queue::Take;
    use crate::builder::replies::{Publisher, Replies};
    use crate::config::Config;
    use crate::nats::ConnectionState;
    use crate::protocol::{BuildStatus, Target};

    struct Fixture {
        finisher: Finisher,
        monitor: Arc<Monitor>,
        queue: Arc<Queue<Job>>,
        live: Arc<LiveRequests>,
        publisher: Arc<Publisher>,
    }

    fn fixture() -> Fixture {
        let text = "[nats]\nurl = \"nats://127.0.0.1:4222\"\n[repos.demo]\nurl = \"git+file:///srv/demo\"\n";
        let config = Config::parse(text, Path::new("test.toml")).unwrap();
        let queue = Arc::new(Queue::shared(8, 8, |job: &Job| job.owner.clone()));
        let (_, nats) = watch::channel(ConnectionState {
            connected: true,
            connects: 1,
            since: std::time::Instant::now(),
        });
        let monitor = Arc::new(
            Monitor::new(&config, Arc::clone(&queue), nats, Journaling::default()).unwrap(),
        );
        let live = Arc::new(LiveRequests::default());
        let finisher = Finisher::new(
            Arc::clone(&monitor),
            Arc::clone(&queue),
            Journaling::default(),
            Arc::clone(&live),
        );
        Fixture {
            finisher,
            monitor,
            queue,
            live,
            publisher: Publisher::offline(),
        }
    }

    fn job(f: &Fixture, build_id: &str, reply: &str) -> Job {
        let replies = Replies::new(Arc::clone(&f.publisher), Some(reply.into()));
        f.live.register(build_id, &replies, None);
        Job {
            build_id: build_id.into(),
            repo: "demo".into(),
            target: Target::All,
            git_ref: None,
            rev: None,
            logs: false,
            owner: None,
            replies,
            received_at: SystemTime::now(),
            resume: None,
        }
    }

    /// Takes the next job as the worker does, registered as running.
    fn run_next(f: &Fixture) -> Job {
        let cancel = Cancellation::root(Default::default(), StopReason::Shutdown);
        let Take::Taken(job) = f.queue.take_if(|_| true, |_| true) else {
            panic!("nothing waits");
        };
        f.monitor.build_started(&job, cancel);
        job
    }

    fn report(status: BuildStatus) -> Report {
        Report {
            status,
            rev: None,
            hosts: Vec::new(),
            error: None,
            duration: Duration::from_secs(1),
            skipped: Vec::new(),
        }
    }

    #[test]
    fn a_finished_request_is_off_the_status_and_frees_its_subject() {
        let f = fixture();
        f.queue.restore(job(&f, "b-1", "build.responses.f.1"));
        let running = run_next(&f);
        assert!(f.monitor.status().running.is_some());
        f.finisher
            .finish(&running, report(BuildStatus::Success), Stage::Running);

        assert!(f.monitor.status().running.is_none());
        assert!(!f.live.is_attached(&"build.responses.f.1".into()));
        let sent = f.publisher.take_queued();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].1["event"], "finished");
        assert_eq!(sent[0].1["status"], "success");
    }

    #[test]
    fn a_request_leaves_the_journal_only_once_finished_is_sent() {
        use crate::builder::journal::{AcceptedRequest, Journal};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let (journal, _) = Journal::open(&path).unwrap();
        let journaling = Journaling::to(Arc::new(journal));
        let mut f = fixture();
        f.finisher = Finisher::new(
            Arc::clone(&f.monitor),
            Arc::clone(&f.queue),
            journaling.clone(),
            Arc::clone(&f.live),
        );
        let accepted = job(&f, "b-3", "build.responses.f.3");
        journaling
            .record(Record::Accepted(AcceptedRequest::of(&accepted)))
            .unwrap();
        f.queue.restore(accepted);
        let running = run_next(&f);
        f.finisher
            .finish(&running, report(BuildStatus::Success), Stage::Running);
        let unfinished = |path: &Path| {
            let (_, recovered) = Journal::open(path).unwrap();
            recovered
                .requests
                .iter()
                .map(|u| u.request.build_id.clone())
                .collect::<Vec<_>>()
        };
        // Killed now, the next start would send `finished` again.
        assert_eq!(unfinished(&path), ["b-3"]);
        let sent = f.publisher.take_queued();
        assert_eq!(sent[0].1["event"], "finished", "{sent:?}");
        assert!(unfinished(&path).is_empty());
    }

    #[test]
    fn an_interrupted_request_keeps_its_subject_and_hears_interrupted() {
        let f = fixture();
        f.queue.restore(job(&f, "b-2", "build.responses.f.2"));
        let running = run_next(&f);
        f.finisher.interrupt(&running, Stage::Running);

        assert!(f.monitor.status().running.is_none());
        // Still live: it resumes, under the same subject, after the restart.
        assert!(f.live.is_attached(&"build.responses.f.2".into()));
        let sent = f.publisher.take_queued();
        assert_eq!(sent[0].1["event"], "interrupted", "{sent:?}");
        assert_eq!(sent[0].1["resume"], true);
    }
}
