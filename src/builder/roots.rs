//! Garbage-collector roots: what the builder evaluated and built stays in
//! the store (and the binary cache on the build host keeps serving it).
//!
//! The layout of `gc_roots_dir` (README "GC roots" describes it too):
//!
//! ```text
//! <dir>/<repo>/<host>                 -> .gen/<host>-<n>-link (the newest)
//! <dir>/<repo>/.gen/<host>-<n>-link   -> /nix/store/…   default ref, keep_roots generations
//! <dir>/<repo>/.refs/<key>/<host>     -> .gen/<host>-<n>-link
//! <dir>/<repo>/.refs/<key>/.gen/<host>-<n>-link -> /nix/store/…   other refs and revs: the latest
//! <dir>/<repo>/.refs/<key>/.last-build                         its mtime: when it last built
//! <dir>/.requests/<build_id>/<host>.drv  -> /nix/store/….drv  while the request runs
//! <dir>/.requests/<build_id>/<host>      -> /nix/store/…      the output, from the moment it exists
//! <dir>/.requests/<build_id>/.source     -> /nix/store/…-source
//! ```
//!
//! `<key>` is `ref-<ref>` (each `/` written `%2F`) or `rev-<commit>`. Repo
//! and host names are `[A-Za-z0-9_-]+`, so no name collides with the dotted
//! entries, and generations live apart from the hosts' current links: a
//! host may be called `web-1-link`, and its link is then no generation of
//! `web`. Inside `.gen`, `<host>-<n>-link` names one host's generation only
//! (the host is everything before the last `-<n>`). Every link is an
//! indirect root (`nix build --out-link`), so the builder needs no write
//! access to `/nix/var/nix/gcroots`.
//!
//! Earlier versions kept the generations beside the current links; the
//! builder moves them into `.gen` when it starts ([`GcRoots::migrate`]),
//! rooting each at its new place before the old link goes.
//!
//! The default ref's generations are like Nix profiles: each success that
//! changes a host's output adds one and swaps `<host>` over atomically;
//! only the newest `keep_roots` are kept, and nothing else ever removes
//! them. A side ref keeps one generation per host, and its whole directory
//! goes `side_roots_ttl` after its last build, or earlier when a repo would
//! have more than `side_roots_max` of them: a new one then evicts the
//! oldest (by last build), so distinct refs or revs cannot pin without
//! bound what the collector may not take. A request's own directory
//! holds its derivations and outputs until it ends; the builder removes it
//! then, and removes any left over by a crash when it starts.
//!
//! An output that is its lineage's current result already (an unchanged
//! host) gets no link in the request's directory: that generation roots it
//! for the whole request. Nothing else moves it meanwhile — requests run one
//! at a time, only the host's own result replaces its current link, and a
//! request evicts side lineages other than its own only, while expiry runs
//! between requests. Nor is its remembered derivation rooted: nothing is
//! built from it unless the output is not valid, and the host roots it then,
//! before building.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::cancel::Cancellation;
use super::eval::Evaluated;
use super::request::HostFailure;
use super::step::{self, StepFailure};
use crate::nix::NixCli;
use crate::nix::argv::Invocation;
use crate::nix::process::Limits;
use crate::protocol::{ErrorCode, random_hex};

/// Where side roots live inside a repo's directory.
const SIDE_DIR: &str = ".refs";
/// Where requests keep their temporary roots.
const REQUESTS_DIR: &str = ".requests";
/// The file whose mtime says when a side ref last built.
const LAST_BUILD: &str = ".last-build";
/// Where a lineage's generations live, apart from the hosts' current links.
const GENERATIONS_DIR: &str = ".gen";

/// Where and how many roots are kept.
#[derive(Debug, Clone)]
pub(crate) struct GcRoots {
    pub(crate) dir: PathBuf,
    pub(crate) keep: usize,
    pub(crate) side_ttl: Duration,
    /// Side lineages kept per repo at most.
    pub(crate) side_max: usize,
}

/// Which line of roots a request's results join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lineage {
    /// The repo's default ref without a `rev`: the deployable history.
    Default,
    /// Any other ref, or an explicit `rev`: the directory name under `.refs`.
    Side(String),
}

