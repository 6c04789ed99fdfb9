//! What a host's new result changes against the result it is compared with
//! (its current one on the repo's default ref): packages added, removed or
//! at other versions, and the closure's size, from Nix's store metadata.
//!
//! [`diff`] is pure; [`host_changes`] reads both closures (concurrently)
//! and diffs them. Neither touches the build: the caller runs
//! [`host_changes`] beside the next host's build. [`changes_known`] answers
//! a result compared with itself without Nix, from the closure sizes
//! [`ClosureSizes`] remembers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use thiserror::Error;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::nix::closure::{Closure, ClosureError, package_of, read_closures};
use crate::nix::version::VersionError;
use crate::nix::{NixCli, NixVersion};
use crate::protocol::{Against, ChangedPackage, Changes, MAX_CHANGED_PACKAGES, Rebuilt};
use crate::sync::lock;

/// One package name's paths on each side.
#[derive(Default)]
struct Group<'a> {
    before: BTreeSet<&'a str>,
    after: BTreeSet<&'a str>,
    before_size: u64,
    after_size: u64,
    /// Some path of this name is on one side only.
    paths_differ: bool,
}

/// `after - before` as a signed byte count, saturating.
fn delta(before: u64, after: u64) -> i64 {
    let delta = i128::from(after) - i128::from(before);
    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX })
}

/// Compares closure `after` (the new result) with `before` (the result
/// `against` names). Packages are grouped by name (see
/// [`package_of`]); a name whose set of versions differs is listed, largest
/// absolute size change first, then by name, at most
/// [`MAX_CHANGED_PACKAGES`] (`more` counts the rest); a name whose versions
/// are the same but whose paths differ counts in `rebuilt`.
pub fn diff(before: &Closure, after: &Closure, against: Against) -> Changes {
    let mut groups: BTreeMap<&str, Group<'_>> = BTreeMap::new();
    for (path, &size) in &before.paths {
        let (name, version) = package_of(path);
        let group = groups.entry(name).or_default();
        group.before.insert(version);
        group.before_size += size;
        group.paths_differ |= !after.paths.contains_key(path);
    }
    for (path, &size) in &after.paths {
        let (name, version) = package_of(path);
        let group = groups.entry(name).or_default();
        group.after.insert(version);
        group.after_size += size;
        group.paths_differ |= !before.paths.contains_key(path);
    }

    let mut packages = Vec::new();
    let mut rebuilt = Rebuilt::default();
    for (name, group) in groups {
        let size_delta = delta(group.before_size, group.after_size);
        if group.before != group.after {
            let list = |versions: BTreeSet<&str>| versions.into_iter().map(str::to_owned).collect();
            packages.push(ChangedPackage {
                name: name.to_owned(),
                before: list(group.before),
                after: list(group.after),
                size_delta,
            });
        } else if group.paths_differ {
            rebuilt.packages += 1;
            rebuilt.size_delta = rebuilt.size_delta.saturating_add(size_delta);
        }
    }
    // Stable: equal size changes stay in name order.
    packages.sort_by_key(|p| std::cmp::Reverse(p.size_delta.unsigned_abs()));
    let more = packages.len().saturating_sub(MAX_CHANGED_PACKAGES);
    packages.truncate(MAX_CHANGED_PACKAGES);

    let closure_size = after.size();
    Changes {
        against,
        packages,
        more,
        rebuilt,
        closure_size,
        closure_size_delta: delta(before.size(), closure_size),
    }
}

