//! The NixOS module's defaults (nix/defaults.nix) are the binary's own
//! (`check-config --print-defaults`), but for the files the module keeps in
//! the builder's state directory. nix/tests/module-eval.nix checks that the
//! module renders nix/defaults.nix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::nix::nix_command;
use homelab_deploy::SHUTDOWN_BUDGET;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Settings the binary leaves unset (it keeps no files unless told) and the
/// module sets.
const MODULE_ONLY: [&str; 4] = [
    "/builder/gc_roots_dir",
    "/builder/state_file",
    "/builder/journal_file",
    "/builder/history_db",
];

/// Features the binary leaves off and the module turns on.
const MODULE_TURNS_ON: [&str; 1] = ["/web/enabled"];

fn json(mut command: Command) -> Value {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn module_defaults() -> Value {
    let mut command = nix_command("nix-instantiate");
    command.args(["--eval", "--strict", "--json"]);
    command.arg(format!("{ROOT}/nix/defaults.nix"));
    json(command)
}

fn binary_defaults() -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_homelab-deploy"));
    command.args(["check-config", "--print-defaults"]);
    json(command)
}

/// Every value under `value` that is not a table, by its JSON pointer.
fn leaves(pointer: &str, value: &Value) -> Vec<(String, Value)> {
    match value {
        Value::Object(table) => table
            .iter()
            .flat_map(|(key, value)| leaves(&format!("{pointer}/{key}"), value))
            .collect(),
        other => vec![(pointer.to_owned(), other.clone())],
    }
}

/// Equal, durations by what they mean ("2h" is "120m").
fn same(a: &Value, b: &Value) -> bool {
    let duration = |value: &Value| {
        value
            .as_str()
            .and_then(|s| humantime::parse_duration(s).ok())
    };
    a == b || duration(a).is_some_and(|a| Some(a) == duration(b))
}

#[test]
fn the_modules_defaults_are_the_binarys() {
    let module = module_defaults();
    let binary = binary_defaults();
    let settings = leaves("", &module["settings"]);
    assert!(
        settings.len() > MODULE_ONLY.len() + MODULE_TURNS_ON.len(),
        "{module}"
    );

    let mut wrong = Vec::new();
    for (pointer, value) in &settings {
        let theirs = binary["settings"].pointer(pointer);
        if MODULE_TURNS_ON.contains(&pointer.as_str()) {
            if theirs != Some(&Value::Bool(false)) || value != &Value::Bool(true) {
                wrong.push(format!(
                    "{pointer}: the module sets {value}, the binary's default is {theirs:?}; expected true over false"
                ));
            }
        } else if MODULE_ONLY.contains(&pointer.as_str()) {
            if theirs != Some(&Value::Null) {
                wrong.push(format!(
                    "{pointer}: the module sets {value}, where the binary's default is {theirs:?}, not unset"
                ));
            }
        } else if !theirs.is_some_and(|theirs| same(value, theirs)) {
            wrong.push(format!(
                "{pointer}: the module's default is {value}, the binary's {theirs:?}"
            ));
        }
    }
    for pointer in MODULE_ONLY.iter().chain(&MODULE_TURNS_ON) {
        if !settings.iter().any(|(key, _)| key == pointer) {
            wrong.push(format!("{pointer}: not set by the module"));
        }
    }
    assert!(
        wrong.is_empty(),
        "nix/defaults.nix and the binary's defaults differ:\n{}",
        wrong.join("\n")
    );

    assert_eq!(
        module["shutdown_budget_secs"], binary["shutdown_budget_secs"],
        "shutdown budget"
    );
    assert_eq!(
        binary["shutdown_budget_secs"],
        SHUTDOWN_BUDGET.as_secs(),
        "shutdown budget"
    );
}
