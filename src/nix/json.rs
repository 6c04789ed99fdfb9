//! The JSON that Nix prints on stdout, read into the few fields the
//! builder uses. Shapes differ between releases; each reader accepts every
//! shape seen from 2.8 on.

use std::collections::BTreeMap;

use serde::Deserialize;

/// What `nix flake metadata --json` prints that the builder uses.
#[derive(Debug, Deserialize)]
pub struct FlakeMetadata {
    /// The locked URL: every input pinned.
    pub url: String,
    revision: Option<String>,
    /// The store path of the fetched source.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    locked: LockedAttrs,
}

#[derive(Debug, Deserialize, Default)]
struct LockedAttrs {
    rev: Option<String>,
    #[serde(rename = "narHash")]
    nar_hash: Option<String>,
    #[serde(default)]
    submodules: bool,
    dir: Option<String>,
}

impl FlakeMetadata {
    /// Reads `nix flake metadata --json` output.
    pub fn parse(stdout: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(stdout)
    }

    /// The commit the flake was locked at, when it is a git flake.
    pub fn rev(&self) -> Option<&str> {
        self.revision.as_deref().or(self.locked.rev.as_deref())
    }

    /// The hash of the fetched source tree (`sha256-...`), when Nix gave one.
    pub fn nar_hash(&self) -> Option<&str> {
        self.locked.nar_hash.as_deref()
    }

    /// Whether the lock includes git submodules.
    pub fn submodules(&self) -> bool {
        self.locked.submodules
    }

    /// The flake's subdirectory in its source tree, if any.
    pub fn dir(&self) -> Option<&str> {
        self.locked.dir.as_deref()
    }
}

/// One entry of `nix build --json`.
#[derive(Deserialize)]
struct BuildResult {
    #[serde(default)]
    outputs: BTreeMap<String, String>,
}

/// The `out` path (or the only output) from `nix build --json`. `None` when
/// Nix built no outputs, which is what a bare `.drv` installable does on Nix
/// 2.15+: it must fail loudly, not pass as success.
pub fn out_path_from_build_json(stdout: &[u8]) -> Option<String> {
    let results: Vec<BuildResult> = serde_json::from_slice(stdout).ok()?;
    let first = results.into_iter().next()?;
    let mut outputs = first.outputs;
    outputs
        .remove("out")
        .or_else(|| outputs.into_values().next())
}

/// The host names from `nix eval --json … --apply builtins.attrNames`,
/// sorted.
pub fn host_names(stdout: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    let mut names: Vec<String> = serde_json::from_slice(stdout)?;
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_path_is_taken_from_the_out_output() {
        let json = br#"[{"drvPath":"/nix/store/a.drv","outputs":{"dev":"/nix/store/d","out":"/nix/store/o"}}]"#;
        assert_eq!(
            out_path_from_build_json(json).as_deref(),
            Some("/nix/store/o")
        );
        let json = br#"[{"drvPath":"/nix/store/a.drv","outputs":{"bin":"/nix/store/b"}}]"#;
        assert_eq!(
            out_path_from_build_json(json).as_deref(),
            Some("/nix/store/b")
        );
    }

    #[test]
    fn building_the_drv_file_itself_is_not_success() {
        // What `nix build --json /nix/store/x.drv` prints on Nix 2.15+.
        let json = br#"[{"path":"/nix/store/a.drv"}]"#;
        assert_eq!(out_path_from_build_json(json), None);
        assert_eq!(out_path_from_build_json(b"[]"), None);
        assert_eq!(out_path_from_build_json(b"garbage"), None);
    }

    #[test]
    fn flake_metadata_of_each_era_is_understood() {
        // Nix 2.8
        let old = FlakeMetadata::parse(r#"{"lastModified":1795826300,"locked":{"lastModified":1795826300,"narHash":"sha256-x","ref":"master","rev":"609da7ab2bec60c568928f7e8d760a36e14805b0","revCount":1,"type":"git","url":"file:///tmp/fl"},"locks":{"nodes":{"root":{}},"root":"root","version":7},"original":{"type":"git","url":"file:///tmp/fl"},"originalUrl":"git+file:///tmp/fl","path":"/nix/store/x-source","resolved":{"type":"git","url":"file:///tmp/fl"},"resolvedUrl":"git+file:///tmp/fl","revCount":1,"revision":"609da7ab2bec60c568928f7e8d760a36e14805b0","url":"git+file:///tmp/fl?ref=master&rev=609da7ab2bec60c568928f7e8d760a36e14805b0"}"#.as_bytes()).unwrap();
        assert_eq!(old.rev(), Some("609da7ab2bec60c568928f7e8d760a36e14805b0"));
        assert!(old.url.contains("rev=609da7ab"));
        // Nix 2.24 adds fingerprint and puts more attributes in the URL.
        let new = FlakeMetadata::parse(r#"{"fingerprint":"abc","lastModified":1795826300,"locked":{"lastModified":1795826300,"narHash":"sha256-x","ref":"master","rev":"609da7ab2bec60c568928f7e8d760a36e14805b0","revCount":1,"type":"git","url":"file:///tmp/fl"},"locks":{},"original":{},"originalUrl":"git+file:///tmp/fl","path":"/nix/store/x-source","resolved":{},"resolvedUrl":"git+file:///tmp/fl","revCount":1,"revision":"609da7ab2bec60c568928f7e8d760a36e14805b0","url":"git+file:///tmp/fl?lastModified=1795826300&narHash=sha256-x&ref=master&rev=609da7ab2bec60c568928f7e8d760a36e14805b0&revCount=1"}"#.as_bytes()).unwrap();
        assert_eq!(new.rev(), Some("609da7ab2bec60c568928f7e8d760a36e14805b0"));
        assert_eq!(new.nar_hash(), Some("sha256-x"));
        assert_eq!(new.path.as_deref(), Some("/nix/store/x-source"));
        assert!(!new.submodules());
        // A dirty tree: no rev; submodules and dir only in `locked`.
        let dirty = FlakeMetadata::parse(br#"{"locked":{"dir":"sub","narHash":"sha256-y","submodules":true,"type":"git","url":"file:///tmp/fl?dir=sub"},"path":"/nix/store/y-source","url":"git+file:///tmp/fl?dir=sub"}"#).unwrap();
        assert_eq!(dirty.rev(), None);
        assert!(dirty.submodules());
        assert_eq!(dirty.dir(), Some("sub"));
    }

    #[test]
    fn host_names_are_sorted() {
        assert_eq!(host_names(br#"["ns2","ns1"]"#).unwrap(), ["ns1", "ns2"]);
        assert!(host_names(br#"{"ns1":1}"#).is_err());
    }
}
