//! Subjects: what the builder subscribes to, where replies go, and how a
//! received subject is told apart (docs/protocol.md, "Subjects").

/// First token of every subject the service uses.
pub const SUBJECT_ROOT: &str = "build";
/// Second token reserved for replies; never a repo name.
pub const RESPONSES_TOKEN: &str = "responses";
/// Prefix of every reply subject (`build.responses.<client>.<unique>`).
pub const RESPONSES_PREFIX: &str = "build.responses.";
/// What a builder subscribes to for the build requests of `repo`.
pub fn repo_subscription(repo: &str) -> String {
    format!("{SUBJECT_ROOT}.{repo}.*")
}

/// The NATS queue group the builders of `repo` share by default: builders
/// configured alike share its requests, each request going to one of them.
pub fn default_queue_group(repo: &str) -> String {
    format!("homelab-deploy-{repo}")
}
/// Where the builder answers with its [`StatusEvent`](super::StatusEvent).
pub const STATUS_SUBJECT: &str = "build.status";
/// Where a build is cancelled ([`CancelRequest`](super::CancelRequest) → [`CancelEvent`](super::CancelEvent)).
pub const CANCEL_SUBJECT: &str = "build.cancel";

/// The subject a build request for `repo`/`target` is published on.
pub fn request_subject(repo: &str, target: &str) -> String {
    format!("{SUBJECT_ROOT}.{repo}.{target}")
}

/// What a subject received on a [`repo_subscription`] means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind<'a> {
    /// `build.<repo>.<target>`: a build request (not yet validated).
    Build { repo: &'a str, target: &'a str },
    /// Anything under `build.responses.`: a reply, never a request.
    Response,
    /// Not a subject of this protocol.
    Other,
}

/// Classifies a subject. Replies are recognised first so that a three-token
/// `build.responses.x` can never be taken for a build of repo `responses`.
pub fn classify_subject(subject: &str) -> SubjectKind<'_> {
    let mut tokens = subject.split('.');
    if tokens.next() != Some(SUBJECT_ROOT) {
        return SubjectKind::Other;
    }
    let Some(repo) = tokens.next() else {
        return SubjectKind::Other;
    };
    if repo == RESPONSES_TOKEN {
        return SubjectKind::Response;
    }
    match (tokens.next(), tokens.next()) {
        (Some(target), None) => SubjectKind::Build { repo, target },
        _ => SubjectKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_accepts_exactly_three_tokens() {
        assert_eq!(
            classify_subject("build.nixos-servers.ns1"),
            SubjectKind::Build {
                repo: "nixos-servers",
                target: "ns1"
            }
        );
        assert_eq!(classify_subject("build.nixos-servers"), SubjectKind::Other);
        assert_eq!(classify_subject("build.a.b.c"), SubjectKind::Other);
        assert_eq!(classify_subject("deploy.a.b"), SubjectKind::Other);
        assert_eq!(classify_subject("build"), SubjectKind::Other);
    }

    #[test]
    fn classify_never_treats_responses_as_a_build() {
        assert_eq!(classify_subject("build.responses.x"), SubjectKind::Response);
        assert_eq!(
            classify_subject("build.responses.client.1"),
            SubjectKind::Response
        );
    }
}
