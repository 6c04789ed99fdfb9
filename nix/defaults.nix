# What the NixOS module takes from the binary. Plain data without nixpkgs,
# so the test suite can read it: tests/module_defaults.rs holds it equal to
# `homelab-deploy check-config --print-defaults`, and tests/deploy.rs checks
# the settings with `homelab-deploy check-config`.
{
  # The builder settings the module sets unless told otherwise: the
  # binary's defaults, but for the files, which the binary keeps nowhere
  # unless told and the module keeps in the builder's state directory.
  settings = {
    metrics.listen = "0.0.0.0:9973";
    # The binary serves no pages unless told; the module's builder does.
    web.enabled = true;
    builder = {
      queue_limit = 16;
      host_timeout = "2h";
      progress_interval = "30s";
      gc_roots_dir = "/var/lib/homelab-deploy-builder/gcroots";
      keep_roots = 3;
      state_file = "/var/lib/homelab-deploy-builder/state.json";
      journal_file = "/var/lib/homelab-deploy-builder/journal";
      history_db = "/var/lib/homelab-deploy-builder/history.sqlite";
      eval_memory_budget = "40%";
    };
  };

  # SHUTDOWN_BUDGET: the builder stops within this many seconds of SIGTERM.
  shutdown_budget_secs = 15;
}
