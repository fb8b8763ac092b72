# The least a NixOS configuration needs to evaluate as a whole machine (no hardware, no
# boot loader): shared by the flake's `checks.<system>.nixos-example` and
# tests/test_nixos_eval.py, which evaluate the module inside a real NixOS system.
{
  boot.loader.grub.enable = false;
  fileSystems."/".device = "/dev/disk/by-label/nixos";
  system.stateVersion = "24.05";
}
