//! Store closures as Nix's own metadata describes them: every path of a
//! closure with its NAR size (`nix path-info --json --recursive`), and store
//! path names split into package name and version the way Nix splits
//! derivation names.

use std::collections::HashMap;

use serde::Deserialize;
use thiserror::Error;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::NixCli;
use super::process::{self, Outcome};

/// Most `nix path-info --json` output read for one closure. Each path
/// carries its references, so a large desktop closure prints several MiB.
pub const MAX_CLOSURE_JSON_BYTES: usize = 64 << 20;

/// Every path of a closure and its NAR size in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closure {
    pub paths: HashMap<String, u64>,
}

impl Closure {
    /// The closure's size: the sum of its paths' NAR sizes.
    pub fn size(&self) -> u64 {
        self.paths.values().sum()
    }
}

/// Why a closure could not be read.
#[derive(Debug, Error)]
pub enum ClosureError {
    #[error("{path} is not a store path; only paths Nix printed are read")]
    NotAStorePath { path: String },
    #[error(transparent)]
    Spawn(#[from] process::SpawnError),
    #[error("`nix path-info` on {path} failed: {message}")]
    Failed { path: String, message: String },
    #[error("`nix path-info` on {path} did not finish in time and was stopped")]
    TimedOut { path: String },
    #[error("reading the closure of {path} was cancelled")]
    Cancelled { path: String },
    #[error("cannot read `nix path-info --json` output for {path}: {message}")]
    Unparsable { path: String, message: String },
}

/// One path in `nix path-info --json` output before Nix 2.19.
#[derive(Deserialize)]
struct ListedPath {
    path: String,
    #[serde(flatten)]
    metadata: PathMetadata,
}

/// What is read of one path's metadata (the rest is skipped).
#[derive(Deserialize)]
struct PathMetadata {
    #[serde(rename = "narSize")]
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    /// Present (and false) before Nix 2.19 for a path that is not valid.
    #[serde(default)]
    valid: Option<bool>,
}

impl PathMetadata {
    fn into_info(self) -> Option<PathInfo> {
        match self.valid {
            Some(false) => None,
            _ => Some(PathInfo {
                size: self.nar_size?,
                references: self.references,
            }),
        }
    }
}

/// One valid path: its NAR size and the paths it references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub size: u64,
    pub references: Vec<String>,
}

/// Paths with their metadata, as one `nix path-info --recursive` printed
/// them: the union of the closures of the paths it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathInfos {
    pub paths: HashMap<String, PathInfo>,
}

impl PathInfos {
    /// The closure of `root` (which must be among the paths), following
    /// references; a reference to a path not read is left out.
    pub fn closure_of(&self, root: &str) -> Closure {
        let mut paths = HashMap::new();
        let mut pending = vec![root];
        while let Some(path) = pending.pop() {
            let Some(info) = self.paths.get(path) else {
                continue;
            };
            if paths.insert(path.to_owned(), info.size).is_none() {
                pending.extend(info.references.iter().map(String::as_str));
            }
        }
        Closure { paths }
    }
}

/// Reads `nix path-info --json [--recursive]` output of any Nix from 2.8
/// on: a list of objects with `path` (before 2.19), or an object keyed by
/// path whose value is `null` for a path that is not valid (2.19 on).
/// Every path must be valid and carry its `narSize`.
pub fn parse_path_info(stdout: &[u8]) -> Result<PathInfos, String> {
    let not_json = |err: serde_json::Error| format!("not JSON in the expected shape ({err})");
    let first = stdout.iter().find(|b| !b.is_ascii_whitespace());
    let entries: Vec<(String, Option<PathInfo>)> = match first {
        Some(b'[') => serde_json::from_slice::<Vec<ListedPath>>(stdout)
            .map_err(not_json)?
            .into_iter()
            .map(|p| (p.path, p.metadata.into_info()))
            .collect(),
        Some(b'{') => serde_json::from_slice::<HashMap<String, Option<PathMetadata>>>(stdout)
            .map_err(not_json)?
            .into_iter()
            .map(|(path, metadata)| (path, metadata.and_then(PathMetadata::into_info)))
            .collect(),
        _ => {
            return Err(
                "expected a list of paths (Nix before 2.19) or an object keyed by \
                        path (Nix 2.19 and later)"
                    .to_owned(),
            );
        }
    };
    let mut paths = HashMap::with_capacity(entries.len());
    for (path, info) in entries {
        let info = info.ok_or_else(|| format!("{path} is not valid in the store"))?;
        paths.insert(path, info);
    }
    Ok(PathInfos { paths })
}

