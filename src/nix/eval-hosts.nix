# Evaluates hosts of a flake's nixosConfigurations one after the other in
# one process, so what they share is evaluated once. For each host, in
# order, it traces `<marker>{"start":host}` and then
# `<marker>{"done":host,"drv":...,"out":...}`, so results stream out while
# later hosts still evaluate; an error aborts the evaluation, and the last
# `start` says which host it belongs to.
#
# `nix eval <flake>#nixosConfigurations --apply` calls this with `marker`
# and `hosts` already applied, each value a Nix string literal with every
# `\`, `"` and `$` escaped, so that no value is ever read as Nix code.
marker: hosts: configurations: let
  trace = value: builtins.trace (marker + builtins.toJSON value);
  report = host: let
    toplevel = configurations.${host}.config.system.build.toplevel;
  in
    trace {start = host;} (trace {
        done = host;
        drv = toplevel.drvPath;
        out = toplevel.outPath;
      }
      null);
in
  builtins.foldl' (previous: host: builtins.seq previous (report host)) null hosts