impl Lineage {
    /// The lineage of a request for `git_ref`/`rev` in a repo whose default
    /// ref is `default_ref`.
    pub(crate) fn of(git_ref: Option<&str>, rev: Option<&str>, default_ref: Option<&str>) -> Self {
        match (git_ref, rev) {
            (_, Some(rev)) => Self::Side(format!("rev-{rev}")),
            (git_ref, None) if git_ref == default_ref => Self::Default,
            (Some(git_ref), None) => Self::Side(format!("ref-{}", git_ref.replace('/', "%2F"))),
            (None, None) => Self::Default,
        }
    }
}

fn failure(what: &str, path: &Path, err: impl std::fmt::Display) -> HostFailure {
    HostFailure::failed(
        ErrorCode::Internal,
        format!("cannot {what} GC root {}: {err}", path.display()),
    )
}

/// The generation number of `name` if it is `<host>-<n>-link`.
fn generation(name: &str, host: &str) -> Option<u64> {
    name.strip_prefix(host)?
        .strip_prefix('-')?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

/// Runs a Nix command that adds a root at `link`.
async fn add_root(
    invocation: &Invocation,
    link: &Path,
    deadline: Instant,
    cancel: &Cancellation,
) -> Result<(), HostFailure> {
    match step::run_quiet(invocation, Limits::deadline(deadline), cancel.token()).await {
        Ok(_) => Ok(()),
        Err(StepFailure::Cancelled) => Err(HostFailure::cancelled(cancel.reason())),
        Err(other) => Err(failure("add", link, other)),
    }
}

impl GcRoots {
    fn requests_dir(&self) -> PathBuf {
        self.dir.join(REQUESTS_DIR)
    }

    /// A fresh directory for the temporary roots of request `build_id`.
    pub(crate) fn request(&self, build_id: &str) -> Result<RequestRoots, HostFailure> {
        let dir = self.requests_dir().join(build_id);
        std::fs::create_dir_all(&dir)
            .map_err(|err| failure("create the directory of", &dir, err))?;
        Ok(RequestRoots {
            dir,
            unchanged: Arc::default(),
        })
    }

    /// Removes the temporary roots of requests that did not end (a crash).
    pub(crate) fn sweep_requests(&self) {
        let dir = self.requests_dir();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    tracing::info!(path = %entry.path().display(), "removing the roots of a request that did not end");
                    remove_tree(&entry.path());
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(path = %dir.display(), %err, "cannot list request roots"),
        }
    }

    /// Removes side roots whose last build is older than `side_roots_ttl`;
    /// returns the `(repo, key)` of each.
    pub(crate) fn expire_side_roots(&self) -> Vec<(String, String)> {
        let mut expired = Vec::new();
        let Ok(repos) = std::fs::read_dir(&self.dir) else {
            return expired;
        };
        let now = SystemTime::now();
        for repo in repos.flatten() {
            let repo_name = repo.file_name().to_string_lossy().into_owned();
            if repo_name.starts_with('.') {
                continue;
            }
            let Ok(sides) = std::fs::read_dir(repo.path().join(SIDE_DIR)) else {
                continue;
            };
            for side in sides.flatten() {
                let last = last_build(&side.path());
                let age = last.and_then(|t| now.duration_since(t).ok());
                if age.is_some_and(|age| age >= self.side_ttl) {
                    let key = side.file_name().to_string_lossy().into_owned();
                    tracing::info!(repo = %repo_name, %key, "side roots expired");
                    remove_tree(&side.path());
                    expired.push((repo_name.clone(), key));
                }
            }
        }
        expired
    }

    /// Makes room for side lineage `key` of `repo` under `side_max`: if it
    /// is new and the repo has that many already, the oldest (by last
    /// build) are removed. `key` itself never is. Returns the keys removed.
    fn make_room_for_side(&self, repo: &str, key: &str) -> Vec<String> {
        let sides_dir = self.dir.join(repo).join(SIDE_DIR);
        if sides_dir.join(key).exists() {
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir(&sides_dir) else {
            return Vec::new();
        };
        let mut sides: Vec<(SystemTime, String, PathBuf)> = entries
            .flatten()
            .filter(|side| side.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|side| {
                let name = side.file_name().to_str()?.to_owned();
                let last = last_build(&side.path()).unwrap_or(SystemTime::UNIX_EPOCH);
                (name != key).then_some((last, name, side.path()))
            })
            .collect();
        let excess = (sides.len() + 1).saturating_sub(self.side_max.max(1));
        sides.sort();
        sides
            .into_iter()
            .take(excess)
            .map(|(_, evicted, path)| {
                tracing::info!(repo = %repo, key = %evicted, "side roots evicted for a newer one (side_roots_max)");
                remove_tree(&path);
                evicted
            })
            .collect()
    }

    /// Where `repo`'s roots in `lineage` live.
    fn lineage_dir(&self, repo: &str, lineage: &Lineage) -> PathBuf {
        match lineage {
            Lineage::Default => self.dir.join(repo),
            Lineage::Side(key) => self.dir.join(repo).join(SIDE_DIR).join(key),
        }
    }

    /// The store path `repo`/`host` in `lineage` points to now (its newest
    /// generation), if it has one.
    pub(crate) fn current_result(
        &self,
        repo: &str,
        lineage: &Lineage,
        host: &str,
    ) -> Option<String> {
        let path = std::fs::canonicalize(self.lineage_dir(repo, lineage).join(host)).ok()?;
        path.to_str().map(str::to_owned)
    }

    /// The store path `repo`/`host` on the default ref points to now, if it
    /// has one.
    pub(crate) fn default_result(&self, repo: &str, host: &str) -> Option<String> {
        self.current_result(repo, &Lineage::Default, host)
    }

    /// Roots `out_path` as the newest generation of `repo`/`host` in
    /// `lineage`. The output is rooted already (by the request, or as this
    /// generation), so there is no window in which the collector could take
    /// it; an unchanged output costs no Nix call. A new side
    /// lineage may evict older ones (`side_max`): their keys are returned.
    pub(crate) async fn record(
        &self,
        nix: &NixCli,
        (repo, lineage): (&str, &Lineage),
        host: &str,
        out_path: &str,
        deadline: Instant,
        cancel: &Cancellation,
    ) -> Result<Vec<String>, HostFailure> {
        let dir = self.lineage_dir(repo, lineage);
        let (keep, evicted) = match lineage {
            Lineage::Default => (self.keep.max(1), Vec::new()),
            Lineage::Side(key) => (1, self.make_room_for_side(repo, key)),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|err| failure("create the directory of", &dir, err))?;
        if let Lineage::Side(_) = lineage {
            // Written on every build, whether the output changed or not:
            // the TTL counts from here.
            let stamp = dir.join(LAST_BUILD);
            std::fs::write(&stamp, b"").map_err(|err| failure("stamp", &stamp, err))?;
        }
        let current = dir.join(host);
        if std::fs::canonicalize(&current).is_ok_and(|target| target == Path::new(out_path)) {
            return Ok(evicted); // unchanged output: already rooted
        }

        let generations_dir = dir.join(GENERATIONS_DIR);
        std::fs::create_dir_all(&generations_dir)
            .map_err(|err| failure("create the directory of", &generations_dir, err))?;
        let mut generations = generations(&generations_dir, host)?;
        let next = generations.last().map_or(1, |(n, _)| n + 1);
        let name = format!("{host}-{next}-link");
        let link = generations_dir.join(&name);
        let link_str = link.to_string_lossy().into_owned();
        // `nix build --out-link` on a valid path creates the link and
        // registers it with the daemon as an (indirect) root.
        add_root(&nix.add_root(out_path, &link_str), &link, deadline, cancel).await?;
        point_current_at(&dir, host, &name)?;

        generations.push((next, link));
        let excess = generations.len().saturating_sub(keep);
        for (_, old) in generations.drain(..excess) {
            if let Err(err) = std::fs::remove_file(&old) {
                tracing::warn!(path = %old.display(), %err, "cannot remove an old GC root");
            }
        }
        Ok(evicted)
    }

    /// Moves generations of the earlier layout (`<host>-<n>-link` beside
    /// `<host>`) into `.gen`, in every repo and side ref. Each is rooted at
    /// its new place (through Nix, so the daemon knows it) before the
    /// current link is swapped and the old link removed: the output never
    /// goes unrooted. A link whose output is gone, or a host whose current
    /// generation cannot be moved, is left as it was, with a warning.
    pub(crate) async fn migrate(&self, nix: &NixCli, deadline: Instant, cancel: &Cancellation) {
        let Ok(repos) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut dirs = Vec::new();
        for repo in repos.flatten() {
            if repo.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let sides = std::fs::read_dir(repo.path().join(SIDE_DIR));
            dirs.extend(
                sides
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|side| side.path()),
            );
            dirs.push(repo.path());
        }
        for dir in dirs {
            for (host, current) in earlier_current_links(&dir) {
                if let Err(failure) =
                    migrate_host(nix, &dir, &host, &current, deadline, cancel).await
                {
                    tracing::warn!(dir = %dir.display(), host = %host, error = %failure.error.message, "cannot move GC roots into .gen");
                }
            }
        }
    }
}

