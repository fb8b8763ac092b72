{
  description = "tracehook: signed, chained build traces for Nix, enforced inline";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

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
      # (the overlay) or `services.tracehook.{sign,gate}.package` is set.
      nixosModules.default = ./nix/module.nix;
      nixosModules.tracehook = ./nix/module.nix;

      checks = forAllSystems (
        pkgs:
        let
          pkg = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
          evaluated = import ./nix/tests/eval-module.nix { inherit lib pkgs; };
        in
        {
          package = pkg;
          # The module under lib.evalModules with stand-in declarations of the NixOS options
          # it sets; the evaluation fails (and with it this check) on any broken expectation.
          module-eval = pkgs.runCommand "tracehook-module-eval" {
            passAsFile = [ "result" ];
            result = builtins.toJSON evaluated;
          } ''cp "$resultPath" "$out"'';
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
