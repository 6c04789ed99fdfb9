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
    packages = forAllSystems (pkgs: rec {
      homelab-deploy = pkgs.callPackage ./nix/package.nix {};
      default = homelab-deploy;
    });
  };
}
