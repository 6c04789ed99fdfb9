//! Reading a build's replies: its `finished`, host outcomes, log lines,
//! event names and terminal event.

use std::collections::BTreeMap;

use homelab_deploy::protocol::{BuildStatus, ErrorCode, Event, HostStatus, Reply};

use super::requester::Timed;

/// What `host_finished` said about one host.
#[derive(Debug, Clone)]
pub struct HostOutcome {
    pub host: String,
    pub status: HostStatus,
    pub cached: bool,
    pub code: Option<ErrorCode>,
    pub message: String,
    pub out_path: Option<String>,
    /// Derivations built on each machine.
    pub machines: BTreeMap<String, u64>,
}

/// Every `host_finished` of a reply sequence, in order.
pub fn host_outcomes(replies: &[Reply]) -> Vec<HostOutcome> {
    replies
        .iter()
        .filter_map(|r| match &r.event {
            Event::HostFinished {
                host,
                status,
                cached,
                error,
                out_path,
                machines,
                ..
            } => Some(HostOutcome {
                host: host.clone(),
                status: *status,
                cached: *cached,
                code: error.as_ref().map(|e| e.code),
                message: error
                    .as_ref()
                    .map(|e| e.message.clone())
                    .unwrap_or_default(),
                out_path: out_path.clone(),
                machines: machines.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Every line of every `log` event, in order.
pub fn log_lines(replies: &[Reply]) -> Vec<&String> {
    replies
        .iter()
        .filter_map(|r| match &r.event {
            Event::Log { lines, .. } => Some(lines),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The names of events, in order.
pub fn event_names(replies: &[Reply]) -> Vec<&'static str> {
    replies.iter().map(|r| r.event.name()).collect()
}

/// The terminal event of a reply sequence.
pub fn terminal(replies: &[Reply]) -> &Event {
    &replies.last().expect("no replies").event
}

/// What a build's terminal `finished` event said.
#[derive(Debug, Clone)]
pub struct Finished {
    pub status: BuildStatus,
    /// The error's code, if the build had one.
    pub code: Option<ErrorCode>,
    /// The error's message, if the build had one.
    pub message: Option<String>,
}

impl Finished {
    /// The status and the error code.
    pub fn status_and_code(&self) -> (BuildStatus, Option<ErrorCode>) {
        (self.status, self.code)
    }

    /// The status and the error message.
    pub fn status_and_message(&self) -> (BuildStatus, Option<String>) {
        (self.status, self.message.clone())
    }
}

/// The terminal `finished` of a reply sequence; panics if it ended
/// otherwise.
pub fn finished(replies: &[Reply]) -> Finished {
    match terminal(replies) {
        Event::Finished { status, error, .. } => Finished {
            status: *status,
            code: error.as_ref().map(|e| e.code),
            message: error.as_ref().map(|e| e.message.clone()),
        },
        other => panic!("not finished: {other:?}"),
    }
}

/// The replies of timed replies, in order.
pub fn untimed(timed: Vec<Timed>) -> Vec<Reply> {
    timed.into_iter().map(|t| t.reply).collect()
}
