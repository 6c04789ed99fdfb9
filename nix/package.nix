{
  lib,
  rustPlatform,
}: let
  cargoToml = lib.importTOML ../Cargo.toml;
in
  rustPlatform.buildRustPackage {
    pname = cargoToml.package.name;
    inherit (cargoToml.package) version;

    src = lib.fileset.toSource {
      root = ../.;
      fileset = lib.fileset.unions [
        ../Cargo.toml
        ../Cargo.lock
        ../clippy.toml
        ../config.example.toml
        ../src
        ../tests
        ../benches
        # proptest replays the failures recorded here first.
        ../proptest-regressions
      ];
    };
    cargoLock.lockFile = ../Cargo.lock;

    # Unit tests run in the build. The integration tests need a nats-server
    # and a writable Nix store, which the build sandbox has not: they run in
    # the repository's ./scripts/test, and the NixOS VM test (checks.vm)
    # covers the service as deployed.
    cargoTestFlags = ["--lib"];

    meta = {
      inherit (cargoToml.package) description;
      license = lib.licenses.mit;
      mainProgram = "homelab-deploy";
      platforms = lib.platforms.linux;
    };
  }
