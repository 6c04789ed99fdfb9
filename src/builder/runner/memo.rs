//! What the runner remembers between requests: evaluation results by the
//! fetched source's `narHash` (and the repo's URL). The hash covers every
//! file, `flake.lock` included, so the same key always evaluates to the
//! same derivations: an unchanged flake is not evaluated twice. A source
//! without a `narHash` is never remembered.

use std::collections::HashMap;

use crate::builder::eval::Evaluated;

#[derive(Default)]
pub(super) struct Memo {
    /// The host names of `nixosConfigurations`, by source.
    hosts: HashMap<String, Vec<String>>,
    /// Each host's derivation, by source and host.
    evaluated: HashMap<(String, String), Evaluated>,
}

impl Memo {
    /// Enough for hundreds of revisions of a homelab; then start over.
    const MAX_ENTRIES: usize = 20_000;

    fn make_room(&mut self) {
        if self.evaluated.len() + self.hosts.len() >= Self::MAX_ENTRIES {
            self.hosts.clear();
            self.evaluated.clear();
        }
    }

    pub(super) fn hosts(&self, key: &str) -> Option<Vec<String>> {
        self.hosts.get(key).cloned()
    }

    pub(super) fn remember_hosts(&mut self, key: &str, names: Vec<String>) {
        self.make_room();
        self.hosts.insert(key.to_owned(), names);
    }

    /// `host`'s derivation from `key`'s source, if it is still in the
    /// store (a garbage collection may have taken it since).
    pub(super) fn evaluated(&self, key: &str, host: &str) -> Option<Evaluated> {
        self.evaluated
            .get(&(key.to_owned(), host.to_owned()))
            .filter(|e| std::path::Path::new(&e.drv_path).exists())
            .cloned()
    }

    pub(super) fn remember_evaluated(&mut self, key: &str, host: &str, evaluated: Evaluated) {
        self.make_room();
        self.evaluated
            .insert((key.to_owned(), host.to_owned()), evaluated);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_memo_starts_over_and_a_collected_derivation_is_forgotten() {
        let mut memo = Memo::default();
        let here = Evaluated {
            drv_path: "/".into(),
            out_path: "/nix/store/x".into(),
        };
        let gone = Evaluated {
            drv_path: "/nonexistent/x.drv".into(),
            out_path: "/nix/store/y".into(),
        };
        memo.remember_evaluated("src", "ns1", here.clone());
        memo.remember_evaluated("src", "ns2", gone);
        assert_eq!(memo.evaluated("src", "ns1"), Some(here));
        assert_eq!(memo.evaluated("src", "ns2"), None);
        assert_eq!(memo.evaluated("other", "ns1"), None);

        for n in 0..Memo::MAX_ENTRIES {
            memo.remember_hosts(&n.to_string(), Vec::new());
        }
        assert!(memo.hosts.len() + memo.evaluated.len() <= Memo::MAX_ENTRIES);
        assert_eq!(memo.evaluated("src", "ns1"), None, "started over");
    }
}
