{
  description = "tracehook: signed, chained build traces for Nix, enforced inline";

  # The NixOS release the module is evaluated against (tests/test_nixos_eval.py); follow your
  # own with `inputs.tracehook.inputs.nixpkgs.follows = "nixpkgs"`.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      app = pkg: program: description: {
        type = "app";
        program = "${pkg}/bin/${program}";
        meta.description = description;
      };
    in
    {
      overlays.default = final: _prev: {
        tracehook = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        tracehook = pkgs.callPackage ./nix/package.nix { };
        default = tracehook;
      });

      apps = forAllSystems (
        pkgs:
        let
          pkg = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        in
        {
          default = app pkg "tracehook" "the tracehook CLI";
          tracehook = app pkg "tracehook" "the tracehook CLI";
          tracehook-gate = app pkg "tracehook-gate" "the pre-substitution gate";
          tracehook-post-build = app pkg "tracehook-post-build" "the post-build-hook";
        }
      );

      # The module builds the package from this repository unless `pkgs.tracehook` exists
      # (the overlay) or `services.tracehook.package` is set.
      nixosModules.default = ./nix/module.nix;
      nixosModules.tracehook = ./nix/module.nix;

      checks = forAllSystems (
        pkgs:
        let
          pkg = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          evaluated = import ./nix/tests/eval-module.nix { inherit lib pkgs; };
          system = pkgs.stdenv.hostPlatform.system;
          example = nixpkgs.lib.nixosSystem {
            modules = [
              self.nixosModules.default
              ./nix/tests/nixos-base.nix
              ./examples/nixos/configuration.nix
              {
                nixpkgs.hostPlatform = system;
                nixpkgs.overlays = [ self.overlays.default ];
              }
            ];
          };
          etc = example.config.environment.etc;
          unit = name: example.config.systemd.units.${name}.unit;
        in
        {
          package = pkg;
          # The module under lib.evalModules with stand-in declarations of the NixOS options
          # it sets; the evaluation fails (and with it this check) on any broken expectation.
          module-eval = pkgs.runCommand "tracehook-module-eval" {
            passAsFile = [ "result" ];
            result = builtins.toJSON evaluated;
          } ''cp "$resultPath" "$out"'';
          # The example configuration inside a real NixOS system: its nix.conf (which NixOS
          # has Nix itself check at build time), sign.toml, the policy (checked by
          # `tracehook policy check`) and both units.
          nixos-example = pkgs.linkFarm "tracehook-nixos-example" {
            "nix.conf" = etc."nix/nix.conf".source;
            "sign.toml" = etc."tracehook/sign.toml".source;
            "policy.toml" = etc."tracehook/policy.toml".source;
            "tracehook-gate.service" = unit "tracehook-gate.service";
            "tracehook-publish.service" = unit "tracehook-publish.service";
          };
          # The NixOS VM test (builder, cache, consumer); needs KVM.
          vm = import ./nix/tests/vm.nix {
            inherit pkgs;
            tracehook = pkg;
          };
        }
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
