//! Before any host builds: fetch and pin the flake, then resolve the
//! request's target to the hosts to build.

use tokio::time::Instant;

use super::{Run, Runner};
use crate::builder::request::HostFailure;
use crate::config::RepoConfig;
use crate::nix::flake_url::{Locked, evaluation_url, flake_fetch_urls};
use crate::nix::json::{FlakeMetadata, host_names};
use crate::protocol::{
    ErrorCode, HostStatus, MAX_NAME_BYTES, SkippedHost, Target, is_valid_name, quote_for_error,
};

/// A flake fetched and pinned to one commit.
pub(super) struct Pinned {
    /// The locked flake URL every host of the request is evaluated from.
    pub(super) locked_url: String,
    pub(super) rev: Option<String>,
    /// What evaluations of this source are remembered by, if anything.
    pub(super) memo_key: Option<String>,
}

/// The hosts to build, in order, and the hosts of `all` that cannot be.
pub(super) type Resolved = (Vec<String>, Vec<SkippedHost>);

impl Runner {
    /// Fetches the flake (bypassing Nix's fetch cache) and pins its commit,
    /// within `fetch_timeout`. A git ref that is not a branch is tried as a
    /// tag.
    pub(super) async fn pin(
        &self,
        repo: &RepoConfig,
        run: &Run<'_>,
    ) -> Result<Pinned, HostFailure> {
        let job = run.job;
        let deadline = Instant::now() + self.config.builder.fetch_timeout;
        let mut first_failure = None;
        let mut stdout = None;
        // A request resumed after a restart builds the commit it was pinned at.
        let rev = job
            .resume
            .as_ref()
            .and_then(|resume| resume.rev.as_deref())
            .or(job.rev.as_deref());
        for url in flake_fetch_urls(&repo.url, job.git_ref.as_deref(), rev) {
            let invocation = self.nix.flake_metadata(&url);
            match self
                .run_quiet(&invocation, deadline, run.cancel, ErrorCode::FetchFailed)
                .await
            {
                Ok(out) => {
                    stdout = Some(out);
                    break;
                }
                Err(failure) if failure.error.code != ErrorCode::FetchFailed => {
                    return Err(failure);
                }
                Err(failure) => {
                    first_failure.get_or_insert(failure);
                }
            }
        }
        let Some(stdout) = stdout else {
            return Err(first_failure.unwrap_or_else(|| {
                HostFailure::failed(ErrorCode::FetchFailed, "no URL to fetch the flake from")
            }));
        };
        let metadata = FlakeMetadata::parse(&stdout).map_err(|err| {
            HostFailure::failed(
                ErrorCode::FetchFailed,
                format!("cannot read `nix flake metadata` output: {err}"),
            )
        })?;
        if let (Some(roots), Some(path)) = (&run.roots, &metadata.path) {
            let rooted = roots
                .root_source(&self.nix, path, deadline, run.cancel)
                .await;
            if let Err(err) = rooted {
                if err.status == HostStatus::Cancelled {
                    return Err(err);
                }
                tracing::warn!(error = %err.error.message, "cannot root the flake's source");
            }
        }
        let locked_url = evaluation_url(&Locked {
            url: &metadata.url,
            rev: metadata.rev(),
            nar_hash: metadata.nar_hash(),
            path: metadata.path.as_deref(),
            dir: metadata.dir(),
            submodules: metadata.submodules(),
        });
        Ok(Pinned {
            rev: metadata.rev().map(str::to_owned),
            memo_key: metadata
                .nar_hash()
                .map(|hash| format!("{} {hash}", repo.url)),
            locked_url,
        })
    }

    /// The hosts to build (see [`select_hosts`]), from the flake's
    /// `nixosConfigurations`, listed by Nix or remembered for this source.
    pub(super) async fn resolve_hosts(
        &self,
        repo: &RepoConfig,
        run: &Run<'_>,
        pinned: &Pinned,
        deadline: Instant,
    ) -> Result<Resolved, HostFailure> {
        let remembered = pinned
            .memo_key
            .as_ref()
            .and_then(|key| self.memo().hosts(key));
        let names = match remembered {
            Some(names) => names,
            None => {
                let invocation = self.nix.list_hosts(&pinned.locked_url);
                let stdout = self
                    .run_quiet(&invocation, deadline, run.cancel, ErrorCode::EvalFailed)
                    .await?;
                let names = host_names(&stdout).map_err(|err| {
                    HostFailure::failed(
                        ErrorCode::EvalFailed,
                        format!("nixosConfigurations is not an attribute set: {err}"),
                    )
                })?;
                if let Some(key) = &pinned.memo_key {
                    self.memo().remember_hosts(key, names.clone());
                }
                names
            }
        };
        select_hosts(&run.job.repo, repo, &run.job.target, names)
    }
}