/// The hosts of `dir` whose current link still points at a generation
/// beside it (the earlier layout), with that generation's name.
fn earlier_current_links(dir: &Path) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let host = entry.file_name().to_str()?.to_owned();
            let target = std::fs::read_link(entry.path()).ok()?;
            let target = target.to_str()?.to_owned();
            let beside = !host.starts_with('.') && !target.contains('/');
            (beside && generation(&target, &host).is_some()).then_some((host, target))
        })
        .collect()
}

/// Moves `host`'s generations in `dir` into `.gen`, then its current link.
async fn migrate_host(
    nix: &NixCli,
    dir: &Path,
    host: &str,
    current: &str,
    deadline: Instant,
    cancel: &Cancellation,
) -> Result<(), HostFailure> {
    let generations_dir = dir.join(GENERATIONS_DIR);
    std::fs::create_dir_all(&generations_dir)
        .map_err(|err| failure("create the directory of", &generations_dir, err))?;
    let mut moved = Vec::new();
    for (_, old) in generations(dir, host)? {
        // Only a link to the store is a generation; anything else (another
        // host's current link that happens to look like one) stays.
        let Ok(out_path) = std::fs::read_link(&old) else {
            continue;
        };
        if !out_path.is_absolute() {
            continue;
        }
        let Some(name) = old.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let link = generations_dir.join(&name);
        let invocation = nix.add_root(&out_path.to_string_lossy(), &link.to_string_lossy());
        match add_root(&invocation, &link, deadline, cancel).await {
            Ok(()) => moved.push((name, old)),
            Err(failure) => {
                tracing::warn!(path = %old.display(), error = %failure.error.message, "cannot move a GC root; left as it is");
            }
        }
    }
    if !moved.iter().any(|(name, _)| name == current) {
        return Err(failure(
            "move the current",
            &dir.join(host),
            "its generation could not be moved",
        ));
    }
    point_current_at(dir, host, current)?;
    for (_, old) in moved {
        if let Err(err) = std::fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), %err, "cannot remove a moved GC root");
        }
    }
    tracing::info!(dir = %dir.display(), host = %host, "GC roots moved into .gen");
    Ok(())
}