/// Whether `path` looks like a store path Nix printed: absolute, one
/// `<hash>-<name>` component under the store, nothing a shell or Nix would
/// read as anything else.
pub fn is_store_path(path: &str) -> bool {
    let Some((dir, base)) = path.rsplit_once('/') else {
        return false;
    };
    dir.starts_with('/')
        && !path.contains("..")
        && !path.contains(|c: char| c.is_whitespace() || c.is_control())
        && base
            .split_once('-')
            .is_some_and(|(hash, name)| hash.len() == 32 && !name.is_empty())
        && base.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
        })
}

/// Reads the closures of `roots` (which must be valid) with their sizes,
/// in one `nix path-info` call (closures overlap: what they share is read
/// once); one [`Closure`] per root, in order.
pub async fn read_closures(
    nix: &NixCli,
    roots: &[&str],
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<Vec<Closure>, ClosureError> {
    let path = || roots.join(" ");
    if let Some(bad) = roots.iter().find(|p| !is_store_path(p)) {
        return Err(ClosureError::NotAStorePath {
            path: (*bad).to_owned(),
        });
    }
    let invocation = nix.closure_info(roots);
    let limits = process::Limits {
        max_stdout: MAX_CLOSURE_JSON_BYTES,
        ..process::Limits::deadline(deadline)
    };
    let mut errors = Vec::new();
    let outcome = process::run_limited(&invocation, limits, cancel, &mut |line: &str| {
        // Only the last few lines say why; keep them bounded.
        if errors.len() == 8 {
            errors.remove(0);
        }
        errors.push(line.to_owned());
    })
    .await?;
    let infos = match outcome {
        Outcome::Exited { status, stdout } if status.success() => parse_path_info(&stdout)
            .map_err(|message| {
                let message = if stdout.len() >= MAX_CLOSURE_JSON_BYTES {
                    format!("the output exceeds {MAX_CLOSURE_JSON_BYTES} bytes")
                } else {
                    message
                };
                ClosureError::Unparsable {
                    path: path(),
                    message,
                }
            })?,
        Outcome::Exited { status, .. } => {
            return Err(ClosureError::Failed {
                path: path(),
                message: match errors.join("\n").trim() {
                    "" => format!("nix exited with {status}"),
                    text => text.to_owned(),
                },
            });
        }
        Outcome::TimedOut | Outcome::Silent => {
            return Err(ClosureError::TimedOut { path: path() });
        }
        Outcome::Cancelled => return Err(ClosureError::Cancelled { path: path() }),
    };
    roots
        .iter()
        .map(|root| match infos.paths.contains_key(*root) {
            true => Ok(infos.closure_of(root)),
            false => Err(ClosureError::Unparsable {
                path: path(),
                message: format!("{root} is missing from the output"),
            }),
        })
        .collect()
}

/// The `<name>` of a store path `/nix/store/<hash>-<name>`.
pub fn store_path_name(path: &str) -> &str {
    let base = path.rsplit_once('/').map_or(path, |(_, base)| base);
    base.split_once('-').map_or(base, |(_, name)| name)
}

/// Splits a derivation name into name and version exactly like Nix's
/// `builtins.parseDrvName`: the version starts after the first `-` that is
/// followed by something other than a letter (in practice, a digit).
pub fn parse_drv_name(name: &str) -> (&str, &str) {
    let bytes = name.as_bytes();
    for (i, pair) in bytes.windows(2).enumerate() {
        if pair[0] == b'-' && !pair[1].is_ascii_alphabetic() {
            return (&name[..i], &name[i + 1..]);
        }
    }
    (name, "")
}

/// The package name and version of a store path: [`parse_drv_name`] of its
/// name, without a trailing output name (`-dev`, `-man`, `-lib`, …) when a
/// version precedes it, so a package's outputs share its version.
pub fn package_of(path: &str) -> (&str, &str) {
    let (name, version) = parse_drv_name(store_path_name(path));
    let version = match version.rsplit_once('-') {
        Some((rest, output))
            if !rest.is_empty()
                && !output.is_empty()
                && output.bytes().all(|b| b.is_ascii_lowercase()) =>
        {
            rest
        }
        _ => version,
    };
    (name, version)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nix path-info --json --recursive` of a three-path closure, as Nix
    /// 2.8.0 printed it.
    const NIX_2_8: &str = r#"[{"path":"/nix/store/2hjr8flrxdnhkg81bfyh5m9hbxla95pr-nixos-system-ns1-24.05","narHash":"sha256-c9rxYYfiYmDoZotX09FgXqVZOPpyRkpExI9YnYX3fXI=","narSize":232,"references":["/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-htop-3.3.0","/nix/store/wsxpfspn6m4vnh6mwp6f0wq4wvz59m9v-libfoo-1.2.3"],"deriver":"/nix/store/934653fcbagf4df14y1ya51x00h4ay5v-nixos-system-ns1-24.05.drv","registrationTime":1796210528,"ultimate":true},{"path":"/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-htop-3.3.0","narHash":"sha256-Clw2hfh+4zCddlDDfsL0uWS1501+fbGPhixll0GTp10=","narSize":120,"references":[],"deriver":"/nix/store/bq2sxr8j17cxplm87z6giw77b8n2kv4m-htop-3.3.0.drv","registrationTime":1796210528,"ultimate":true},{"path":"/nix/store/wsxpfspn6m4vnh6mwp6f0wq4wvz59m9v-libfoo-1.2.3","narHash":"sha256-QvtAMbUl/uvi+LCObmqOhvNOapHdA2raiI4xG5zI5pA=","narSize":120,"references":[],"deriver":"/nix/store/v87844s4m74spvyqxigv5a8gwf3fxs5d-libfoo-1.2.3.drv","registrationTime":1796210528,"ultimate":true}]"#;

    /// The same closure as Nix 2.26.3 printed it.
    const NIX_2_26: &str = r#"{"/nix/store/2hjr8flrxdnhkg81bfyh5m9hbxla95pr-nixos-system-ns1-24.05":{"ca":null,"deriver":"/nix/store/934653fcbagf4df14y1ya51x00h4ay5v-nixos-system-ns1-24.05.drv","narHash":"sha256-c9rxYYfiYmDoZotX09FgXqVZOPpyRkpExI9YnYX3fXI=","narSize":232,"references":["/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-htop-3.3.0","/nix/store/wsxpfspn6m4vnh6mwp6f0wq4wvz59m9v-libfoo-1.2.3"],"registrationTime":1796210528,"signatures":[],"ultimate":true},"/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-htop-3.3.0":{"ca":null,"deriver":"/nix/store/bq2sxr8j17cxplm87z6giw77b8n2kv4m-htop-3.3.0.drv","narHash":"sha256-Clw2hfh+4zCddlDDfsL0uWS1501+fbGPhixll0GTp10=","narSize":120,"references":[],"registrationTime":1796210528,"signatures":[],"ultimate":true},"/nix/store/wsxpfspn6m4vnh6mwp6f0wq4wvz59m9v-libfoo-1.2.3":{"ca":null,"deriver":"/nix/store/v87844s4m74spvyqxigv5a8gwf3fxs5d-libfoo-1.2.3.drv","narHash":"sha256-QvtAMbUl/uvi+LCObmqOhvNOapHdA2raiI4xG5zI5pA=","narSize":120,"references":[],"registrationTime":1796210528,"signatures":[],"ultimate":true}}"#;

    const TOP: &str = "/nix/store/2hjr8flrxdnhkg81bfyh5m9hbxla95pr-nixos-system-ns1-24.05";
    const HTOP: &str = "/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-htop-3.3.0";
    const LIBFOO: &str = "/nix/store/wsxpfspn6m4vnh6mwp6f0wq4wvz59m9v-libfoo-1.2.3";

    fn expected() -> PathInfos {
        let info = |size, references: &[&str]| PathInfo {
            size,
            references: references.iter().map(|r| (*r).to_owned()).collect(),
        };
        PathInfos {
            paths: [
                (TOP, info(232, &[HTOP, LIBFOO])),
                (HTOP, info(120, &[])),
                (LIBFOO, info(120, &[])),
            ]
            .into_iter()
            .map(|(p, i)| (p.to_owned(), i))
            .collect(),
        }
    }

    #[test]
    fn path_info_of_nix_2_8_is_a_list() {
        let infos = parse_path_info(NIX_2_8.as_bytes()).unwrap();
        assert_eq!(infos, expected());
        assert_eq!(infos.closure_of(TOP).size(), 472);
    }

    #[test]
    fn path_info_of_nix_2_26_is_keyed_by_path() {
        assert_eq!(parse_path_info(NIX_2_26.as_bytes()).unwrap(), expected());
    }

    #[test]
    fn each_root_gets_its_own_closure_from_the_references() {
        let infos = expected();
        let top = infos.closure_of(TOP);
        assert_eq!(top.paths.len(), 3);
        let htop = infos.closure_of(HTOP);
        assert_eq!(htop.paths, [(HTOP.to_owned(), 120)].into_iter().collect());
        assert!(infos.closure_of("/nix/store/unknown").paths.is_empty());
    }

    #[test]
    fn invalid_paths_are_errors_in_both_shapes() {
        // Nix 2.26 without --recursive; Nix 2.8 likewise.
        let keyed = br#"{"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x":null}"#;
        let listed = br#"[{"path":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x","valid":false}]"#;
        for json in [&keyed[..], &listed[..]] {
            let err = parse_path_info(json).unwrap_err();
            assert!(err.contains("-x is not valid"), "{err}");
        }
        let err = parse_path_info(b"[{\"path\":\"/nix/store/x\"}]").unwrap_err();
        assert!(err.contains("not valid"), "{err}");
        let err = parse_path_info(b"\"nope\"").unwrap_err();
        assert!(err.contains("keyed by path"), "{err}");
        let err = parse_path_info(b"[{\"path\":").unwrap_err();
        assert!(err.starts_with("not JSON"), "{err}");
        let err = parse_path_info(b"{\"/nix/store/x\":[]}").unwrap_err();
        assert!(err.starts_with("not JSON"), "{err}");
    }

    #[test]
    fn names_split_like_parse_drv_name() {
        // Each pair is what `builtins.parseDrvName` returns on Nix 2.8.
        for (input, name, version) in [
            ("hello-2.1", "hello", "2.1"),
            ("nixos-system-ns1-24.05", "nixos-system-ns1", "24.05"),
            ("source", "source", ""),
            ("openssl-3.0.14-dev", "openssl", "3.0.14-dev"),
            ("a-b-c", "a-b-c", ""),
            ("foo-", "foo-", ""),
            ("-1", "", "1"),
            ("foo-.1", "foo", ".1"),
            ("foo-_x", "foo", "_x"),
            ("linux-6.6-modules-shrunk", "linux", "6.6-modules-shrunk"),
        ] {
            assert_eq!(parse_drv_name(input), (name, version), "{input}");
        }
    }

    #[test]
    fn packages_drop_the_output_name_but_keep_unversioned_names_whole() {
        let hash = "/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-";
        for (name, package, version) in [
            ("openssl-3.0.14", "openssl", "3.0.14"),
            ("openssl-3.0.14-dev", "openssl", "3.0.14"),
            ("gcc-13.2.0-lib", "gcc", "13.2.0"),
            ("system-path", "system-path", ""),
            ("unit-script-foo-start", "unit-script-foo-start", ""),
            ("foo-unstable-2024-01-01", "foo-unstable", "2024-01-01"),
            (
                "perl5.38.2-Test-Fatal-0.017",
                "perl5.38.2-Test-Fatal",
                "0.017",
            ),
        ] {
            assert_eq!(
                package_of(&format!("{hash}{name}")),
                (package, version),
                "{name}"
            );
        }
    }

    #[test]
    fn only_plain_store_paths_are_read() {
        assert!(is_store_path(
            "/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-htop-3.3.0"
        ));
        for bad in [
            "",
            "htop",
            "/nix/store/short-htop",
            "/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-",
            "/nix/store/../2p50iywmfkh47f50rxy17n2a4jhb5fr5-x",
            "/nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-a b",
            "--option x y",
            "nix/store/2p50iywmfkh47f50rxy17n2a4jhb5fr5-x",
        ] {
            assert!(!is_store_path(bad), "{bad:?}");
        }
    }
}