/// Reads the closures of `out_path` and of `against.out_path` (both must
/// be valid in the store, e.g. rooted) in one `nix path-info` call and
/// diffs them.
pub async fn host_changes(
    nix: &NixCli,
    out_path: &str,
    against: Against,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<Changes, ClosureError> {
    let roots = [against.out_path.as_str(), out_path];
    let closures = read_closures(nix, &roots, deadline, cancel).await?;
    let (before, after) = match closures.as_slice() {
        [before, after] => (before, after),
        // read_closures returns one closure per root.
        _ => {
            return Err(ClosureError::Failed {
                path: roots.join(" "),
                message: "not one closure per path".to_owned(),
            });
        }
    };
    Ok(diff(before, after, against))
}

/// What a result changes against itself: nothing. `closure_size` is its
/// closure's size.
pub fn unchanged(against: Against, closure_size: u64) -> Changes {
    Changes {
        against,
        packages: Vec::new(),
        more: 0,
        rebuilt: Rebuilt::default(),
        closure_size,
        closure_size_delta: 0,
    }
}

/// Closure sizes read before, by store path. A store path's closure never
/// changes, so its size, once read, stays right.
#[derive(Debug, Default)]
pub struct ClosureSizes {
    sizes: Mutex<HashMap<String, u64>>,
}

impl ClosureSizes {
    /// Enough for every host's last results of many repos; then start over.
    const MAX_ENTRIES: usize = 10_000;

    /// The closure size of `path`, if it was read.
    pub fn get(&self, path: &str) -> Option<u64> {
        lock(&self.sizes).get(path).copied()
    }

    /// Remembers that `path`'s closure is `size` bytes.
    pub fn remember(&self, path: &str, size: u64) {
        let mut sizes = lock(&self.sizes);
        if sizes.len() >= Self::MAX_ENTRIES && !sizes.contains_key(path) {
            sizes.clear();
        }
        sizes.insert(path.to_owned(), size);
    }

    /// The closure size of `path` (valid in the store): remembered, or
    /// read with one `nix path-info` call and remembered.
    pub async fn read(
        &self,
        nix: &NixCli,
        path: &str,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<u64, ClosureError> {
        if let Some(size) = self.get(path) {
            return Ok(size);
        }
        let closures = read_closures(nix, &[path], deadline, cancel).await?;
        let [closure] = closures.as_slice() else {
            return Err(ClosureError::Failed {
                path: path.to_owned(),
                message: "not one closure per path".to_owned(),
            });
        };
        let size = closure.size();
        self.remember(path, size);
        Ok(size)
    }
}

/// [`host_changes`], remembering the new closure's size in `sizes`; a
/// result compared with itself is [`unchanged`], and costs no Nix call when its
/// closure size is remembered (one short one otherwise).
pub async fn changes_known(
    nix: &NixCli,
    out_path: &str,
    against: Against,
    sizes: &ClosureSizes,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<Changes, ClosureError> {
    if out_path == against.out_path {
        let size = sizes.read(nix, out_path, deadline, cancel).await?;
        return Ok(unchanged(against, size));
    }
    let changes = host_changes(nix, out_path, against, deadline, cancel).await?;
    sizes.remember(out_path, changes.closure_size);
    Ok(changes)
}

/// Why [`compare`] could not compare.
#[derive(Debug, Error)]
pub enum CompareError {
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error(transparent)]
    Closure(#[from] ClosureError),
}

/// [`host_changes`] with the `nix` at `program` (its version detected
/// first), for tools and benchmarks; the builder calls [`host_changes`]
/// with its own [`NixCli`].
pub async fn compare(
    program: &str,
    out_path: &str,
    against: Against,
    timeout: Duration,
) -> Result<Changes, CompareError> {
    let deadline = Instant::now() + timeout;
    let version = NixVersion::detect(program).await?;
    let nix = NixCli::new(program, version);
    let cancel = CancellationToken::new();
    Ok(host_changes(&nix, out_path, against, deadline, &cancel).await?)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn closure(paths: &[(&str, u64)]) -> Closure {
        Closure {
            paths: paths
                .iter()
                .map(|(name, size)| {
                    // A hash derived from the name, so equal names share it
                    // unless a test says otherwise with a `#salt`.
                    let (name, salt) = name.split_once('#').unwrap_or((name, ""));
                    let hash: String = format!("{name}{salt}")
                        .bytes()
                        .cycle()
                        .take(32)
                        .map(|b| char::from(b'a' + b % 26))
                        .collect();
                    (format!("/nix/store/{hash}-{name}"), *size)
                })
                .collect(),
        }
    }

    fn against() -> Against {
        Against {
            out_path: "/nix/store/00000000000000000000000000000000-nixos-system-ns1".into(),
            rev: Some("609da7ab2bec60c568928f7e8d760a36e14805b0".into()),
        }
    }

    fn package(name: &str, before: &[&str], after: &[&str], size_delta: i64) -> ChangedPackage {
        let list = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        ChangedPackage {
            name: name.into(),
            before: list(before),
            after: list(after),
            size_delta,
        }
    }

    #[test]
    fn a_bump_an_addition_and_a_removal_are_named_with_versions() {
        let before = closure(&[
            ("openssl-3.0.14", 1000),
            ("openssl-3.0.14-dev", 50),
            ("nano-8.0", 300),
            ("glibc-2.39", 5000),
            ("system-path", 10),
        ]);
        let after = closure(&[
            ("openssl-3.0.15", 1200),
            ("openssl-3.0.15-dev", 60),
            ("htop-3.3.0", 400),
            ("glibc-2.39", 5000),
            // Same name and version, new content (a dependency changed).
            ("system-path#rebuilt", 12),
        ]);
        let changes = diff(&before, &after, against());
        assert_eq!(
            changes.packages,
            [
                package("htop", &[], &["3.3.0"], 400),
                package("nano", &["8.0"], &[], -300),
                package("openssl", &["3.0.14"], &["3.0.15"], 210),
            ]
        );
        assert_eq!(
            changes.rebuilt,
            Rebuilt {
                packages: 1,
                size_delta: 2
            }
        );
        assert_eq!(changes.more, 0);
        assert_eq!(changes.closure_size, 1200 + 60 + 400 + 5000 + 12);
        assert_eq!(changes.closure_size_delta, 312);
        assert_eq!(changes.against, against());
        assert_eq!(changes.changed_packages(), 3);
    }

    #[test]
    fn several_versions_of_one_name_are_listed_together() {
        let before = closure(&[("python3-3.11.9", 10), ("python3-3.12.4", 20)]);
        let after = closure(&[("python3-3.12.4", 20)]);
        assert_eq!(
            diff(&before, &after, against()).packages,
            [package("python3", &["3.11.9", "3.12.4"], &["3.12.4"], -10)]
        );
    }

    #[test]
    fn at_most_a_hundred_entries_are_listed_the_largest_first() {
        let before = closure(&[]);
        let names: Vec<String> = (0..150).map(|i| format!("pkg{i:03}-1.0")).collect();
        let paths: Vec<(&str, u64)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u64))
            .collect();
        let changes = diff(&before, &closure(&paths), against());
        assert_eq!(changes.packages.len(), MAX_CHANGED_PACKAGES);
        assert_eq!(changes.more, 50);
        assert_eq!(changes.changed_packages(), 150);
        assert_eq!(changes.packages[0].name, "pkg149");
        assert_eq!(changes.packages[99].name, "pkg050");
    }

    #[test]
    fn sizes_saturate_instead_of_overflowing() {
        assert_eq!(delta(0, u64::MAX), i64::MAX);
        assert_eq!(delta(u64::MAX, 0), i64::MIN);
        assert_eq!(delta(5, 3), -2);
    }

    #[tokio::test]
    async fn a_result_compared_with_itself_needs_no_nix_once_its_size_is_known() {
        // Any Nix call fails: this program does not exist.
        let nix = NixCli::new("/nonexistent/nix", NixVersion::new(2, 8, 0));
        let sizes = ClosureSizes::default();
        let out_path = against().out_path;
        let cancel = CancellationToken::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let known = |out_path: &str| {
            let out_path = out_path.to_owned();
            let (nix, sizes, cancel) = (&nix, &sizes, &cancel);
            async move { changes_known(nix, &out_path, against(), sizes, deadline, cancel).await }
        };
        assert!(known(&out_path).await.is_err(), "the size is not known yet");
        sizes.remember(&out_path, 4096);
        assert_eq!(known(&out_path).await.unwrap(), unchanged(against(), 4096));
        let other = "/nix/store/11111111111111111111111111111111-nixos-system-ns1";
        assert!(known(other).await.is_err(), "another result needs Nix");
    }

    #[test]
    fn remembered_sizes_are_bounded() {
        let sizes = ClosureSizes::default();
        for n in 0..=ClosureSizes::MAX_ENTRIES {
            sizes.remember(&n.to_string(), 1);
        }
        assert!(lock(&sizes.sizes).len() <= ClosureSizes::MAX_ENTRIES);
        assert_eq!(sizes.get(&ClosureSizes::MAX_ENTRIES.to_string()), Some(1));
    }

    fn any_closure() -> impl Strategy<Value = Closure> {
        // One store path has one size, whichever closure it is in.
        proptest::collection::vec("[a-c]{1,2}(-[0-9]\\.[0-9])?(-dev)?(#[xy])?", 0..40).prop_map(
            |names| {
                let paths: Vec<(&str, u64)> = names
                    .iter()
                    .map(|n| (n.as_str(), n.bytes().map(u64::from).sum::<u64>() << 20))
                    .collect();
                closure(&paths)
            },
        )
    }

    proptest! {
        #[test]
        fn an_unchanged_closure_has_no_changes(closure in any_closure()) {
            let changes = diff(&closure, &closure, against());
            prop_assert!(changes.packages.is_empty());
            prop_assert_eq!(changes.more, 0);
            prop_assert_eq!(changes.rebuilt, Rebuilt::default());
            prop_assert_eq!(changes.closure_size_delta, 0);
            prop_assert_eq!(changes.closure_size, closure.size());
        }

        #[test]
        fn sizes_add_up(before in any_closure(), after in any_closure()) {
            let changes = diff(&before, &after, against());
            prop_assert_eq!(changes.closure_size, after.size());
            prop_assert_eq!(
                i128::from(changes.closure_size_delta),
                i128::from(after.size()) - i128::from(before.size())
            );
            // With nothing cut, listed and rebuilt deltas explain the total.
            prop_assert_eq!(changes.more, 0);
            let listed: i64 = changes.packages.iter().map(|p| p.size_delta).sum();
            prop_assert_eq!(listed + changes.rebuilt.size_delta, changes.closure_size_delta);
            for p in &changes.packages {
                prop_assert!(p.before != p.after);
                prop_assert!(p.before.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }
}