/// Swaps `<dir>/<host>` to `.gen/<generation>` atomically (a new link
/// renamed over it).
fn point_current_at(dir: &Path, host: &str, generation: &str) -> Result<(), HostFailure> {
    let current = dir.join(host);
    let temporary = dir.join(format!(".{host}.{}", random_hex::<4>()));
    std::os::unix::fs::symlink(format!("{GENERATIONS_DIR}/{generation}"), &temporary)
        .map_err(|err| failure("create", &temporary, err))?;
    std::fs::rename(&temporary, &current).map_err(|err| {
        let _ = std::fs::remove_file(&temporary);
        failure("replace", &current, err)
    })
}

/// Existing generations of `host` in `dir`, oldest first.
fn generations(dir: &Path, host: &str) -> Result<Vec<(u64, PathBuf)>, HostFailure> {
    let entries = std::fs::read_dir(dir).map_err(|err| failure("list", dir, err))?;
    let mut generations: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            generation(&name.to_string_lossy(), host).map(|n| (n, entry.path()))
        })
        .collect();
    generations.sort();
    Ok(generations)
}

/// When the side lineage in `side` last built: its stamp's mtime, else the
/// directory's.
fn last_build(side: &Path) -> Option<SystemTime> {
    std::fs::metadata(side.join(LAST_BUILD))
        .and_then(|m| m.modified())
        .or_else(|_| std::fs::metadata(side).and_then(|m| m.modified()))
        .ok()
}

