# rave with Nix, where nixpkgs is reachable:
#
#   nix build ./nix#rave          the binary
#   nix build ./nix#vm            a NixOS VM running `rave serve` (run: ./result/bin/run-*-vm)
#   nix flake check ./nix         evaluates the module in a NixOS system
#
# In a NixOS configuration: `imports = [ rave.nixosModules.default ]; services.rave.enable = true;`
{
  description = "rave: self-hosted CI runner";
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
    in
    {
      packages.${system} = {
        rave = pkgs.callPackage ./package.nix { };
        default = self.packages.${system}.rave;
        vm = (nixpkgs.lib.nixosSystem {
          inherit system;
          modules = [ ./vm.nix ];
        }).config.system.build.vm;
      };
      nixosModules.default = ./module.nix;
    };
}
