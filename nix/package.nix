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
      ];
    };
    cargoLock.lockFile = ../Cargo.lock;

    # The integration tests need a nats-server and a writable Nix store;
    # the unit tests run in the build.
    cargoTestFlags = ["--lib"];

    meta = {
      description = cargoToml.package.description;
      license = lib.licenses.mit;
      mainProgram = "homelab-deploy";
      platforms = lib.platforms.linux;
    };
  }