fn remove_tree(path: &Path) {
    if let Err(err) = std::fs::remove_dir_all(path) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), %err, "cannot remove GC roots");
        }
    }
}

/// The temporary roots of one request: its derivations, its outputs and
/// its source, from the moment each is known until the request ends.
#[derive(Debug, Clone)]
pub(crate) struct RequestRoots {
    dir: PathBuf,
    /// Derivations [`RequestRoots::root_drv`] leaves out: their outputs are
    /// their lineage's current generations.
    unchanged: Arc<HashSet<String>>,
}

impl RequestRoots {
    /// These roots, leaving out the derivations of `hosts` evaluated in
    /// earlier requests (`remembered`, one per host) whose outputs are
    /// `repo`'s current generations in `lineage` (see the module docs).
    pub(crate) fn leaving_out_unchanged(
        &self,
        roots: &GcRoots,
        (repo, lineage): (&str, &Lineage),
        (hosts, remembered): (&[String], &[Option<Evaluated>]),
    ) -> Self {
        let unchanged = hosts
            .iter()
            .zip(remembered)
            .filter_map(|(host, evaluated)| {
                let evaluated = evaluated.as_ref()?;
                let current = roots.current_result(repo, lineage, host)?;
                (current == evaluated.out_path).then(|| evaluated.drv_path.clone())
            })
            .collect();
        Self {
            dir: self.dir.clone(),
            unchanged: Arc::new(unchanged),
        }
    }

    /// Where `host`'s output is built to.
    pub(crate) fn out_link(&self, host: &str) -> String {
        self.dir.join(host).to_string_lossy().into_owned()
    }

    /// Roots `host`'s derivation file, unless its output is its current
    /// generation ([`RequestRoots::leaving_out_unchanged`]).
    pub(crate) async fn root_drv(
        &self,
        nix: &NixCli,
        host: &str,
        drv_path: &str,
        deadline: Instant,
        cancel: &Cancellation,
    ) -> Result<(), HostFailure> {
        if self.unchanged.contains(drv_path) {
            return Ok(());
        }
        self.root_drv_to_build(nix, host, drv_path, deadline, cancel)
            .await
    }

    /// Roots `host`'s derivation file, to build from it.
    pub(crate) async fn root_drv_to_build(
        &self,
        nix: &NixCli,
        host: &str,
        drv_path: &str,
        deadline: Instant,
        cancel: &Cancellation,
    ) -> Result<(), HostFailure> {
        let link = self.dir.join(format!("{host}.drv"));
        let invocation = nix.root_drv(drv_path, &link.to_string_lossy());
        add_root(&invocation, &link, deadline, cancel).await
    }

    /// Roots the fetched source of the flake.
    pub(crate) async fn root_source(
        &self,
        nix: &NixCli,
        path: &str,
        deadline: Instant,
        cancel: &Cancellation,
    ) -> Result<(), HostFailure> {
        let link = self.dir.join(".source");
        let invocation = nix.add_root(path, &link.to_string_lossy());
        add_root(&invocation, &link, deadline, cancel).await
    }

