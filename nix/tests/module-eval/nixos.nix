# The NixOS options nix/module.nix sets or reads, declared with the types
# nixpkgs gives them (nixos/lib/systemd-unit-options.nix,
# nixos/modules/system/boot/systemd.nix, nixos/modules/config/nix.nix,
# nixos/modules/config/nix-remote-build.nix,
# nixos/modules/config/users-groups.nix, nixos/modules/misc/assertions.nix,
# nixos/modules/services/networking/firewall.nix), so a definition NixOS
# would reject is rejected here too. Only what the module touches is here.
{
  config,
  lib,
  pkgs,
  ...
}: let
  inherit (lib) mkOption types;

  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  # A [Service]/[Timer] value: repeatable settings are lists and concatenate;
  # anything else must be defined once (or identically).
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs: let
      defs' = lib.filterOverrides defs;
    in
      if lib.any (def: lib.isList def.value) defs'
      then lib.concatMap (def: lib.toList def.value) defs'
      else lib.mergeEqualOption loc defs';
  };

  oneOfValues = key: allowed: section:
    lib.optional (section ? ${key} && !lib.elem section.${key} allowed)
    "${key} is ${builtins.toJSON section.${key}}, not one of ${builtins.toJSON allowed}";

  checkService = section: let
    errors =
      oneOfValues "Type" ["exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle"] section
      ++ oneOfValues "Restart" ["no" "on-success" "on-failure" "on-abnormal" "on-abort" "on-watchdog" "always"] section;
  in
    errors == [] || builtins.trace (lib.concatStringsSep "\n" errors) false;

  listOfUnits = mkOption {
    type = types.listOf unitNameType;
    default = [];
  };

  commonUnitOptions = {
    enable = mkOption {
      type = types.bool;
      default = true;
    };
    description = mkOption {
      type = types.singleLineStr;
      default = "";
    };
    wantedBy = listOfUnits;
    requiredBy = listOfUnits;
    requires = listOfUnits;
    wants = listOfUnits;
    after = listOfUnits;
    before = listOfUnits;
    bindsTo = listOfUnits;
    partOf = listOfUnits;
    conflicts = listOfUnits;
    unitConfig = mkOption {
      type = types.attrsOf unitOption;
      default = {};
    };
    restartTriggers = mkOption {
      type = types.listOf types.unspecified;
      default = [];
    };
  };

  serviceOptions = {
    options =
      commonUnitOptions
      // {
        environment = mkOption {
          type = types.attrsOf (types.nullOr (types.oneOf [types.str types.path types.package]));
          default = {};
        };
        path = mkOption {
          type = types.listOf (types.oneOf [types.package types.str]);
          default = [];
        };
        serviceConfig = mkOption {
          type = types.addCheck (types.attrsOf unitOption) checkService;
          default = {};
        };
        script = mkOption {
          type = types.lines;
          default = "";
        };
        restartIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        stopIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        startAt = mkOption {
          type = types.either types.str (types.listOf types.str);
          default = [];
        };
      };
  };

  timerOptions = {
    options =
      commonUnitOptions
      // {
        timerConfig = mkOption {
          type = types.attrsOf unitOption;
          default = {};
        };
      };
  };

  userOptions = {name, ...}: {
    options = {
      name = mkOption {
        type = types.passwdEntry types.str;
        default = name;
      };
      description = mkOption {
        type = types.passwdEntry types.str;
        default = "";
      };
      uid = mkOption {
        type = types.nullOr types.int;
        default = null;
      };
      isSystemUser = mkOption {
        type = types.bool;
        default = false;
      };
      isNormalUser = mkOption {
        type = types.bool;
        default = false;
      };
      group = mkOption {
        type = types.str;
        default = "";
      };
      extraGroups = mkOption {
        type = types.listOf types.str;
        default = [];
      };
      home = mkOption {
        type = types.passwdEntry types.path;
        default = "/var/empty";
      };
      createHome = mkOption {
        type = types.bool;
        default = false;
      };
    };
  };

  groupOptions = {name, ...}: {
    options = {
      name = mkOption {
        type = types.passwdEntry types.str;
        default = name;
      };
      gid = mkOption {
        type = types.nullOr types.int;
        default = null;
      };
      members = mkOption {
        type = types.listOf (types.passwdEntry types.str);
        default = [];
      };
    };
  };

  # nix.conf values (nix.nix's semanticConfType).
  confAtom =
    types.nullOr (types.oneOf [types.bool types.int types.float types.str types.path types.package])
    // {description = "Nix config atom (null, bool, int, float, str, path or package)";};
in {
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      internal = true;
      default = [];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      internal = true;
      default = [];
    };

    systemd.services = mkOption {
      type = types.attrsOf (types.submodule serviceOptions);
      default = {};
    };
    systemd.timers = mkOption {
      type = types.attrsOf (types.submodule timerOptions);
      default = {};
    };

    users.users = mkOption {
      type = types.attrsOf (types.submodule userOptions);
      default = {};
    };
    users.groups = mkOption {
      type = types.attrsOf (types.submodule groupOptions);
      default = {};
    };

    nix.package = mkOption {
      type = types.package;
      default = pkgs.nix;
      defaultText = lib.literalExpression "pkgs.nix";
    };
    nix.distributedBuilds = mkOption {
      type = types.bool;
      default = false;
    };
    nix.buildMachines = mkOption {
      default = [];
      type = types.listOf (types.submodule {
        options = {
          hostName = mkOption {type = types.str;};
          protocol = mkOption {
            type = types.enum [null "ssh" "ssh-ng"];
            default = "ssh";
          };
          system = mkOption {
            type = types.nullOr types.str;
            default = null;
          };
          systems = mkOption {
            type = types.listOf types.str;
            default = [];
          };
          sshUser = mkOption {
            type = types.nullOr types.str;
            default = null;
          };
          sshKey = mkOption {
            type = types.nullOr types.str;
            default = null;
          };
          maxJobs = mkOption {
            type = types.int;
            default = 1;
          };
          speedFactor = mkOption {
            type = types.int;
            default = 1;
          };
          mandatoryFeatures = mkOption {
            type = types.listOf types.str;
            default = [];
          };
          supportedFeatures = mkOption {
            type = types.listOf types.str;
            default = [];
          };
          publicHostKey = mkOption {
            type = types.nullOr types.str;
            default = null;
          };
        };
      });
    };
    nix.settings = mkOption {
      default = {};
      type = types.submodule {
        freeformType = types.attrsOf (types.either confAtom (types.listOf confAtom));
        options = {
          trusted-users = mkOption {
            type = types.listOf types.str;
            default = ["root"];
          };
          allowed-users = mkOption {
            type = types.listOf types.str;
            default = ["*"];
          };
        };
      };
    };

    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [];
    };

    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [];
    };
  };

  # users-groups.nix's checks on every user.
  config.assertions = lib.concatLists (lib.mapAttrsToList (name: user: [
      {
        assertion = user.isSystemUser != user.isNormalUser;
        message = "Exactly one of users.users.${name}.isSystemUser and users.users.${name}.isNormalUser must be set.";
      }
      {
        assertion = user.group != "";
        message = "users.users.${name}.group is unset.";
      }
      {
        assertion = user.group == "" || config.users.groups ? ${user.group};
        message = "users.users.${name}.group is \"${user.group}\", which is not in users.groups.";
      }
    ])
    config.users.users);
}
