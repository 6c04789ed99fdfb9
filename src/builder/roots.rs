//! Garbage-collector roots for built hosts, kept like Nix profiles:
//! `<dir>/<repo>/<host>` points at the newest `<host>-<n>-link`, which
//! points into the store. Each success that changes a host's output adds a
//! generation and swaps `<host>` over atomically; only the newest
//! `keep_roots` generations are kept, so the binary cache on the build host
//! keeps serving what was built without the store growing forever.

use std::path::{Path, PathBuf};

use tokio::time::Instant;

use super::cancel::Cancellation;
use super::request::HostFailure;
use crate::nix::NixCli;
use crate::nix::process::{self, Outcome};
use crate::protocol::{ErrorCode, random_hex};

/// Where and how many roots are kept.
#[derive(Debug, Clone)]
pub(crate) struct GcRoots {
    pub(crate) dir: PathBuf,
    pub(crate) keep: usize,
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

impl GcRoots {
    /// Roots `out_path` as the newest generation of `repo`/`host`.
    pub(crate) async fn record(
        &self,
        nix: &NixCli,
        repo: &str,
        host: &str,
        out_path: &str,
        deadline: Instant,
        cancel: &Cancellation,
    ) -> Result<(), HostFailure> {
        let dir = self.dir.join(repo);
        std::fs::create_dir_all(&dir)
            .map_err(|err| failure("create the directory of", &dir, err))?;
        let current = dir.join(host);
        if std::fs::canonicalize(&current).is_ok_and(|target| target == Path::new(out_path)) {
            return Ok(()); // unchanged output: already rooted
        }

        let mut generations = self.generations(&dir, host)?;
        let next = generations.last().map_or(1, |(n, _)| n + 1);
        let link = dir.join(format!("{host}-{next}-link"));
        let link_str = link.to_string_lossy().into_owned();
        // `nix build --out-link` on a valid path creates the link and
        // registers it with the daemon as an (indirect) root.
        let invocation = nix.add_root(out_path, &link_str);
        let outcome = process::run(&invocation, deadline, cancel.token(), &mut |_: &str| {}).await;
        match outcome {
            Ok(Outcome::Exited { status, .. }) if status.success() => {}
            Ok(Outcome::Cancelled) => return Err(HostFailure::cancelled(cancel.reason())),
            Ok(other) => return Err(failure("add", &link, format!("nix ended with {other:?}"))),
            Err(err) => return Err(failure("add", &link, err)),
        }

        // Swap `<host>` to the new generation atomically (rename over it).
        let temporary = dir.join(format!(".{host}.{}", random_hex::<4>()));
        std::os::unix::fs::symlink(format!("{host}-{next}-link"), &temporary)
            .map_err(|err| failure("create", &temporary, err))?;
        std::fs::rename(&temporary, &current).map_err(|err| {
            let _ = std::fs::remove_file(&temporary);
            failure("replace", &current, err)
        })?;

        generations.push((next, link));
        let excess = generations.len().saturating_sub(self.keep.max(1));
        for (_, old) in generations.drain(..excess) {
            if let Err(err) = std::fs::remove_file(&old) {
                tracing::warn!(path = %old.display(), %err, "cannot remove an old GC root");
            }
        }
        Ok(())
    }

    /// Existing generations of `host` in `dir`, oldest first.
    fn generations(&self, dir: &Path, host: &str) -> Result<Vec<(u64, PathBuf)>, HostFailure> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_are_recognised_per_host() {
        assert_eq!(generation("ns1-3-link", "ns1"), Some(3));
        assert_eq!(generation("ns1-12-link", "ns1"), Some(12));
        assert_eq!(generation("ns1", "ns1"), None);
        assert_eq!(generation("ns1-3-link", "ns"), None, "ns is not ns1");
        assert_eq!(generation("ns1-x-link", "ns1"), None);
        assert_eq!(generation("ns1-3-link.tmp", "ns1"), None);
    }
}
