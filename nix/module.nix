# NixOS module: services.tracehook.sign (the post-build-hook and its publisher) and
# services.tracehook.gate (the pre-substitution gate, a loopback binary-cache front).
#
# Used from the flake as `tracehook.nixosModules.default`, or imported directly as a path.
# The parts:
#   module/sign.nix       the hook, sign.toml, the unprivileged publisher and signing agent
#   module/gate.nix       the gate service, its policy (typed, checked, reloadable), nix.conf
#   module/exclusive.nix  gate.exclusive: nothing reaches the store around the gate
#   module/policy.nix     the policy schema (types, checks, TOML rendering)
#   module/lib.nix        shared option types, the TOML renderer, systemd hardening
# nix/tests/eval-module.nix evaluates it against stand-ins of the NixOS options it sets;
# tests/test_nixos_eval.py inside real NixOS evaluations (NIXPKGS_TREE, or the vendored
# tests/data/nixos-24.05-subset).
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.tracehook;
  rename =
    from: to:
    lib.mkRenamedOptionModule
      ([
        "services"
        "tracehook"
      ]
      ++ from
      )
      ([
        "services"
        "tracehook"
      ]
      ++ to
      );
in
{
  imports = [
    ./module/sign.nix
    ./module/gate.nix
    ./module/exclusive.nix
    # One name for a secret key file across the module, as nix-serve's `secretKeyFile`.
    (rename [ "gate" "signingKeyFile" ] [ "gate" "secretKeyFile" ])
    # One package for the hook, the publisher, the gate and the CLI.
    (rename [ "sign" "package" ] [ "package" ])
    (rename [ "gate" "package" ] [ "package" ])
  ];

  options.services.tracehook.package =
    lib.mkPackageOption { tracehook = pkgs.tracehook or (pkgs.callPackage ./package.nix { }); } "tracehook"
      {
        extraDescription = ''
          Without `pkgs.tracehook` (the flake's `overlays.default` adds it), the package is
          built from this repository's `nix/package.nix`. Whatever the package wraps, the
          hook, the services and the CLI find {option}`nix.package` (the daemon's Nix, or Lix)
          first on their PATH.
        '';
      };

  config = lib.mkIf (cfg.sign.enable || cfg.gate.enable) {
    environment.systemPackages = [ cfg.package ];
  };
}
