# A system flake that uses tracehook: its NixOS module and, through its overlay, its package.
#   nixos-rebuild switch --flake .#builder
{
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    tracehook = {
      # This repository, two levels up; from anywhere else, its git URL
      # (e.g. "git+https://git.example.org/tracehook").
      url = "path:../..";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    { nixpkgs, tracehook, ... }:
    {
      nixosConfigurations.builder = nixpkgs.lib.nixosSystem {
        system = "x86_64-linux";
        modules = [
          tracehook.nixosModules.default
          # pkgs.tracehook: the CLI, and the package the module runs.
          { nixpkgs.overlays = [ tracehook.overlays.default ]; }
          ../nixos/configuration.nix
          # The machine itself; in a real flake, ./hardware-configuration.nix.
          {
            boot.loader.grub.device = "/dev/sda";
            fileSystems."/".device = "/dev/disk/by-label/nixos";
            system.stateVersion = "25.05";
          }
        ];
      };
    };
}
