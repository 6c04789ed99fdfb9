# services.homelab-deploy.builder: the build service as a hardened systemd
# unit, plus timers for scheduled builds.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}: let
  cfg = config.services.homelab-deploy.builder;
  defaults = import ./defaults.nix;
  toml = pkgs.formats.toml {};
  user = "homelab-deploy-builder";
  stateDir = "/var/lib/${user}";
  credential = "/run/credentials/${user}.service/nkey";

  # TOML has no null: unset optional keys are left out.
  settings = lib.filterAttrsRecursive (_: value: value != null) cfg.settings;
  # Checked when the system is built, so a bad config never reaches the host
  # (this runs the package for the host's platform: cross-building a system
  # needs binfmt or a remote builder for it).
  configFile =
    pkgs.runCommand "homelab-deploy-builder.toml" {
      nativeBuildInputs = [cfg.package];
      config = toml.generate "homelab-deploy-builder-unchecked.toml" settings;
    } ''
      homelab-deploy check-config --config "$config"
      cp "$config" "$out"
    '';

  natsUrls = lib.toList cfg.settings.nats.url;

  scheduleUnit = i: entry: "homelab-deploy-build-${toString i}-${entry.repo}-${entry.target}";

  option = type: default: description: lib.mkOption {inherit type default description;};

  scheduledServices = lib.listToAttrs (lib.imap0 (i: entry:
    lib.nameValuePair (scheduleUnit i entry) {
      description = "homelab-deploy build of ${entry.repo}/${entry.target}";
      wants = ["network-online.target"];
      after = ["network-online.target" "homelab-deploy-builder.service"];
      environment = {
        HOMELAB_DEPLOY_NATS_URL = lib.concatStringsSep "," natsUrls;
        HOMELAB_DEPLOY_NKEY_FILE = lib.mkIf (cfg.scheduleNkeyFile != null) "/run/credentials/${scheduleUnit i entry}.service/nkey";
      };
      serviceConfig = {
        Type = "oneshot";
        # A failed build fails the unit (exit 1; 3 when no builder answers).
        ExecStart = utils.escapeSystemdExecArgs ([(lib.getExe cfg.package) "build" entry.repo]
          ++ (
            if entry.target == "all"
            then ["--all"]
            else [entry.target]
          )
          ++ lib.optionals (entry.ref != null) ["--ref" entry.ref]);
        DynamicUser = true;
        LoadCredential = lib.optional (cfg.scheduleNkeyFile != null) "nkey:${cfg.scheduleNkeyFile}";
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        NoNewPrivileges = true;
        CapabilityBoundingSet = "";
        RestrictAddressFamilies = ["AF_UNIX" "AF_INET" "AF_INET6"];
        SystemCallFilter = ["@system-service" "~@privileged"];
      };
    })
  cfg.schedule);
