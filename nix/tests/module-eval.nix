# nix/module.nix evaluated by nixpkgs' module system, beside the NixOS
# options it sets (declared as nixpkgs declares them, module-eval/nixos.nix)
# and a stand-in `pkgs` (module-eval/pkgs.nix). No nixpkgs, no building.
#
#   nix-instantiate --eval --strict --json --read-write-mode -A failures nix/tests/module-eval.nix
#
# gives {tests, failures, configs}: `failures` lists every check that did
# not hold (lib.runTests: name, expected, result), `configs` the settings each
# scenario's unit renders to TOML, for `homelab-deploy check-config`
# (scripts/check-module does both).
{
  # nixpkgs' lib: CI puts ../shared (with nixpkgs-lib) beside the repository.
  nixpkgsLib ? ../../../shared/nixpkgs-lib/lib,
}: let
  lib =
    if builtins.pathExists nixpkgsLib
    then import nixpkgsLib
    else throw "nix/tests/module-eval.nix: no nixpkgs lib at ${toString nixpkgsLib}; put the shared directory beside the repository (../shared/nixpkgs-lib) or pass --arg nixpkgsLib <path to lib>";

  standIns = import ./module-eval/pkgs.nix {inherit lib;};

  # The flake's outputs, with the stand-ins as its nixpkgs input.
  self =
    (import ../../flake.nix).outputs {
      inherit self;
      nixpkgs = {
        inherit lib;
        legacyPackages =
          lib.genAttrs ["x86_64-linux" "aarch64-linux"] (system:
            (import ./module-eval/pkgs.nix {inherit lib system;}).pkgs []);
      };
    }
    // {outPath = ../..;};

  defaults = import ../defaults.nix;
  user = "homelab-deploy-builder";
  builderUnit = "homelab-deploy-builder";

  # A system of the given modules, as NixOS would evaluate it, plus what the
  # checks need: the failed assertions, the stand-in pkgs, the settings with
  # nulls left out (what TOML gets).
  system = {
    modules,
    overlays ? [],
  }: let
    pkgs = standIns.pkgs overlays;
    inherit
      (lib.evalModules {
        modules =
          [
            ./module-eval/nixos.nix
            {
              _module.args = {
                inherit pkgs;
                inherit (standIns) utils;
              };
            }
          ]
          ++ modules;
      })
      config
      ;
    cfg = config.services.homelab-deploy.builder;
    settings = lib.filterAttrsRecursive (_: value: value != null) cfg.settings;
  in {
    inherit config cfg pkgs settings;
    failed = map (assertion: assertion.message) (lib.filter (assertion: !assertion.assertion) config.assertions);
    service = config.systemd.services.${builderUnit};
    unit = name: config.systemd.services.${name};
    # The file the unit's --config must name: the stand-in of
    # `runCommand … check-config` over `formats.toml.generate settings`.
    configFile = pkgs.runCommand "homelab-deploy-builder.toml" {
      nativeBuildInputs = [cfg.package];
      config = (pkgs.formats.toml {}).generate "homelab-deploy-builder-unchecked.toml" settings;
    } "";
  };

  # Whether evaluating (deeply) the given value of a system fails.
  rejects = value: !(builtins.tryEval (builtins.deepSeq value value)).success;

  exe = package: "${package}/bin/homelab-deploy";
  quoted = lib.concatMapStringsSep " " builtins.toJSON;

  base = {
    enable = true;
    settings = {
      nats.url = "nats://nats.home.2rjus.net:4222";
      repos.nixos-servers.url = "git+https://git.t-juice.club/torjus/nixos-servers.git";
    };
  };

  # README, "Deploying on NixOS": nix-cache02.
  readme = system {
    modules = [
      self.nixosModules.builder
      {
        services.homelab-deploy.builder = {
          enable = true;
          nkeyFile = "/run/secrets/homelab-deploy-builder-nkey";
          openFirewall = true;
          settings = {
            nats.url = "nats://nats.home.2rjus.net:4222";
            repos.nixos-servers = {
              url = "git+https://git.t-juice.club/torjus/nixos-servers.git";
              ref = "master";
              exclude = ["template"];
            };
            repos.nixos.url = "git+https://git.t-juice.club/torjus/nixos.git";
          };
          schedule = [
            {
              repo = "nixos-servers";
              onCalendar = "*-*-* *:30:00";
            }
            {
              repo = "nixos";
              onCalendar = "*-*-* *:30:00";
            }
          ];
          scheduleNkeyFile = "/run/secrets/homelab-deploy-scheduler-nkey";
          builderPublicKey = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
        };
      }
    ];
  };
  scheduled0 = "homelab-deploy-build-0-nixos-servers-all";
  scheduled1 = "homelab-deploy-build-1-nixos-all";

  minimal = system {
    modules = [
      ../module.nix
      {services.homelab-deploy.builder = base;}
    ];
  };

  # README, "Several builders": nix-cache01 beside nix-cache02, sharing
  # the repo's requests in one queue group.
  standby = system {
    modules = [
      ../module.nix
      {
        services.homelab-deploy.builder = lib.recursiveUpdate base {
          settings.nats.queue_group = "homelab-builders";
          settings.builder.name = "nix-cache01";
        };
      }
    ];
  };

  # Two remote builders, hosts built two at once.
  remote = system {
    modules = [
      ../module.nix
      {
        services.homelab-deploy.builder =
          lib.recursiveUpdate base {settings.builder.parallel_hosts = 2;}
          // {
            remoteBuilders = [
              {
                uri = "ssh-ng://nix@builder1.lab";
                sshKey = "/etc/nix/builder_ed25519";
                maxJobs = 8;
                speedFactor = 2;
                features = ["big-parallel"];
              }
              {
                uri = "ssh://arm.lab";
                systems = ["aarch64-linux"];
              }
            ];
          };
      }
    ];
  };

  tlsUnit = "homelab-deploy-build-0-nixos-servers-ns1";
  tls = system {
    modules = [
      ../module.nix
      {
        services.homelab-deploy.builder =
          lib.recursiveUpdate base {
            credentialsFile = "/run/secrets/builder.creds";
            settings = {
              nats.url = ["tls://nats1.home.2rjus.net:4222" "tls://nats2.home.2rjus.net:4222"];
              nats.tls_ca_file = "/etc/ssl/homelab-ca.pem";
              builder.gc_roots_dir = null;
              builder.state_file = null;
              builder.journal_file = null;
            };
          }
          // {
            scheduleCredentialsFile = "/run/secrets/scheduler.creds";
            schedule = [
              {
                repo = "nixos-servers";
                target = "ns1";
                ref = "flake-update/2026-11-28";
                onCalendar = "Mon *-*-* 04:00:00";
              }
            ];
          };
      }
    ];
  };

  both = system {
    modules = [
      self.nixosModules.builder
      self.nixosModules.default
      ../module.nix
      {services.homelab-deploy.builder = base;}
    ];
  };

  # The overlay's package, then a later overlay replacing it (as a host's
  # own patches would): the module takes whatever pkgs.homelab-deploy is.
  patched = {
    type = "derivation";
    name = "homelab-deploy-0.1.0-patched";
    outPath = "/nix/store/00000000000000000000000000000000-homelab-deploy-0.1.0-patched";
    meta.mainProgram = "homelab-deploy";
  };
  overlayOnly = system {
    overlays = [self.overlays.default];
    modules = [
      self.nixosModules.default
      {services.homelab-deploy.builder = base;}
    ];
  };
  overlayPatched = system {
    overlays = [self.overlays.default (_: _: {homelab-deploy = patched;})];
    modules = [
      self.nixosModules.default
      {services.homelab-deploy.builder = base;}
    ];
  };

  # nix.settings.allowed-users restricted to a group the builder is in.
  groupAllowed = system {
    modules = [
      ../module.nix
      {
        services.homelab-deploy.builder = base;
        nix.settings.allowed-users = ["@builders"];
        users.groups.builders.members = [user];
      }
    ];
  };

  withSchedule = entry:
    system {
      modules = [
        ../module.nix
        {
          services.homelab-deploy.builder =
            base
            // {
              schedule = [({onCalendar = "hourly";} // entry)];
            };
        }
      ];
    };
  scheduledUnits = s: builtins.attrNames s.config.systemd.services;

  serviceChecks = name: s: let
    sc = s.service.serviceConfig;
  in {
    "test ${name}: no failed assertions" = {
      expr = s.failed;
      expected = [];
    };
    "test ${name}: ExecStart runs the package's builder with the checked config" = {
      expr = sc.ExecStart;
      expected = "${exe s.cfg.package} builder --config ${s.configFile}";
    };
    # Ready means serving, NATS or not: nothing may stop a builder that
    # waits for NATS (no start timeout shorter than systemd's default, no
    # dependency on a NATS unit).
    "test ${name}: notify, watchdog, restart, no NATS dependency" = {
      expr = {
        inherit (sc) Type WatchdogSec Restart RestartSec;
        TimeoutStartSec = sc.TimeoutStartSec or null;
        natsDependencies = lib.filter (lib.hasInfix "nats") (s.service.requires ++ s.service.bindsTo ++ s.service.partOf ++ s.service.requisite or []);
      };
      expected = {
        Type = "notify";
        WatchdogSec = "60s";
        Restart = "on-failure";
        RestartSec = "5s";
        TimeoutStartSec = null;
        natsDependencies = [];
      };
    };
    "test ${name}: stops the builder first, the rest after TimeoutStopSec" = {
      expr = {
        inherit (sc) KillMode;
        # Past the builder's own shutdown budget.
        TimeoutStopSec = let
          seconds = builtins.match "([0-9]+)s" sc.TimeoutStopSec;
        in
          seconds != null && lib.toInt (lib.head seconds) > defaults.shutdown_budget_secs;
      };
      expected = {
        KillMode = "mixed";
        TimeoutStopSec = true;
      };
    };
    "test ${name}: the kernel's OOM killer passes over the builder" = {
      expr = sc.OOMScoreAdjust < 0;
      expected = true;
    };
    "test ${name}: needs the Nix daemon's socket" = {
      expr = {
        requires = lib.elem "nix-daemon.socket" s.service.requires;
        after = lib.elem "nix-daemon.socket" s.service.after;
        inherit (s.service.environment) NIX_REMOTE;
      };
      expected = {
        requires = true;
        after = true;
        NIX_REMOTE = "daemon";
      };
    };
    "test ${name}: runs as its own unprivileged user" = {
      expr = {
        inherit (sc) User Group StateDirectory CacheDirectory UMask;
        trusted = lib.elem user s.config.nix.settings.trusted-users;
        user = {inherit (s.config.users.users.${user}) isSystemUser group home;};
      };
      expected = {
        User = user;
        Group = user;
        StateDirectory = user;
        CacheDirectory = user;
        UMask = "0077";
        trusted = false;
        user = {
          isSystemUser = true;
          group = user;
          home = "/var/lib/${user}";
        };
      };
    };
    "test ${name}: hardening" = {
      expr = {
        inherit
          (sc)
          ProtectSystem
          ProtectHome
          PrivateTmp
          PrivateDevices
          NoNewPrivileges
          CapabilityBoundingSet
          AmbientCapabilities
          RestrictAddressFamilies
          SystemCallFilter
          SystemCallErrorNumber
          SystemCallArchitectures
          ProtectKernelTunables
          ProtectKernelModules
          ProtectKernelLogs
          ProtectControlGroups
          ProtectClock
          ProtectHostname
          ProtectProc
          RestrictNamespaces
          RestrictRealtime
          RestrictSUIDSGID
          LockPersonality
          RemoveIPC
          ;
      };
      expected = {
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
    };
    "test ${name}: may use the Nix daemon, whatever allowed-users says" = {
      expr = s.config.nix.settings.extra-allowed-users;
      expected = [user];
    };
    "test ${name}: the CLI is on the system's PATH" = {
      expr = lib.elem s.cfg.package s.config.environment.systemPackages;
      expected = true;
    };
    "test ${name}: PATH has the Nix and git" = {
      expr = s.service.path;
      expected = [s.config.nix.package s.pkgs.git];
    };
  };

  scheduleChecks = name: s: unit: let
    service = s.unit unit;
    sc = service.serviceConfig;
  in {
    "test ${name}: ${unit} is a throwaway-user oneshot left alone by switches" = {
      expr = {
        inherit (sc) Type DynamicUser ProtectSystem SystemCallFilter SystemCallErrorNumber;
        inherit (service) restartIfChanged;
        after = lib.elem "${builderUnit}.service" service.after;
      };
      expected = {
        Type = "oneshot";
        DynamicUser = true;
        ProtectSystem = "strict";
        SystemCallFilter = ["@system-service" "~@privileged"];
        SystemCallErrorNumber = "EPERM";
        restartIfChanged = false;
        after = true;
      };
    };
    # One sandbox for both (module.nix: hardening): every setting of the
    # builder's unit but the few saying what each unit is, and what the
    # builder may write, is on the scheduled build's with the same value,
    # and the scheduled build has nothing else.
    "test ${name}: ${unit} is sandboxed as the builder is" = let
      builder = removeAttrs s.service.serviceConfig [
        "Type"
        "ExecStart"
        "WatchdogSec"
        "Restart"
        "RestartSec"
        "KillMode"
        "TimeoutStopSec"
        "OOMScoreAdjust"
        "User"
        "Group"
        "StateDirectory"
        "StateDirectoryMode"
        "CacheDirectory"
        "ReadWritePaths"
        "LoadCredential"
      ];
      scheduled = removeAttrs sc ["Type" "ExecStart" "DynamicUser" "LoadCredential"];
      same = key: builder ? ${key} && scheduled ? ${key} && builder.${key} == scheduled.${key};
      unset = "(unset)";
    in {
      expr = map (key: {
        inherit key;
        builder = builder.${key} or unset;
        scheduled = scheduled.${key} or unset;
      }) (lib.filter (key: !same key) (lib.unique (lib.attrNames builder ++ lib.attrNames scheduled)));
      expected = [];
    };
    "test ${name}: ${unit} has a persistent timer" = {
      expr = {
        inherit (s.config.systemd.timers.${unit}) wantedBy;
        inherit (s.config.systemd.timers.${unit}.timerConfig) Persistent;
      };
      expected = {
        wantedBy = ["timers.target"];
        Persistent = true;
      };
    };
  };

  # name → {expr, expected}.
  tests =
    serviceChecks "readme" readme
    // serviceChecks "minimal" minimal
    // serviceChecks "standby" standby
    // serviceChecks "tls" tls
    // serviceChecks "overlay" overlayOnly
    // scheduleChecks "readme" readme scheduled0
    // scheduleChecks "readme" readme scheduled1
    // scheduleChecks "tls" tls tlsUnit
    // {
      # README's nix-cache02.
      testReadmeSeedAsCredential = {
        expr = {
          inherit (readme.service.serviceConfig) LoadCredential;
          inherit (readme.settings.nats) nkey_seed_file;
        };
        expected = {
          LoadCredential = ["nkey:/run/secrets/homelab-deploy-builder-nkey"];
          nkey_seed_file = "/run/credentials/homelab-deploy-builder.service/nkey";
        };
      };
      testReadmeRendersSettingsWithDefaults = {
        expr = {
          inherit (readme.settings) metrics builder;
          inherit (readme.settings.repos) nixos-servers;
        };
        # nix/defaults.nix, which tests/module_defaults.rs holds equal to
        # the binary's defaults.
        expected = {
          inherit (defaults.settings) metrics builder;
          nixos-servers = {
            url = "git+https://git.t-juice.club/torjus/nixos-servers.git";
            ref = "master";
            exclude = ["template"];
          };
        };
      };
      testStandbySharesTheQueueGroupUnderItsOwnName = {
        expr = {
          inherit (standby.settings.nats) queue_group;
          inherit (standby.settings.builder) name;
          minimalHasNeither = minimal.settings.nats ? queue_group || minimal.settings.builder ? name;
        };
        expected = {
          queue_group = "homelab-builders";
          name = "nix-cache01";
          minimalHasNeither = false;
        };
      };
      testReadmeRendersTheWebSettings = {
        expr = readme.settings.web;
        expected = defaults.settings.web;
      };
      testReadmeOpensTheMetricsPort = {
        expr = readme.config.networking.firewall.allowedTCPPorts;
        expected = [9973];
      };
      testReadmeScheduledBuilds = {
        expr = lib.mapAttrs (_: service: {
          inherit (service.serviceConfig) ExecStart LoadCredential;
          inherit (service.environment) HOMELAB_DEPLOY_NATS_URL HOMELAB_DEPLOY_NKEY_FILE HOMELAB_DEPLOY_BUILDER_KEY;
          tls = service.environment ? HOMELAB_DEPLOY_TLS_CA_FILE;
        }) (lib.getAttrs [scheduled0 scheduled1] readme.config.systemd.services);
        expected = {
          ${scheduled0} = {
            ExecStart = quoted [(exe readme.cfg.package) "build" "nixos-servers" "--all" "--wait-for-builder" "10m"];
            LoadCredential = ["nkey:/run/secrets/homelab-deploy-scheduler-nkey"];
            HOMELAB_DEPLOY_NATS_URL = "nats://nats.home.2rjus.net:4222";
            HOMELAB_DEPLOY_NKEY_FILE = "/run/credentials/${scheduled0}.service/nkey";
            HOMELAB_DEPLOY_BUILDER_KEY = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
            tls = false;
          };
          ${scheduled1} = {
            ExecStart = quoted [(exe readme.cfg.package) "build" "nixos" "--all" "--wait-for-builder" "10m"];
            LoadCredential = ["nkey:/run/secrets/homelab-deploy-scheduler-nkey"];
            HOMELAB_DEPLOY_NATS_URL = "nats://nats.home.2rjus.net:4222";
            HOMELAB_DEPLOY_NKEY_FILE = "/run/credentials/${scheduled1}.service/nkey";
            HOMELAB_DEPLOY_BUILDER_KEY = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";
            tls = false;
          };
        };
      };
      testReadmeTimers = {
        expr = lib.mapAttrs (_: timer: timer.timerConfig.OnCalendar) readme.config.systemd.timers;
        expected = {
          ${scheduled0} = "*-*-* *:30:00";
          ${scheduled1} = "*-*-* *:30:00";
        };
      };
      testReadmeUnitNamesAreValid = {
        expr = lib.filter (name: builtins.match "[a-zA-Z0-9@%:_.\\-]+" name == null) (scheduledUnits readme);
        expected = [];
      };
      # The flake's module, without the overlay, builds nix/package.nix.
      testReadmePackageIsTheRepositorysOwn = {
        expr = {inherit (readme.cfg.package) pname version;};
        expected = {
          pname = "homelab-deploy";
          version = (lib.importTOML ../../Cargo.toml).package.version;
        };
      };

      # Nothing but a NATS URL and a repo.
      testMinimalHasNoCredentialsOrTimers = {
        expr = {
          inherit (minimal.service.serviceConfig) LoadCredential;
          nats = minimal.settings.nats;
          timers = minimal.config.systemd.timers;
          firewall = minimal.config.networking.firewall.allowedTCPPorts;
        };
        expected = {
          LoadCredential = [];
          nats.url = "nats://nats.home.2rjus.net:4222";
          timers = {};
          firewall = [];
        };
      };
      testMinimalPackageDefault = {
        expr = minimal.cfg.package.pname;
        expected = "homelab-deploy";
      };

      # tls:// with a private CA and .creds files, for the builder and the
      # scheduled build.
      testTlsBuilderCredentialsAndCa = {
        expr = {
          inherit (tls.service.serviceConfig) LoadCredential;
          inherit (tls.settings) nats;
        };
        expected = {
          LoadCredential = ["creds:/run/secrets/builder.creds"];
          nats = {
            url = ["tls://nats1.home.2rjus.net:4222" "tls://nats2.home.2rjus.net:4222"];
            credentials_file = "/run/credentials/homelab-deploy-builder.service/creds";
            tls_ca_file = "/etc/ssl/homelab-ca.pem";
          };
        };
      };
      testTlsScheduledBuildGetsCaAndCreds = {
        expr = let
          service = tls.unit tlsUnit;
        in {
          inherit (service.serviceConfig) ExecStart LoadCredential;
          inherit (service.environment) HOMELAB_DEPLOY_NATS_URL HOMELAB_DEPLOY_CREDS_FILE HOMELAB_DEPLOY_TLS_CA_FILE;
          nkey = service.environment ? HOMELAB_DEPLOY_NKEY_FILE;
          builderKey = service.environment ? HOMELAB_DEPLOY_BUILDER_KEY;
        };
        expected = {
          ExecStart = quoted [(exe tls.cfg.package) "build" "nixos-servers" "ns1" "--ref" "flake-update/2026-11-28" "--wait-for-builder" "10m"];
          LoadCredential = ["creds:/run/secrets/scheduler.creds" "tls-ca:/etc/ssl/homelab-ca.pem"];
          HOMELAB_DEPLOY_NATS_URL = "tls://nats1.home.2rjus.net:4222,tls://nats2.home.2rjus.net:4222";
          HOMELAB_DEPLOY_CREDS_FILE = "/run/credentials/${tlsUnit}.service/creds";
          HOMELAB_DEPLOY_TLS_CA_FILE = "/run/credentials/${tlsUnit}.service/tls-ca";
          nkey = false;
          builderKey = false;
        };
      };
      testTlsOptionalPathsCanBeTurnedOff = {
        expr = tls.settings.builder;
        expected = removeAttrs defaults.settings.builder ["gc_roots_dir" "state_file" "journal_file"];
      };
      testWritablePathsOutsideTheStateDirectory = {
        expr = {
          readme = readme.service.serviceConfig.ReadWritePaths;
          elsewhere =
            (system {
              modules = [
                ../module.nix
                {
                  services.homelab-deploy.builder = lib.recursiveUpdate base {
                    settings.builder = {
                      gc_roots_dir = "/srv/gcroots";
                      state_file = "/srv/gcroots/state.json";
                    };
                  };
                }
              ];
            })
            .service
            .serviceConfig
            .ReadWritePaths;
        };
        expected = {
          readme = [];
          elsewhere = ["/srv/gcroots"];
        };
      };
      testTlsTimer = {
        expr = tls.config.systemd.timers.${tlsUnit}.timerConfig.OnCalendar;
        expected = "Mon *-*-* 04:00:00";
      };
      testClientCertificateWarnsAboutScheduledBuilds = {
        expr =
          lib.length
          (system {
            modules = [
              ../module.nix
              {
                services.homelab-deploy.builder = lib.recursiveUpdate base {
                  settings.nats = {
                    tls_cert_file = "/etc/ssl/builder.pem";
                    tls_key_file = "/etc/ssl/builder.key";
                  };
                  schedule = [
                    {
                      repo = "nixos-servers";
                      onCalendar = "hourly";
                    }
                  ];
                };
              }
            ];
          })
          .config
          .warnings;
        expected = 1;
      };

      # nixosModules.builder, nixosModules.default and the file: one module.
      testBothModulesImportOnce = {
        expr = {
          inherit (both) failed;
          services = lib.attrNames both.config.systemd.services;
          package = both.cfg.package.pname;
        };
        expected = {
          failed = [];
          services = [builderUnit];
          package = "homelab-deploy";
        };
      };

      # The overlay: its package is the one nix/package.nix makes (with
      # the whole source the tests need), and the module takes
      # pkgs.homelab-deploy, even when a later overlay replaces it.
      testOverlayPackage = {
        expr = {
          same = overlayOnly.cfg.package == overlayOnly.pkgs.homelab-deploy;
          inherit (overlayOnly.cfg.package) pname;
          inherit (overlayOnly.cfg.package.meta) mainProgram;
          proptestRegressions = builtins.pathExists "${overlayOnly.cfg.package.src}/proptest-regressions";
          configExample = builtins.pathExists "${overlayOnly.cfg.package.src}/config.example.toml";
        };
        expected = {
          same = true;
          pname = "homelab-deploy";
          mainProgram = "homelab-deploy";
          proptestRegressions = true;
          configExample = true;
        };
      };
      testOverlayReplacedPackageIsUsed = {
        expr = {
          ExecStart = lib.head (lib.splitString " " overlayPatched.service.serviceConfig.ExecStart);
          onPath = lib.elem patched overlayPatched.config.environment.systemPackages;
        };
        expected = {
          ExecStart = exe patched;
          onPath = true;
        };
      };

      testRemoteBuildersRenderToBuildMachines = {
        expr = {
          inherit (remote) failed;
          inherit (remote.config.nix) distributedBuilds buildMachines;
          substitutes = remote.config.nix.settings.builders-use-substitutes;
          parallel = remote.settings.builder.parallel_hosts;
          path = remote.service.path;
        };
        expected = {
          failed = [];
          path = [remote.config.nix.package remote.pkgs.git remote.pkgs.openssh];
          distributedBuilds = true;
          substitutes = true;
          parallel = 2;
          buildMachines = [
            {
              hostName = "builder1.lab";
              protocol = "ssh-ng";
              sshUser = "nix";
              system = null;
              systems = ["x86_64-linux"];
              sshKey = "/etc/nix/builder_ed25519";
              publicHostKey = null;
              maxJobs = 8;
              speedFactor = 2;
              supportedFeatures = ["big-parallel"];
              mandatoryFeatures = [];
            }
            {
              hostName = "arm.lab";
              protocol = "ssh";
              sshUser = null;
              system = null;
              systems = ["aarch64-linux"];
              sshKey = null;
              publicHostKey = null;
              maxJobs = 1;
              speedFactor = 1;
              supportedFeatures = [];
              mandatoryFeatures = [];
            }
          ];
        };
      };
      testNoRemoteBuildersNoDistributedBuilds = {
        expr = {
          inherit (minimal.config.nix) distributedBuilds buildMachines;
          substitutes = minimal.config.nix.settings ? builders-use-substitutes;
        };
        expected = {
          distributedBuilds = false;
          buildMachines = [];
          substitutes = false;
        };
      };
      testRemoteBuilderUriIsChecked = {
        expr =
          rejects
          (system {
            modules = [
              ../module.nix
              {services.homelab-deploy.builder = base // {remoteBuilders = [{uri = "builder1.lab; rm -rf /";}];};}
            ];
          })
          .config
          .nix
          .buildMachines;
        expected = true;
      };

      # allowed-users naming a group the builder user is in: no assertion
      # second-guesses it, and the builder is allowed in its own right.
      testAllowedThroughGroup = {
        expr = {
          inherit (groupAllowed) failed;
          inherit (groupAllowed.config.nix.settings) allowed-users extra-allowed-users;
        };
        expected = {
          failed = [];
          allowed-users = ["@builders"];
          extra-allowed-users = [user];
        };
      };

      # Scheduled builds the protocol would reject are rejected when the
      # system is evaluated.
      testScheduleRejectsBadNames = {
        expr = map (entry: rejects (withSchedule entry).config.systemd) [
          # The same system with a valid entry evaluates.
          {
            repo = "nixos-servers";
            target = "ns1";
            ref = "release/v1.2";
          }
          {repo = "nixos servers";}
          {repo = "-nixos-servers";}
          {repo = "";}
          {
            repo = "nixos-servers";
            target = "ns1/../x";
          }
          {
            repo = "nixos-servers";
            ref = "master..evil";
          }
          {
            repo = "nixos-servers";
            ref = "-b";
          }
          {
            repo = "nixos-servers";
            onCalendar = "hourly\nExecStart=/bin/sh";
          }
        ];
        expected = [false true true true true true true true];
      };
      testScheduleAcceptsGoodNames = {
        expr = scheduledUnits (withSchedule {
          repo = "nixos-servers";
          target = "ns_1-a";
          ref = "release/v1.2";
        });
        expected = ["homelab-deploy-build-0-nixos-servers-ns_1-a" builderUnit];
      };
      testScheduleRepoMustBeConfigured = {
        expr = (withSchedule {repo = "nixos";}).failed;
        expected = ["services.homelab-deploy.builder.schedule: repo \"nixos\" is not in settings.repos (nixos-servers)."];
      };
      testNkeyAndCredsExclusive = {
        expr =
          lib.length
          (system {
            modules = [
              ../module.nix
              {
                services.homelab-deploy.builder =
                  base
                  // {
                    nkeyFile = "/run/secrets/a";
                    credentialsFile = "/run/secrets/b";
                    scheduleNkeyFile = "/run/secrets/c";
                    scheduleCredentialsFile = "/run/secrets/d";
                  };
              }
            ];
          })
          .failed;
        expected = 2;
      };
    };
in {
  # Each check with whether it holds, to evaluate one at a time.
  tests = lib.mapAttrs (_: test: test // {passes = test.expr == test.expected;}) tests;
  names = lib.attrNames tests;

  # A check that throws fails alone (scripts/check-module evaluates the
  # checks one at a time when another error stops them all).
  failures = lib.runTests (lib.mapAttrs (_: test: let
    evaluated = builtins.tryEval (builtins.deepSeq test test);
  in
    if evaluated.success
    then test
    else {
      expr = "evaluation failed";
      expected = "a value";
    })
  tests);

  # Each scenario's settings, for check-config.
  configs = lib.mapAttrs (_: s: s.settings) {
    inherit readme minimal tls both remote standby;
    overlay = overlayOnly;
    group-allowed = groupAllowed;
  };
}
