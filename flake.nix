{
  description = "homelab-deploy: build a homelab's NixOS flakes on request over NATS";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = {
    self,
    nixpkgs,
  }: let
    systems = ["x86_64-linux" "aarch64-linux"];
    forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
  in {
    packages = forAllSystems (pkgs: {
      homelab-deploy = pkgs.callPackage ./nix/package.nix {};
      default = self.packages.${pkgs.stdenv.hostPlatform.system}.homelab-deploy;
    });

    overlays.default = final: _prev: {
      homelab-deploy = final.callPackage ./nix/package.nix {};
    };

    # The module builds the package with the system's pkgs (or takes
    # `pkgs.homelab-deploy` from the overlay). Its `key` makes importing
    # both names, or the file as well, one import.
    nixosModules = {
      builder = ./nix/module.nix;
      default = self.nixosModules.builder;
    };

    devShells = forAllSystems (pkgs: {
      default = pkgs.mkShell {
        packages = with pkgs; [
          cargo
          rustc
          clippy
          rustfmt
          nats-server
          nix
          prometheus
          git
          openssl
          alejandra
          deadnix
          statix
          actionlint
        ];
      };
    });

    checks = forAllSystems (pkgs: let
      package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
    in {
      inherit package;
      clippy = package.overrideAttrs (old: {
        pname = "homelab-deploy-clippy";
        nativeBuildInputs = (old.nativeBuildInputs or []) ++ [pkgs.clippy];
        buildPhase = "cargo clippy --offline --all-targets -- -D warnings";
        doCheck = false;
        installPhase = "touch $out";
      });
      vm = import ./nix/tests/builder.nix {inherit self pkgs;};
    });
  };
}