    /// Drops every temporary root of the request.
    pub(crate) fn remove(&self) {
        remove_tree(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::cancel::StopReason;
    use crate::nix::NixVersion;

    #[test]
    fn generation_names_are_recognised_per_host() {
        assert_eq!(generation("ns1-3-link", "ns1"), Some(3));
        assert_eq!(generation("ns1-12-link", "ns1"), Some(12));
        assert_eq!(generation("ns1", "ns1"), None);
        assert_eq!(generation("ns1-3-link", "ns"), None, "ns is not ns1");
        assert_eq!(generation("ns1-x-link", "ns1"), None);
        assert_eq!(generation("ns1-3-link.tmp", "ns1"), None);
    }

    #[test]
    fn the_default_ref_without_a_rev_is_the_default_lineage() {
        assert_eq!(
            Lineage::of(Some("master"), None, Some("master")),
            Lineage::Default
        );
        assert_eq!(Lineage::of(None, None, None), Lineage::Default);
        assert_eq!(
            Lineage::of(Some("flake-update/2026-11-28"), None, Some("master")),
            Lineage::Side("ref-flake-update%2F2026-11-28".into())
        );
        // Naming the remote's default branch is still a side ref: the
        // builder cannot know which branch that is.
        assert_eq!(
            Lineage::of(Some("master"), None, None),
            Lineage::Side("ref-master".into())
        );
        let rev = "609da7ab2bec60c568928f7e8d760a36e14805b0";
        assert_eq!(
            Lineage::of(Some("master"), Some(rev), Some("master")),
            Lineage::Side(format!("rev-{rev}"))
        );
    }

    #[test]
    fn side_keys_are_single_path_components() {
        for git_ref in ["a/b/c", "refs/tags/v1.0", "x_y-z.1"] {
            let Lineage::Side(key) = Lineage::of(Some(git_ref), None, Some("master")) else {
                panic!("{git_ref} is not a side ref");
            };
            assert!(!key.contains('/') && !key.starts_with('.'), "{key}");
        }
    }

    #[test]
    fn expired_side_roots_go_and_fresh_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let roots = GcRoots {
            dir: dir.path().to_owned(),
            keep: 3,
            side_ttl: Duration::from_secs(3600),
            side_max: 32,
        };
        let old = dir.path().join("homelab/.refs/ref-old");
        let fresh = dir.path().join("homelab/.refs/ref-fresh");
        for side in [&old, &fresh] {
            std::fs::create_dir_all(side).unwrap();
            std::fs::write(side.join(LAST_BUILD), b"").unwrap();
        }
        let long_ago = SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(old.join(LAST_BUILD))
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        assert_eq!(
            roots.expire_side_roots(),
            [("homelab".to_owned(), "ref-old".to_owned())]
        );
        assert!(!old.exists() && fresh.exists());
    }

    /// Side lineages `ref-0` (oldest) to `ref-<n-1>` of `homelab`.
    fn side_lineages(dir: &Path, n: u64) -> Vec<PathBuf> {
        let now = SystemTime::now();
        (0..n)
            .map(|i| {
                let side = dir.join(format!("homelab/.refs/ref-{i}"));
                std::fs::create_dir_all(side.join(GENERATIONS_DIR)).unwrap();
                std::fs::File::create(side.join(LAST_BUILD))
                    .unwrap()
                    .set_modified(now - Duration::from_secs(3600 * (n - i)))
                    .unwrap();
                side
            })
            .collect()
    }

    #[test]
    fn a_new_side_lineage_past_the_cap_evicts_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let roots = GcRoots {
            dir: dir.path().to_owned(),
            keep: 3,
            side_ttl: Duration::from_secs(30 * 24 * 3600),
            side_max: 3,
        };
        let sides = side_lineages(dir.path(), 3);
        assert_eq!(roots.make_room_for_side("homelab", "rev-abc"), ["ref-0"]);
        assert!(!sides[0].exists() && sides[1].exists() && sides[2].exists());
        // Another repo's lineages count apart.
        assert!(roots.make_room_for_side("other", "rev-abc").is_empty());
    }

