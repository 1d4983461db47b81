# NixOS module: `rave serve` as a systemd service, held to the same budget as rave's profiles.
#
#   services.rave = {
#     enable = true;
#     profile = "SAFE";            # or "FULL_PIPE"
#     configFile = "/etc/rave/rave.toml";
#   };
#
# SAFE: 3 GiB and 2 CPUs for everything the server runs; FULL_PIPE: 12 GiB and 8 CPUs
# (docs/budgets.md). systemd enforces it with MemoryMax / CPUQuota on the whole unit, so
# pipelines (child `rave run`s and their jobs) cannot take more than the profile, and rave is
# told the same budget so it admits jobs within it instead of being OOM-killed as a unit.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.rave;
  profiles = {
    SAFE = { memory = "3G"; cpus = 2; };
    FULL_PIPE = { memory = "12G"; cpus = 8; };
  };
  budget = profiles.${cfg.profile};
in
{
  options.services.rave = {
    enable = lib.mkEnableOption "the rave CI server (rave serve)";
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      description = "The rave package.";
    };
    profile = lib.mkOption {
      type = lib.types.enum [ "SAFE" "FULL_PIPE" ];
      default = "SAFE";
      description = "Budget profile: SAFE (3 GiB, 2 CPUs) or FULL_PIPE (12 GiB, 8 CPUs).";
    };
    listen = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:8080";
      description = "Address rave serve listens on.";
    };
    configFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "rave.toml with projects, webhook secrets and API tokens (docs/serve.md).";
    };
    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the listen port in the firewall.";
    };
  };

  config = lib.mkIf cfg.enable {
    systemd.services.rave = {
      description = "rave CI server";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "docker.service" ];
      wants = [ "network-online.target" ];
      path = [ pkgs.bash pkgs.git pkgs.coreutils pkgs.nix ];
      environment = {
        RAVE_MEMORY = budget.memory;
        RAVE_CPUS = toString budget.cpus;
      };
      serviceConfig = {
        ExecStart = lib.concatStringsSep " " ([
          "${cfg.package}/bin/rave" "serve"
          "--listen" cfg.listen
          "--data-dir" "/var/lib/rave"
          "--log-format" "json"
        ] ++ lib.optionals (cfg.configFile != null) [ "--config" (toString cfg.configFile) ]);
        StateDirectory = "rave";
        WorkingDirectory = "/var/lib/rave";
        # The budget, enforced by the kernel for the whole unit.
        MemoryMax = budget.memory;
        MemorySwapMax = "0";
        CPUQuota = "${toString (budget.cpus * 100)}%";
        # rave makes per-job cgroups below its own: let it manage its subtree.
        Delegate = "memory cpu pids";
        Restart = "on-failure";
        # A crash-restart recovers (pipelines interrupted are failed or requeued).
        RestartSec = "2s";
        KillMode = "mixed";
        TimeoutStopSec = "30s";
      };
    };
    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [
      (lib.toInt (lib.last (lib.splitString ":" cfg.listen)))
    ];
  };
}
