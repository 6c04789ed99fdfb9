//! The remote builders Nix is configured with: its `builders` setting, a
//! list of machines separated by `;` or newlines, or `@<file>` naming a
//! file of them (NixOS writes `nix.buildMachines` to `/etc/nix/machines`).
//! Only each machine's first field, its store URI, matters here.

use serde::Deserialize;

/// Machines read at most: more than a homelab has.
pub const MAX_MACHINES: usize = 32;

/// Largest machines file read.
const MAX_FILE_BYTES: u64 = 64 * 1024;

#[derive(Deserialize)]
struct Setting {
    value: serde_json::Value,
}

#[derive(Deserialize)]
struct Settings {
    builders: Setting,
}

/// The `builders` value from `nix show-config --json` (or `nix config
/// show --json`); `None` when it is not there.
pub fn builders_setting(stdout: &[u8]) -> Option<String> {
    let settings: Settings = serde_json::from_slice(stdout).ok()?;
    settings.builders.value.as_str().map(str::to_owned)
}

/// The store URIs of a `builders` value, in order, without duplicates, at
/// most [`MAX_MACHINES`]. An `@<file>` entry is read with `read_file` (a
/// missing file means no machines, as for Nix).
pub fn machine_uris(builders: &str, read_file: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut uris = Vec::new();
    let mut add = |text: &str| {
        for entry in text.split([';', '\n']) {
            let entry = entry.split('#').next().unwrap_or_default();
            if let Some(uri) = entry.split_whitespace().next()
                && uris.len() < MAX_MACHINES
                && !uris.iter().any(|u| u == uri)
            {
                uris.push(uri.to_owned());
            }
        }
    };
    match builders.trim().strip_prefix('@') {
        Some(path) => {
            if let Some(text) = read_file(path.trim()) {
                add(&text);
            }
        }
        None => add(builders),
    }
    uris
}

/// Reads a machines file, if it exists and is not unreasonably large.
pub fn read_machines_file(path: &str) -> Option<String> {
    let metadata = std::fs::metadata(path).ok()?;
    if metadata.len() > MAX_FILE_BYTES {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_come_from_every_form_of_the_setting() {
        let none = |_: &str| None;
        assert!(machine_uris("", none).is_empty());
        assert_eq!(
            machine_uris(
                "ssh-ng://nix@b1 x86_64-linux /k 4 2 big-parallel ; ssh://b2 aarch64-linux",
                none
            ),
            ["ssh-ng://nix@b1", "ssh://b2"]
        );
        let file = "# the fleet's builders\nssh-ng://nix@b1 x86_64-linux - 8 1\n\n  ssh-ng://nix@b3 aarch64-linux # arm\nssh-ng://nix@b1 i686-linux\n";
        let read = |path: &str| (path == "/etc/nix/machines").then(|| file.to_owned());
        assert_eq!(
            machine_uris("@/etc/nix/machines", read),
            ["ssh-ng://nix@b1", "ssh-ng://nix@b3"]
        );
        assert!(machine_uris("@/nonexistent", read).is_empty());
    }

    #[test]
    fn the_list_is_bounded() {
        let many: Vec<String> = (0..100).map(|i| format!("ssh://b{i}")).collect();
        assert_eq!(machine_uris(&many.join(";"), |_| None).len(), MAX_MACHINES);
    }

    #[test]
    fn the_setting_is_read_from_both_json_forms() {
        // Nix 2.8 and 2.26 both give {"builders": {"value": ..., ...}}.
        let json = br#"{"builders":{"aliases":[],"defaultValue":"@/etc/nix/machines","description":"","value":"@/etc/nix/machines"},"cores":{"value":0}}"#;
        assert_eq!(
            builders_setting(json).as_deref(),
            Some("@/etc/nix/machines")
        );
        assert_eq!(builders_setting(b"{}"), None);
        assert_eq!(builders_setting(b"not json"), None);
    }
}