    #[test]
    fn a_lineage_already_kept_evicts_nothing_and_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let mut roots = GcRoots {
            dir: dir.path().to_owned(),
            keep: 3,
            side_ttl: Duration::from_secs(30 * 24 * 3600),
            side_max: 3,
        };
        let sides = side_lineages(dir.path(), 4);
        // Building the oldest again: it is kept, and so is everything else.
        assert!(roots.make_room_for_side("homelab", "ref-0").is_empty());
        assert!(sides.iter().all(|side| side.exists()));
        // A lower cap is reached by the next new lineage, oldest first.
        roots.side_max = 2;
        assert_eq!(
            roots.make_room_for_side("homelab", "ref-new"),
            ["ref-0", "ref-1", "ref-2"]
        );
        assert!(sides[3].exists());
        // A cap of one keeps only the lineage being recorded.
        roots.side_max = 1;
        assert_eq!(roots.make_room_for_side("homelab", "ref-newer"), ["ref-3"]);
    }

    #[test]
    fn only_current_links_of_the_earlier_layout_are_moved() {
        let dir = tempfile::tempdir().unwrap();
        let link = |name: &str, target: &str| {
            std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap();
        };
        link("ns1", "ns1-2-link"); // earlier layout
        link("ns1-1-link", "/nix/store/a-ns1");
        link("ns1-2-link", "/nix/store/b-ns1");
        link("ns2", ".gen/ns2-1-link"); // moved already
        link("web-1-link", "/nix/store/c-web-1-link"); // a host, not a generation
        link(".web.abcd", "web-1-link");
        let mut found = earlier_current_links(dir.path());
        found.sort();
        assert_eq!(found, [("ns1".to_owned(), "ns1-2-link".to_owned())]);
    }

    #[tokio::test]
    async fn only_derivations_of_current_outputs_are_left_unrooted() {
        let dir = tempfile::tempdir().unwrap();
        let roots = GcRoots {
            dir: dir.path().join("roots"),
            keep: 3,
            side_ttl: Duration::from_secs(60),
            side_max: 32,
        };
        // `ns1`'s current generation, pointing at a stand-in output.
        let out = dir.path().join("out-ns1");
        std::fs::write(&out, b"").unwrap();
        let generations = roots.dir.join("homelab").join(GENERATIONS_DIR);
        std::fs::create_dir_all(&generations).unwrap();
        std::os::unix::fs::symlink(&out, generations.join("ns1-1-link")).unwrap();
        point_current_at(&roots.dir.join("homelab"), "ns1", "ns1-1-link").unwrap();
        let evaluated = |host: &str, out_path: &Path| Evaluated {
            drv_path: format!("/nix/store/{host}.drv"),
            out_path: out_path.to_string_lossy().into_owned(),
        };
        let out = std::fs::canonicalize(&out).unwrap();
        let hosts = ["ns1", "ns2", "ns3"].map(str::to_owned);
        let remembered = [
            Some(evaluated("ns1", &out)),
            Some(evaluated("ns2", &out)), // not ns2's current output
            None,
        ];
        let request = roots.request("0123456789abcdef").unwrap();
        let request = request.leaving_out_unchanged(
            &roots,
            ("homelab", &Lineage::Default),
            (&hosts, &remembered),
        );
        // Rooting anything else runs Nix, which is not there.
        let nix = NixCli::new("/nonexistent/nix", NixVersion::new(2, 8, 0));
        let cancel = Cancellation::root(Default::default(), StopReason::Shutdown);
        let deadline = Instant::now() + Duration::from_secs(5);
        let root = |host: &'static str| {
            let (nix, request, cancel) = (&nix, &request, &cancel);
            async move {
                let drv = format!("/nix/store/{host}.drv");
                request.root_drv(nix, host, &drv, deadline, cancel).await
            }
        };
        assert!(root("ns1").await.is_ok());
        assert!(root("ns2").await.is_err());
        let ns1 = request
            .root_drv_to_build(&nix, "ns1", "/nix/store/ns1.drv", deadline, &cancel)
            .await;
        assert!(ns1.is_err(), "rooting to build always runs Nix");
    }

    #[test]
    fn requests_left_by_a_crash_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let roots = GcRoots {
            dir: dir.path().to_owned(),
            keep: 3,
            side_ttl: Duration::from_secs(60),
            side_max: 32,
        };
        let request = roots.request("0123456789abcdef").unwrap();
        std::os::unix::fs::symlink("/nix/store/x", request.out_link("ns1")).unwrap();
        roots.sweep_requests();
        assert_eq!(
            std::fs::read_dir(dir.path().join(REQUESTS_DIR))
                .unwrap()
                .count(),
            0
        );
    }
}