in {
  # Imported through both nixosModules.builder and .default, it counts once.
  key = "homelab-deploy#builder";

  options.services.homelab-deploy.builder = {
    enable = lib.mkEnableOption "the homelab-deploy build service";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The homelab-deploy package (the flake's module sets it).";
    };

    nixPackage = lib.mkOption {
      type = lib.types.package;
      default = config.nix.package;
      defaultText = lib.literalExpression "config.nix.package";
      description = "The Nix the builder runs (against the system's daemon).";
    };

    extraPath = option (lib.types.listOf lib.types.package) [] "More programs on the builder's PATH (git and Nix are always there).";

    nkeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/homelab-deploy-builder-nkey";
      description = ''
        File with the builder's NKey seed. It is handed to the service with
        systemd's LoadCredential (so it may stay readable by root only) and
        never copied into the Nix store.
      '';
    };

    openFirewall = option lib.types.bool false "Open the metrics port in the firewall.";

    settings = lib.mkOption {
      description = ''
        The builder's configuration, rendered to TOML: the same keys as
        config.example.toml. Keys without an option here are passed through.
      '';
      default = {};
      type = lib.types.submodule {
        freeformType = toml.type;
        options = {
          nats = lib.mkOption {
            default = {};
            type = lib.types.submodule {
              freeformType = toml.type;
              options = {
                url = lib.mkOption {
                  type = lib.types.either lib.types.str (lib.types.listOf lib.types.str);
                  example = "nats://nats.home.2rjus.net:4222";
                  description = "NATS server URL, or a list of them.";
                };
                nkey_seed_file = lib.mkOption {
                  type = lib.types.nullOr lib.types.str;
                  default =
                    if cfg.nkeyFile != null
                    then credential
                    else null;
                  defaultText = lib.literalMD "the service's credential when `nkeyFile` is set, else `null`";
                  description = "Set from `nkeyFile`.";
                };
              };
            };
          };
          metrics = lib.mkOption {
            default = {};
            type = lib.types.submodule {
              freeformType = toml.type;
              options.listen = option lib.types.str defaults.metrics.listen "Address of the Prometheus endpoint.";
            };
          };
          builder = lib.mkOption {
            default = {};
            type = lib.types.submodule {
              freeformType = toml.type;
              options = {
                queue_limit = option lib.types.ints.positive defaults.builder.queue_limit "Requests that may wait behind the running one.";
                host_timeout = option lib.types.str defaults.builder.host_timeout "Limit for a host's evaluation and for its build.";
                progress_interval = option lib.types.str defaults.builder.progress_interval "Progress events at least this often.";
                gc_roots_dir = option lib.types.str defaults.builder.gc_roots_dir "Where built hosts are rooted (kept from the garbage collector).";
                keep_roots = option lib.types.ints.positive defaults.builder.keep_roots "Root generations kept per host.";
                state_file = option lib.types.str defaults.builder.state_file "Keeps every host's last result across restarts.";
              };
            };
          };
          repos = lib.mkOption {
            description = "Repo name → flake to build.";
            type = lib.types.attrsOf (lib.types.submodule {
              freeformType = toml.type;
              options = {
                url = lib.mkOption {
                  type = lib.types.str;
                  description = "Flake URL, without ref or rev.";
                };
                ref = option (lib.types.nullOr lib.types.str) null "Default branch or tag.";
                exclude = option (lib.types.listOf lib.types.str) [] "Hosts that `all` skips.";
              };
            });
          };
        };
      };
    };

    schedule = lib.mkOption {
      default = [];
      description = ''
        Builds to request on a timer (with `homelab-deploy build`), using
        `scheduleNkeyFile` as the requesting identity. A timer's unit fails
        when its build fails.
      '';
      example = lib.literalExpression ''[ { repo = "nixos-servers"; onCalendar = "*-*-* *:30:00"; } ]'';
      type = lib.types.listOf (lib.types.submodule {
        options = {
          repo = lib.mkOption {
            type = lib.types.str;
            description = "Repo to build.";
          };
          target = option lib.types.str "all" "Host to build, or `all`.";
          ref = option (lib.types.nullOr lib.types.str) null "Branch or tag instead of the repo's default.";
          onCalendar = lib.mkOption {
            type = lib.types.str;
            description = "When, as systemd.time(7) calendar events.";
          };
        };
      });
    };

    scheduleNkeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = ''
        NKey seed of the identity scheduled builds are requested as: a
        deployer with `build.>` publish rights (the builder's own key may
        only answer). Delivered with LoadCredential. Leave unset only for a
        NATS server without authentication.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        # Nix lets users, `@group`s listed in allowed-users, and trusted
        # users connect to the daemon.
        assertion = let
          allowed = config.nix.settings.allowed-users;
        in
          lib.any (entry: entry == "*" || entry == user || entry == "@${user}") allowed
          || lib.elem user config.nix.settings.trusted-users;
        message = "services.homelab-deploy.builder: add \"${user}\" to nix.settings.allowed-users so the builder may use the Nix daemon.";
      }
    ];

    users.users.${user} = {
      isSystemUser = true;
      group = user;
      home = stateDir;
      description = "homelab-deploy build service";
    };
    users.groups.${user} = {};

    networking.firewall.allowedTCPPorts =
      lib.mkIf cfg.openFirewall
      [(lib.toInt (lib.last (lib.splitString ":" cfg.settings.metrics.listen)))];

    systemd.services =
      scheduledServices
      // {
        homelab-deploy-builder = {
          description = "homelab-deploy build service";
          wantedBy = ["multi-user.target"];
          wants = ["network-online.target"];
          after = ["network-online.target" "nix-daemon.socket"];
          path = [cfg.nixPackage pkgs.git] ++ cfg.extraPath;
          environment = {
            # Builds go through the daemon (as this unprivileged user); Nix's
            # fetch and evaluation caches live in the cache directory.
            NIX_REMOTE = "daemon";
            XDG_CACHE_HOME = "/var/cache/${user}";
            HOME = stateDir;
          };
          serviceConfig = {
            Type = "notify";
            ExecStart = "${lib.getExe cfg.package} builder --config ${configFile}";
            WatchdogSec = "60s";
            Restart = "on-failure";
            RestartSec = "5s";
            # The builder stops within 15 s of SIGTERM.
            TimeoutStopSec = "30s";
            User = user;
            Group = user;
            StateDirectory = user;
            StateDirectoryMode = "0750";
            CacheDirectory = user;
            LoadCredential = lib.optional (cfg.nkeyFile != null) "nkey:${cfg.nkeyFile}";
            UMask = "0077";

            # Hardening. Builds happen in the daemon; this process only talks to
            # it over its socket, to NATS, and to the forge when fetching.
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
            PrivateDevices = true;
            NoNewPrivileges = true;
            CapabilityBoundingSet = "";
            AmbientCapabilities = "";
            RestrictAddressFamilies = ["AF_UNIX" "AF_INET" "AF_INET6"];
            SystemCallFilter = ["@system-service" "~@privileged"];
            SystemCallArchitectures = "native";
            ProtectKernelTunables = true;
            ProtectKernelModules = true;
            ProtectKernelLogs = true;
            ProtectControlGroups = true;
            ProtectClock = true;
            ProtectHostname = true;
            ProtectProc = "invisible";
            RestrictNamespaces = true;
            RestrictRealtime = true;
            RestrictSUIDSGID = true;
            LockPersonality = true;
            RemoveIPC = true;
          };
        };
      };

    systemd.timers = lib.listToAttrs (lib.imap0 (i: entry:
      lib.nameValuePair (scheduleUnit i entry) {
        description = "Scheduled homelab-deploy build of ${entry.repo}/${entry.target}";
        wantedBy = ["timers.target"];
        timerConfig = {
          OnCalendar = entry.onCalendar;
          # Catch up on a build missed while the host was down.
          Persistent = true;
        };
      })
    cfg.schedule);
  };
}
