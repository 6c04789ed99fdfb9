# A small stand-in for nixpkgs' `pkgs` and NixOS's `utils`: just what
# nix/module.nix and nix/package.nix use. Nothing is built: a "derivation"
# is an attribute set with a store path derived from its inputs, so two
# stand-ins are the same path exactly when they were made from the same
# inputs (the test uses that to tell which settings the unit's config file
# was rendered from).
{
  lib,
  system ? "x86_64-linux",
}: let
  fakeDerivation = name: inputs: extra:
    {
      type = "derivation";
      inherit name system;
      outPath = "/nix/store/${builtins.substring 0 32 (builtins.hashString "sha256" (builtins.toJSON inputs))}-${name}";
      outputName = "out";
      meta = {};
    }
    // extra;

  # JSON with everything TOML can hold (pkgs.formats.toml's type is
  # formats.json's: null, bool, int, float, string, path, lists and
  # attribute sets of those).
  tomlValue = let
    valueType =
      lib.types.nullOr (lib.types.oneOf [
        lib.types.bool
        lib.types.int
        lib.types.float
        lib.types.str
        lib.types.path
        (lib.types.attrsOf valueType)
        (lib.types.listOf valueType)
      ])
      // {description = "TOML value";};
  in
    valueType;

  base = final: {
    inherit lib;
    stdenv.hostPlatform.system = system;

    nix = fakeDerivation "nix-2.28.4" "nix" {meta.mainProgram = "nix";};
    git = fakeDerivation "git-2.50.1" "git" {meta.mainProgram = "git";};
    openssh = fakeDerivation "openssh-10.0p2" "openssh" {meta.mainProgram = "ssh";};

    formats.toml = _: {
      type = tomlValue;
      generate = name: value: fakeDerivation name [name value] {inherit value;};
    };

    runCommand = name: env: script: fakeDerivation name [name env] {inherit env script;};

    callPackage = lib.callPackageWith final;

    rustPlatform.buildRustPackage = args:
      fakeDerivation "${args.pname}-${args.version}" [args.pname args.version] {
        inherit (args) pname version src;
        meta = args.meta or {};
      };
  };
in {
  # `pkgs`, with overlays applied in order like nixpkgs.overlays.
  pkgs = overlays: lib.fix (lib.foldl' (lib.flip lib.extends) base overlays);

  # nixos/lib/utils.nix: each argument JSON-quoted, with `%` and `$`
  # doubled so systemd leaves them alone.
  utils.escapeSystemdExecArgs =
    lib.concatMapStringsSep " " (arg:
      builtins.replaceStrings ["%" "$"] ["%%" "$$"] (builtins.toJSON (toString arg)));
}
