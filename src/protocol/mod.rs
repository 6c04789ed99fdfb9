//! Wire protocol v1: subjects, the request body and every reply event.
//!
//! This module is the single source of the protocol that `docs/protocol.md`
//! describes for people; the builder, the CLI client and the MCP server all
//! speak through these types. Change both together. Its files follow the
//! sections of that page; everything is reachable as `protocol::<item>`.

mod cancel;
mod changes;
mod errors;
mod replies;
mod request;
mod signatures;
mod status;
mod subjects;

pub use cancel::{CancelEvent, CancelOutcome, CancelRequest, CancelledState};
pub use changes::{Against, ChangedPackage, Changes, MAX_CHANGED_PACKAGES, Rebuilt};
pub use errors::{ErrorBody, ErrorCode, MAX_ERROR_MESSAGE_BYTES};
pub use replies::{
    BuildStatus, Event, HostStatus, HostSummary, MAX_LOG_EVENT_BYTES, MAX_REQUESTERS_PER_BUILD,
    Reply, SkippedHost, new_build_id, random_hex,
};
pub use request::{
    ALL_TARGET, BuildRequest, MAX_BODY_BYTES, MAX_NAME_BYTES, MAX_REF_BYTES, RequestError, Target,
    ValidRequest, is_valid_name, parse_build_request, quote_for_error, validate_ref, validate_rev,
};
pub use signatures::{KEY_HEADER, SIGNATURE_HEADER, request_digest, signed_message};
pub use status::{
    BuilderStatus, LastResult, MachineStatus, QueuedBuild, RepoInfo, RunningBuild, RunningHost,
    StatusEvent, rfc3339,
};
pub use subjects::{
    CANCEL_SUBJECT, RESPONSES_PREFIX, RESPONSES_TOKEN, STATUS_SUBJECT, SUBJECT_ROOT, SubjectKind,
    classify_subject, default_queue_group, repo_subscription, request_subject,
};

/// Room kept for the fields of a shortened answer (`finished`, `status`)
/// other than the list it gives up entries of, beyond its exact size.
const SHORTENED_SLACK: usize = 64;

fn is_zero(n: &usize) -> bool {
    *n == 0
}
