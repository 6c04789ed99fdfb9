//! What a host's result changes against the default ref's result: the
//! `changes` of `host_finished` (docs/protocol.md, "`changes`").

use serde::{Deserialize, Serialize};

/// Most [`ChangedPackage`] entries one [`Changes`] lists; `more` counts the rest.
pub const MAX_CHANGED_PACKAGES: usize = 100;

/// What a host's new result changes against its current result on the
/// repo's default ref: packages whose versions differ, and the closure size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// The result compared with.
    pub against: Against,
    /// Packages added, removed or at other versions, largest size change
    /// first (then by name); at most [`MAX_CHANGED_PACKAGES`].
    pub packages: Vec<ChangedPackage>,
    /// Packages left out of `packages` (the smallest changes).
    #[serde(default)]
    pub more: usize,
    /// Packages whose versions did not change but whose store paths did
    /// (rebuilt because a dependency changed), summarised.
    #[serde(default)]
    pub rebuilt: Rebuilt,
    /// The new closure's size in bytes (the sum of its paths' NAR sizes).
    pub closure_size: u64,
    /// `closure_size` minus the compared closure's size, in bytes.
    pub closure_size_delta: i64,
}

impl Changes {
    /// Every package that changed version, listed or not.
    pub fn changed_packages(&self) -> usize {
        self.packages.len() + self.more
    }
}

/// The result a [`Changes`] compares with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Against {
    /// Its store path.
    pub out_path: String,
    /// The commit it was built from, when known.
    pub rev: Option<String>,
}

/// One package (a name as Nix splits store path names) whose versions
/// differ between the two closures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedPackage {
    /// The name, e.g. `openssl`.
    pub name: String,
    /// Its versions in the compared closure, sorted; empty: added. A path
    /// without a version counts as version `""`.
    pub before: Vec<String>,
    /// Its versions in the new closure, sorted; empty: removed.
    pub after: Vec<String>,
    /// Its paths' total size change in bytes.
    pub size_delta: i64,
}

/// Packages at the same versions whose store paths changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebuilt {
    /// How many package names.
    pub packages: usize,
    /// Their paths' total size change in bytes.
    pub size_delta: i64,
}
