//! Detecting the Nix version, because the command line differs between the
//! Nix that NixOS ships (2.24+) and older ones such as Debian's 2.8.

use std::fmt;

use thiserror::Error;

/// A Nix release, compared as `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NixVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

/// Why the version could not be determined.
#[derive(Debug, Error)]
pub enum VersionError {
    #[error("cannot run `{program} --version`: {source}; is Nix installed and on PATH?")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program} --version` failed: {stderr}")]
    Failed { program: String, stderr: String },
    #[error("cannot find a version number in `{output}`")]
    Unparsable { output: String },
    #[error("Nix {found} is too old: flakes need Nix 2.4 or later")]
    TooOld { found: NixVersion },
}

impl NixVersion {
    /// The oldest Nix with flakes and the `nix` command this tool relies on.
    pub const MINIMUM: Self = Self::new(2, 4, 0);
    /// From this release a bare `.drv` installable means the derivation file
    /// itself; its outputs must be selected with `^*` (added in 2.13).
    pub const DRV_NEEDS_OUTPUT_SELECTOR: Self = Self::new(2, 15, 0);

    /// A version from its parts.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Finds the version in `nix --version` output, e.g. `nix (Nix) 2.24.10`,
    /// `nix (Nix) 2.18.1pre20231020_dirty` or `nix (Lix, like Nix) 2.91.1`.
    pub fn parse(output: &str) -> Option<Self> {
        output.split_whitespace().find_map(Self::parse_token)
    }

    fn parse_token(token: &str) -> Option<Self> {
        let mut parts = token.splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor = leading_number(parts.next()?)?;
        let patch = parts.next().and_then(leading_number).unwrap_or(0);
        Some(Self::new(major, minor, patch))
    }

    /// Whether a derivation path must be written `drv^*` to mean its outputs.
    pub fn drv_needs_output_selector(self) -> bool {
        self >= Self::DRV_NEEDS_OUTPUT_SELECTOR
    }

    /// Runs `<program> --version` and parses it.
    pub async fn detect(program: &str) -> Result<Self, VersionError> {
        let output = tokio::process::Command::new(program)
            .arg("--version")
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| VersionError::Spawn {
                program: program.to_owned(),
                source,
            })?;
        if !output.status.success() {
            return Err(VersionError::Failed {
                program: program.to_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let version = Self::parse(&text).ok_or_else(|| VersionError::Unparsable {
            output: text.trim().to_owned(),
        })?;
        if version < Self::MINIMUM {
            return Err(VersionError::TooOld { found: version });
        }
        Ok(version)
    }
}

fn leading_number(text: &str) -> Option<u32> {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text[..end].parse().ok()
}

impl fmt::Display for NixVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_version_lines_of_each_era() {
        assert_eq!(
            NixVersion::parse("nix (Nix) 2.8.0\n"),
            Some(NixVersion::new(2, 8, 0))
        );
        assert_eq!(
            NixVersion::parse("nix (Nix) 2.24.10"),
            Some(NixVersion::new(2, 24, 10))
        );
        assert_eq!(
            NixVersion::parse("nix (Nix) 2.18.1pre20231020_dirty"),
            Some(NixVersion::new(2, 18, 1))
        );
        assert_eq!(
            NixVersion::parse("nix (Lix, like Nix) 2.91.1"),
            Some(NixVersion::new(2, 91, 1))
        );
        assert_eq!(
            NixVersion::parse("nix (Nix) 2.25"),
            Some(NixVersion::new(2, 25, 0))
        );
        assert_eq!(NixVersion::parse("nix (Nix) unknown"), None);
    }

    #[test]
    fn output_selector_starts_at_2_15() {
        assert!(!NixVersion::new(2, 8, 0).drv_needs_output_selector());
        assert!(!NixVersion::new(2, 14, 1).drv_needs_output_selector());
        assert!(NixVersion::new(2, 15, 0).drv_needs_output_selector());
        assert!(NixVersion::new(2, 24, 10).drv_needs_output_selector());
        assert!(NixVersion::new(3, 0, 0).drv_needs_output_selector());
    }
}
