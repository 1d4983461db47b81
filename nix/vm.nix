# A NixOS VM image running `rave serve` through the module, for `nix build .#vm` (a qcow2
# disk with nixos-generators-style `system.build.vm`, or the VM runner script).
{ pkgs, lib, ... }:
{
  imports = [ ./module.nix ];
  services.rave = {
    enable = true;
    profile = "SAFE";
    listen = "0.0.0.0:8080";
    openFirewall = true;
  };
  # Only the service's port: what `rave image test` checks of its own images.
  networking.firewall.enable = true;
  services.openssh.enable = false;
  virtualisation.vmVariant.virtualisation = {
    memorySize = 3072;
    cores = 2;
    forwardPorts = [{ from = "host"; host.port = 8080; guest.port = 8080; }];
  };
  system.stateVersion = "24.05";
}