/// The hosts `target` names among `names` (the attributes of `repo_name`'s
/// `nixosConfigurations`): the named one, or for `all` every attribute,
/// sorted, minus the repo's `exclude`, with the ones that cannot be built
/// (a name outside the subject charset, which is neither requestable nor
/// safe to hand to Nix) listed as skipped.
pub(super) fn select_hosts(
    repo_name: &str,
    repo: &RepoConfig,
    target: &Target,
    names: Vec<String>,
) -> Result<Resolved, HostFailure> {
    match target {
        Target::Host(host) => {
            if names.contains(host) {
                return Ok((vec![host.clone()], Vec::new()));
            }
            // Attribute names are the flake author's text: quoted, so no
            // control character reaches a message raw.
            let known: Vec<String> = names.iter().map(|name| quote_for_error(name)).collect();
            Err(HostFailure::failed(
                ErrorCode::UnknownHost,
                format!(
                    "host {host:?} is not in nixosConfigurations of {repo_name}; known hosts: {}",
                    known.join(", ")
                ),
            ))
        }
        Target::All => {
            let mut names = names;
            names.sort();
            let (mut hosts, mut skipped) = (Vec::new(), Vec::new());
            for name in names {
                if repo.exclude.contains(&name) {
                    continue;
                }
                if is_valid_name(&name) {
                    hosts.push(name);
                } else {
                    tracing::warn!(host = ?name, "skipping host whose name is not [A-Za-z0-9_-]+");
                    skipped.push(SkippedHost {
                        reason: format!(
                            "its name is not [A-Za-z0-9_-]+ (at most {MAX_NAME_BYTES} bytes, not starting with '-'); rename the attribute, or list it in the repo's exclude"
                        ),
                        host: quote_for_error(&name).trim_matches('"').to_owned(),
                    });
                }
            }
            if hosts.is_empty() && skipped.is_empty() {
                let excluded = if repo.exclude.is_empty() {
                    String::new()
                } else {
                    format!(" (exclude: {})", repo.exclude.join(", "))
                };
                return Err(HostFailure::failed(
                    ErrorCode::NoHosts,
                    format!("nixosConfigurations of {repo_name} has no host to build{excluded}"),
                ));
            }
            Ok((hosts, skipped))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(exclude: &[&str]) -> RepoConfig {
        let text = format!(
            "url = \"git+file:///srv/demo\"\nexclude = {:?}\n",
            exclude.to_vec()
        );
        toml::from_str(&text).unwrap()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn all_is_every_host_sorted_minus_the_excluded() {
        let (hosts, skipped) = select_hosts(
            "demo",
            &repo(&["legacy"]),
            &Target::All,
            names(&["ns2", "legacy", "ns1", "ha1"]),
        )
        .unwrap();
        assert_eq!(hosts, ["ha1", "ns1", "ns2"]);
        assert!(skipped.is_empty());
    }

    #[test]
    fn hosts_with_names_outside_the_charset_are_skipped_not_built() {
        let (hosts, skipped) = select_hosts(
            "demo",
            &repo(&[]),
            &Target::All,
            names(&["ns1", "bad name", "-flag", "ok\u{1b}[2J"]),
        )
        .unwrap();
        assert_eq!(hosts, ["ns1"]);
        let skipped: Vec<&str> = skipped.iter().map(|s| s.host.as_str()).collect();
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(
            skipped.iter().all(|name| !name.contains('\u{1b}')),
            "{skipped:?}"
        );
        // Excluded, an invalid name is neither built nor reported.
        let (_, skipped) = select_hosts(
            "demo",
            &repo(&["bad name"]),
            &Target::All,
            names(&["ns1", "bad name"]),
        )
        .unwrap();
        assert!(skipped.is_empty());
    }

    #[test]
    fn a_flake_with_nothing_left_to_build_is_no_hosts() {
        for (exclude, listed) in [(vec![], vec![]), (vec!["ns1"], vec!["ns1"])] {
            let failure =
                select_hosts("demo", &repo(&exclude), &Target::All, names(&listed)).unwrap_err();
            assert_eq!(failure.error.code, ErrorCode::NoHosts);
            assert_eq!(failure.status, HostStatus::Failed);
            if !exclude.is_empty() {
                assert!(failure.error.message.contains("(exclude: ns1)"));
            }
        }
    }

    #[test]
    fn a_named_host_must_be_in_the_flake_even_if_excluded_from_all() {
        let target = Target::Host("ns1".into());
        let (hosts, _) =
            select_hosts("demo", &repo(&["ns1"]), &target, names(&["ns1", "ns2"])).unwrap();
        assert_eq!(hosts, ["ns1"]);

        let missing = Target::Host("ns9".into());
        let failure =
            select_hosts("demo", &repo(&[]), &missing, names(&["ns1", "evil\u{7}"])).unwrap_err();
        assert_eq!(failure.error.code, ErrorCode::UnknownHost);
        assert!(
            failure.error.message.contains("\"ns1\""),
            "{}",
            failure.error.message
        );
        assert!(
            !failure.error.message.contains('\u{7}'),
            "{}",
            failure.error.message
        );
    }
}
