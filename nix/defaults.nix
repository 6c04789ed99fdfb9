# The builder settings the NixOS module sets unless told otherwise. Plain
# data without nixpkgs, so the test suite can render it and check it with
# `homelab-deploy check-config` (tests/deploy.rs).
{
  metrics.listen = "0.0.0.0:9973";
  builder = {
    queue_limit = 16;
    host_timeout = "2h";
    progress_interval = "30s";
    gc_roots_dir = "/var/lib/homelab-deploy-builder/gcroots";
    keep_roots = 3;
    state_file = "/var/lib/homelab-deploy-builder/state.json";
    journal_file = "/var/lib/homelab-deploy-builder/journal";
  };
}
