//! What ships for deploying: the NixOS module's defaults pass check-config.
//! (scripts/check-nix and scripts/check-workflows check the Nix files and
//! the example workflow; scripts/test runs them.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cli::{describe, run_cli};
use common::nix::nix_command;
use common::process::output_ok;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The module's defaults (nix/defaults.nix) with what a user must add, as
/// JSON from Nix itself, rendered to TOML like the module's
/// `pkgs.formats.toml` does.
fn module_config(extra: &str) -> String {
    let expression =
        format!("let defaults = (import {ROOT}/nix/defaults.nix).settings; in defaults // {extra}");
    let out = output_ok(nix_command("nix-instantiate").args([
        "--eval",
        "--strict",
        "--json",
        "--expr",
        &expression,
    ]));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    toml::to_string(&toml::Value::try_from(json).unwrap()).unwrap()
}

#[tokio::test]
async fn the_modules_defaults_pass_check_config() {
    // The nix-cache02 configuration of the README's "Deploying on NixOS".
    let config = module_config(
        r#"{
          nats = {
            url = "nats://nats.home.2rjus.net:4222";
            nkey_seed_file = "/run/credentials/homelab-deploy-builder.service/nkey";
          };
          repos = {
            nixos-servers = { url = "git+https://git.t-juice.club/torjus/nixos-servers.git"; ref = "master"; };
            nixos.url = "git+https://git.t-juice.club/torjus/nixos.git";
          };
        }"#,
    );
    assert!(
        config.contains("gc_roots_dir = \"/var/lib/homelab-deploy-builder/gcroots\""),
        "{config}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("builder.toml");
    std::fs::write(&path, &config).unwrap();
    let out = run_cli(
        "nats://unused:1",
        &["check-config", "--config", path.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{config}\n{}", describe(&out));

    // And a mistake in the same rendering is caught.
    std::fs::write(&path, config.replace("keep_roots = 3", "keep_roots = 0")).unwrap();
    let out = run_cli(
        "nats://unused:1",
        &["check-config", "--config", path.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}
