//! The remote builders Nix is configured with: its `builders` setting, a
//! list of machines separated by `;` or newlines, or `@<file>` naming a
//! file of them (NixOS writes `nix.buildMachines` to `/etc/nix/machines`).
//! A machine is named by its first field, its store URI (as Nix names it in
//! its log); its SSH key (third field) and public host key (eighth) go into
//! the URI it is checked by.

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

/// One remote builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Its store URI as configured (and as Nix's log names it).
    pub uri: String,
    /// The URI to check it by: with its SSH key and host key, if given.
    pub check_uri: String,
}

impl Machine {
    fn parse(entry: &str) -> Option<Self> {
        let fields: Vec<&str> = entry.split_whitespace().collect();
        let uri = (*fields.first()?).to_owned();
        let given = |i: usize| fields.get(i).copied().filter(|f| *f != "-");
        let mut params = Vec::new();
        if let Some(key) = given(2) {
            params.push(format!("ssh-key={key}"));
        }
        if let Some(host_key) = given(7) {
            params.push(format!("base64-ssh-public-host-key={host_key}"));
        }
        let mut check_uri = uri.clone();
        if !params.is_empty() {
            check_uri.push(if uri.contains('?') { '&' } else { '?' });
            check_uri.push_str(&params.join("&"));
        }
        Some(Self { uri, check_uri })
    }
}

/// The machines of a `builders` value, in order, without duplicates, at
/// most [`MAX_MACHINES`]. An `@<file>` entry is read with `read_file` (a
/// missing file means no machines, as for Nix).
pub fn machine_uris(builders: &str, read_file: impl Fn(&str) -> Option<String>) -> Vec<Machine> {
    let mut machines: Vec<Machine> = Vec::new();
    let mut add = |text: &str| {
        for entry in text.split([';', '\n']) {
            let entry = entry.split('#').next().unwrap_or_default();
            if let Some(machine) = Machine::parse(entry)
                && machines.len() < MAX_MACHINES
                && !machines.iter().any(|m| m.uri == machine.uri)
            {
                machines.push(machine);
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
    machines
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

    fn uris(machines: Vec<Machine>) -> Vec<String> {
        machines.into_iter().map(|m| m.uri).collect()
    }

    #[test]
    fn keys_go_into_the_uri_a_machine_is_checked_by() {
        let machines = machine_uris(
            "ssh-ng://nix@b1 x86_64-linux /etc/nix/b1_ed25519 4 1 kvm - c3NoLWVkMjU1MTk=;ssh://b2?compress=true - /k;ssh-ng://b3",
            |_| None,
        );
        let checks: Vec<&str> = machines.iter().map(|m| m.check_uri.as_str()).collect();
        assert_eq!(
            checks,
            [
                "ssh-ng://nix@b1?ssh-key=/etc/nix/b1_ed25519&base64-ssh-public-host-key=c3NoLWVkMjU1MTk=",
                "ssh://b2?compress=true&ssh-key=/k",
                "ssh-ng://b3"
            ]
        );
        assert_eq!(machines[0].uri, "ssh-ng://nix@b1");
    }

    #[test]
    fn uris_come_from_every_form_of_the_setting() {
        let none = |_: &str| None;
        assert!(machine_uris("", none).is_empty());
        assert_eq!(
            uris(machine_uris(
                "ssh-ng://nix@b1 x86_64-linux /k 4 2 big-parallel ; ssh://b2 aarch64-linux",
                none
            )),
            ["ssh-ng://nix@b1", "ssh://b2"]
        );
        let file = "# the fleet's builders\nssh-ng://nix@b1 x86_64-linux - 8 1\n\n  ssh-ng://nix@b3 aarch64-linux # arm\nssh-ng://nix@b1 i686-linux\n";
        let read = |path: &str| (path == "/etc/nix/machines").then(|| file.to_owned());
        assert_eq!(
            uris(machine_uris("@/etc/nix/machines", read)),
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
