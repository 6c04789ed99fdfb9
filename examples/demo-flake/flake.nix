{
  description = "A tiny offline homelab for the homelab-deploy demo";

  # No inputs: plain derivations with /bin/sh as builder, so the demo needs
  # neither nixpkgs nor the network. `local.nix` is written by scripts/demo
  # (this machine's system, and a per-run salt so every run really builds).
  outputs = _: let
    local = import ./local.nix;
    inherit (local) system;

    # Stands in for a derivation: prints a few log lines and takes a moment.
    step = name: seconds: deps:
      derivation {
        inherit name system deps;
        inherit (local) salt;
        builder = "/bin/sh";
        args = [
          "-c"
          ''
            echo "building ${name}"
            i=0
            while [ $i -lt ${toString seconds} ]; do
              i=$((i + 1))
              echo "${name}: step $i of ${toString seconds}"
              [ -x /bin/sleep ] && /bin/sleep 1
            done
            echo "${name} ${toString deps}" > $out
          ''
        ];
      };

    # Shared by every host, like nixpkgs' closure: built once, reused.
    base = step "base-system" 3 [];

    host = name: services: {
      config.system.build.toplevel =
        step "nixos-system-${name}" 1 ([base] ++ map (s: step "${name}-${s}" 1 [base]) services);
    };
  in {
    nixosConfigurations = {
      gateway = host "gateway" ["unbound" "nftables"];
      nas = host "nas" ["samba"];
      monitoring = host "monitoring" ["prometheus" "grafana"];
    };
  };
}
