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
  credentials = unit: "/run/credentials/${unit}.service";

  # A builder setting that points at the service's credential `name` when
  # the module option `from` (a secret's path) is set.
  credentialSetting = from: name:
    lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default =
        if cfg.${from} != null
        then "${credentials "homelab-deploy-builder"}/${name}"
        else null;
      defaultText = lib.literalMD "the service's credential when `${from}` is set, else `null`";
      description = "Set from `${from}`.";
    };

  # The names the protocol accepts (src/protocol/request.rs: is_valid_name,
  # validate_ref), so a scheduled build is never rejected for its name and
  # its unit name is a valid one.
  nameType = lib.types.strMatching "[A-Za-z0-9_][A-Za-z0-9_-]{0,127}";
  refType =
    lib.types.addCheck (lib.types.strMatching "[A-Za-z0-9_./][A-Za-z0-9_./-]{0,199}") (ref: !lib.hasInfix ".." ref)
    // {description = "git branch or tag (letters, digits, `-_./`, no `..`)";};

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

  writablePaths = lib.unique (lib.filter (dir: dir != stateDir && !lib.hasPrefix "${stateDir}/" dir) (
    lib.optional (settings.builder ? gc_roots_dir) settings.builder.gc_roots_dir
    ++ lib.optional (settings.builder ? state_file) (dirOf settings.builder.state_file)
    ++ lib.optional (settings.builder ? journal_file) (dirOf settings.builder.journal_file)
    ++ lib.optional (settings.builder ? history_db) (dirOf settings.builder.history_db)
  ));

  scheduleUnit = i: entry: "homelab-deploy-build-${toString i}-${entry.repo}-${entry.target}";
  scheduleCredentials = lib.filterAttrs (_: file: file != null) {
    nkey = cfg.scheduleNkeyFile;
    creds = cfg.scheduleCredentialsFile;
    tls-ca = cfg.settings.nats.tls_ca_file;
  };

  option = type: default: description: lib.mkOption {inherit type default description;};

  # The sandbox of the builder's unit and of every scheduled build's, the
  # same for both: builds happen in the Nix daemon, so the builder only
  # talks to it over its socket, to NATS and to the forge when fetching,
  # and a scheduled build only to NATS. What differs is outside this set:
  # who they run as (the builder's user, a DynamicUser) and what the
  # builder may write (its state and cache directories, ReadWritePaths).
  hardening = {
    UMask = "0077";
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    NoNewPrivileges = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    RestrictAddressFamilies = ["AF_UNIX" "AF_INET" "AF_INET6"];
    SystemCallFilter = ["@system-service" "~@privileged"];
    SystemCallErrorNumber = "EPERM";
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

  scheduledServices = lib.listToAttrs (lib.imap0 (i: entry:
    lib.nameValuePair (scheduleUnit i entry) {
      description = "homelab-deploy build of ${entry.repo}/${entry.target}";
      wants = ["network-online.target"];
      after = ["network-online.target" "homelab-deploy-builder.service"];
      # `nixos-rebuild switch` must not restart a build that is running.
      restartIfChanged = false;
      environment = let
        credential = name: lib.mkIf (scheduleCredentials ? ${name}) "${credentials (scheduleUnit i entry)}/${name}";
      in {
        HOMELAB_DEPLOY_NATS_URL = lib.concatStringsSep "," natsUrls;
        HOMELAB_DEPLOY_NKEY_FILE = credential "nkey";
        HOMELAB_DEPLOY_CREDS_FILE = credential "creds";
        HOMELAB_DEPLOY_TLS_CA_FILE = credential "tls-ca";
        HOMELAB_DEPLOY_BUILDER_KEY = lib.mkIf (cfg.builderPublicKey != null) cfg.builderPublicKey;
      };
      serviceConfig =
        {
          Type = "oneshot";
          # A failed build fails the unit (exit 1; 3 when no builder answers).
          ExecStart = utils.escapeSystemdExecArgs ([(lib.getExe cfg.package) "build" entry.repo]
            ++ (
              if entry.target == "all"
              then ["--all"]
              else [entry.target]
            )
            ++ lib.optionals (entry.ref != null) ["--ref" entry.ref]
            # A timer that fires while the builder restarts waits for it.
            ++ ["--wait-for-builder" cfg.scheduleWaitForBuilder]);
          DynamicUser = true;
          LoadCredential = lib.mapAttrsToList (name: file: "${name}:${file}") scheduleCredentials;
        }
        // hardening;
    })
  cfg.schedule);
in {
  # Imported more than once (nixosModules.builder and .default, or this
  # file), it counts once.
  key = "homelab-deploy#builder";

  options.services.homelab-deploy.builder = {
    enable = lib.mkEnableOption "the homelab-deploy build service";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.homelab-deploy or (pkgs.callPackage ./package.nix {});
      defaultText = lib.literalMD "`pkgs.homelab-deploy` when the flake's overlay is applied, else built from this repository with `pkgs`";
      description = "The homelab-deploy package; the service runs it and it is put on the system's PATH.";
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

    credentialsFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/homelab-deploy-builder.creds";
      description = "A NATS `.creds` file instead of `nkeyFile`, delivered the same way.";
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
                queue_group = option (lib.types.nullOr (lib.types.strMatching "[A-Za-z0-9._-]{1,64}")) null "NATS queue group of the builder's build requests: builders in one group share the requests of the repos they both serve, and one takes over when another is gone (a standby, or two build hosts during a migration). `null`: one group per repo, `homelab-deploy-<repo>`, so builders configured alike share it.";
                nkey_seed_file = credentialSetting "nkeyFile" "nkey";
                credentials_file = credentialSetting "credentialsFile" "creds";
                tls_ca_file = lib.mkOption {
                  type = lib.types.nullOr lib.types.str;
                  default = null;
                  example = "/etc/ssl/homelab-ca.pem";
                  description = ''
                    CA certificate (PEM) for `tls://` servers not signed by a
                    system root. The builder reads it as its own user; scheduled
                    builds get it as a credential.
                  '';
                };
              };
            };
          };
          metrics = lib.mkOption {
            default = {};
            type = lib.types.submodule {
              freeformType = toml.type;
              options.listen = option lib.types.str defaults.settings.metrics.listen "Address of the Prometheus endpoint.";
            };
          };
          web = lib.mkOption {
            default = {};
            type = lib.types.submodule {
              freeformType = toml.type;
              options = {
                enabled = option lib.types.bool defaults.settings.web.enabled "Serve the status pages and the read-only JSON API on the metrics listener (`openFirewall` opens it).";
                url = option (lib.types.nullOr lib.types.str) null "The address people reach the pages at, told by `homelab-deploy status`; `null`: `http://<host name>:<port>/`.";
              };
            };
          };
          builder = lib.mkOption {
            default = {};
            type = lib.types.submodule {
              freeformType = toml.type;
              options = {
                queue_limit = option lib.types.ints.positive defaults.settings.builder.queue_limit "Requests that may wait behind the running one.";
                host_timeout = option lib.types.str defaults.settings.builder.host_timeout "Limit for a host's evaluation and for its build.";
                progress_interval = option lib.types.str defaults.settings.builder.progress_interval "Progress events at least this often.";
                gc_roots_dir = option (lib.types.nullOr lib.types.str) defaults.settings.builder.gc_roots_dir "Where built hosts are rooted (kept from the garbage collector); `null` builds with `--no-link`.";
                keep_roots = option lib.types.ints.positive defaults.settings.builder.keep_roots "Root generations kept per host.";
                state_file = option (lib.types.nullOr lib.types.str) defaults.settings.builder.state_file "Keeps every host's last result across restarts; `null` keeps nothing.";
                journal_file = option (lib.types.nullOr lib.types.str) defaults.settings.builder.journal_file "Journal of accepted requests, resumed after a restart or a crash; `null`: a stop cancels them.";
                name = option (lib.types.nullOr (lib.types.strMatching "[A-Za-z0-9._-]{1,64}")) null "The builder's name in `accepted` and in its status, where several builders share a NATS server; `null`: the host name.";
                history_db = option (lib.types.nullOr lib.types.str) defaults.settings.builder.history_db "SQLite history of every build and host result, for the pages and the API; `null` keeps none.";
                eval_memory_budget =
                  option (lib.types.strMatching "([1-9][0-9]?|100)%|[0-9]+(\\.[0-9]+)? ?([KMGT]i?B?|[kmgt]i?b?|B|b)?")
                  defaults.settings.builder.eval_memory_budget
                  "Memory all evaluator processes may hold together: a size (`\"6GiB\"`) or a share of the machine's memory (`\"40%\"`). Leave room for builds, the Nix daemon and the cache.";
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
            type = nameType;
            description = "Repo to build: a name in `settings.repos`.";
          };
          target = option nameType "all" "Host to build, or `all`.";
          ref = option (lib.types.nullOr refType) null "Branch or tag instead of the repo's default.";
          onCalendar = lib.mkOption {
            type = lib.types.strMatching "[^\n]+";
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
        NATS server without authentication (or use `scheduleCredentialsFile`).
      '';
    };

    scheduleCredentialsFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      description = "A NATS `.creds` file instead of `scheduleNkeyFile`, delivered the same way.";
    };

    scheduleWaitForBuilder = lib.mkOption {
      type = lib.types.strMatching "[0-9]+(ms|s|m|h)";
      default = "10m";
      description = "How long a scheduled build keeps asking while no builder answers (it may be restarting).";
    };

    remoteBuilders = lib.mkOption {
      default = [];
      description = ''
        Machines Nix sends derivations to (its distributed builds): rendered
        to `nix.buildMachines`, with `nix.distributedBuilds` and
        `builders-use-substitutes` set. The Nix daemon (root) logs in and
        builds there; results come back into this machine's store, so GC
        roots and caches keep working. Each host's `host_finished` says
        which machine built what; the builder checks every machine once a
        minute (`machine_up`, `build.status`). Build several hosts at once
        with `settings.builder.parallel_hosts`.
      '';
      type = lib.types.listOf (lib.types.submodule {
        options = {
          uri = lib.mkOption {
            type = lib.types.strMatching "(ssh|ssh-ng)://([^@/?# ]+@)?[^@/?# ]+";
            example = "ssh-ng://nix@builder1.lab";
            description = "The machine's store URI: `ssh-ng://` (or `ssh://`), an optional user, the host.";
          };
          systems = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [pkgs.stdenv.hostPlatform.system];
            defaultText = lib.literalExpression "[ pkgs.stdenv.hostPlatform.system ]";
            example = ["aarch64-linux"];
            description = "Systems it builds for.";
          };
          sshKey = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            example = "/etc/nix/builder_ed25519";
            description = ''
              Private key to log in with; null: root's SSH defaults. The Nix
              daemon reads it as root; the builder's machine check reads it
              too, as the builder's user, so make it group-readable by
              `homelab-deploy-builder` (mode 0640) and keep it out of /root
              and /home (the builder's unit cannot see them).
            '';
          };
          publicHostKey = lib.mkOption {
            type = lib.types.nullOr lib.types.str;
            default = null;
            description = "The machine's SSH host key, base64-encoded (`base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`); null: known_hosts.";
          };
          maxJobs = lib.mkOption {
            type = lib.types.ints.positive;
            default = 1;
            description = "Derivations it builds at once.";
          };
          speedFactor = lib.mkOption {
            type = lib.types.ints.positive;
            default = 1;
            description = "Relative speed: Nix prefers faster machines.";
          };
          features = lib.mkOption {
            type = lib.types.listOf lib.types.str;
            default = [];
            example = ["big-parallel" "kvm"];
            description = "System features it supports.";
          };
        };
      });
    };

    builderPublicKey = lib.mkOption {
      type = lib.types.nullOr (lib.types.strMatching "U[A-Z2-7]{55}");
      default = null;
      example = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
      description = ''
        The builder's NKey public key (`homelab-deploy nkey --public-key-of`
        on its seed prints it). Scheduled builds then accept only results
        signed with it (`HOMELAB_DEPLOY_BUILDER_KEY`), so nobody else on NATS
        can forge one.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions =
      [
        {
          assertion = cfg.nkeyFile == null || cfg.credentialsFile == null;
          message = "services.homelab-deploy.builder: set nkeyFile or credentialsFile, not both.";
        }
        {
          assertion = cfg.scheduleNkeyFile == null || cfg.scheduleCredentialsFile == null;
          message = "services.homelab-deploy.builder: set scheduleNkeyFile or scheduleCredentialsFile, not both.";
        }
      ]
      ++ map (entry: {
        assertion = cfg.settings.repos ? ${entry.repo};
        message = "services.homelab-deploy.builder.schedule: repo \"${entry.repo}\" is not in settings.repos (${lib.concatStringsSep ", " (lib.attrNames cfg.settings.repos)}).";
      })
      cfg.schedule;

    warnings = lib.optional (cfg.schedule != [] && (cfg.settings.nats.tls_cert_file or null) != null) ''
      services.homelab-deploy.builder.schedule: scheduled builds connect to NATS without the
      builder's client certificate (the client has no option for one); a server that requires
      client certificates refuses them.
    '';

    # Whatever allowed-users says, the builder may use the daemon (as an
    # unprivileged user: it is not made a trusted user).
    nix.settings.extra-allowed-users = [user];

    # Remote builders: the daemon builds there (the builder cannot pass
    # `--builders` per request without being a trusted user).
    nix.distributedBuilds = lib.mkIf (cfg.remoteBuilders != []) true;
    nix.settings.builders-use-substitutes = lib.mkIf (cfg.remoteBuilders != []) true;
    nix.buildMachines =
      map (machine: let
        parts = builtins.match "(ssh|ssh-ng)://(([^@]+)@)?(.+)" machine.uri;
      in {
        protocol = lib.elemAt parts 0;
        sshUser = lib.elemAt parts 2;
        hostName = lib.elemAt parts 3;
        inherit (machine) systems sshKey publicHostKey maxJobs speedFactor;
        supportedFeatures = machine.features;
      })
      cfg.remoteBuilders;

    environment.systemPackages = [cfg.package];

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
          requires = ["nix-daemon.socket"];
          after = ["network-online.target" "nix-daemon.socket"];
          # ssh: the checks of remote builders run `nix store ping` here.
          path = [cfg.nixPackage pkgs.git] ++ lib.optional (cfg.remoteBuilders != []) pkgs.openssh ++ cfg.extraPath;
          environment = {
            # Builds go through the daemon (as this unprivileged user); Nix's
            # fetch and evaluation caches live in the cache directory.
            NIX_REMOTE = "daemon";
            XDG_CACHE_HOME = "/var/cache/${user}";
            HOME = stateDir;
          };
          serviceConfig =
            {
              # READY=1 once subscribed, or after 5 s of serving without NATS
              # (metrics up, worker started): /healthz and the nats_connected
              # metric say whether NATS is there. No Requires= on NATS either,
              # so a NATS outage never stops or restarts the builder.
              Type = "notify";
              ExecStart = "${lib.getExe cfg.package} builder --config ${configFile}";
              WatchdogSec = "60s";
              Restart = "on-failure";
              RestartSec = "5s";
              # SIGTERM to the builder alone: it stops its Nix process group
              # itself and reports the build's end; whatever is left gets
              # SIGKILL when TimeoutStopSec runs out: twice the builder's
              # shutdown budget (SHUTDOWN_BUDGET, 15 s), room for a loaded host.
              KillMode = "mixed";
              TimeoutStopSec = "${toString (2 * defaults.shutdown_budget_secs)}s";
              # The kernel's OOM killer passes over the builder (and what it
              # runs inherits this) but for the evaluators, which raise their
              # own score to the top: under memory pressure an evaluation is
              # lost and retried, never the builder or a build.
              OOMScoreAdjust = -500;
              User = user;
              Group = user;
              StateDirectory = user;
              StateDirectoryMode = "0750";
              CacheDirectory = user;
              # ProtectSystem=strict leaves only the state and cache directories
              # writable: GC roots or a state file elsewhere need their directory
              # (which must exist) opened.
              ReadWritePaths = writablePaths;
              LoadCredential =
                lib.optional (cfg.nkeyFile != null) "nkey:${cfg.nkeyFile}"
                ++ lib.optional (cfg.credentialsFile != null) "creds:${cfg.credentialsFile}";
            }
            // hardening;
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
