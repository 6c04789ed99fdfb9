# NixOS VM test: nats-server and the builder on one machine, a build of the
# bundled example flake requested with the client, then its result checked
# in the metrics and the GC roots. Needs KVM: `nix build .#checks.<system>.vm`.
{
  self,
  pkgs,
}:
pkgs.testers.runNixOSTest {
  name = "homelab-deploy-builder";

  nodes.machine = {
    config,
    lib,
    ...
  }: {
    imports = [self.nixosModules.builder];

    # No network in the VM: never wait for a binary cache.
    nix.settings = {
      substituters = lib.mkForce [];
      connect-timeout = 1;
    };

    services.nats.enable = true;
    systemd.services.homelab-deploy-builder.after = ["nats.service"];

    services.homelab-deploy.builder = {
      enable = true;
      settings = {
        nats.url = "nats://127.0.0.1:4222";
        repos.demo.url = "git+file:///srv/demo-flake";
      };
    };

    environment.systemPackages = [
      config.services.homelab-deploy.builder.package
      pkgs.curl
      pkgs.git
    ];
    virtualisation.memorySize = 2048;
  };

  testScript = ''
    machine.wait_for_unit("nats.service")
    machine.wait_for_unit("homelab-deploy-builder.service")

    # The example homelab as a git repository the builder user owns.
    machine.succeed(
        "cp -r ${../../examples/demo-flake} /srv/demo-flake",
        "chmod -R u+w /srv/demo-flake",
        "echo '{ system = \"${pkgs.stdenv.hostPlatform.system}\"; salt = \"vm\"; }' > /srv/demo-flake/local.nix",
        "git -C /srv/demo-flake init -q -b master",
        "git -C /srv/demo-flake add -A",
        "git -C /srv/demo-flake -c user.name=test -c user.email=test@localhost commit -q -m demo",
        "chown -R homelab-deploy-builder: /srv/demo-flake",
    )

    machine.succeed("homelab-deploy build demo --all --nats-url nats://127.0.0.1:4222")
    machine.succeed("homelab-deploy status --nats-url nats://127.0.0.1:4222 | grep -q 'demo/gateway'")

    metrics = machine.succeed("curl -sf http://127.0.0.1:9973/metrics")
    assert 'homelab_deploy_builder_builds_total{repo="demo",status="success"} 1' in metrics, metrics
    assert 'homelab_deploy_builder_nats_connected 1' in metrics, metrics
    machine.succeed("curl -sf http://127.0.0.1:9973/healthz")
    machine.succeed("test -e /var/lib/homelab-deploy-builder/gcroots/demo/gateway")
  '';
}
