# The module inside real NixOS evaluations (nixos/lib/eval-config.nix of a nixpkgs tree),
# for tests/nixoseval.py (test_nixos_eval.py, test_nixos_whole.py): it returns what a NixOS
# system would contain, as data, and the Python side asserts on it (nothing is built).
#
#   let h = import nix/tests/nixos-eval.nix { nixpkgs = /path/to/nixpkgs; }; in
#   h.facts (h.eval [ ./my-configuration.nix ])
{
  nixpkgs,
  system ? "x86_64-linux",
}:

let
  eval =
    modules:
    import (nixpkgs + "/nixos/lib/eval-config.nix") {
      inherit system;
      modules = [
        ../module.nix
        ./nixos-base.nix
      ]
      ++ modules;
    };

  failedAssertions = c: map (a: a.message) (builtins.filter (a: !a.assertion) c.assertions);

  # Assertions and warnings only: cheap, and what a configuration that must fail shows.
  brief = e: {
    failed = failedAssertions e.config;
    inherit (e.config) warnings;
  };

  text = f: if f == null then null else f.text;
  etc = c: name: if c.environment.etc ? ${name} then c.environment.etc.${name}.source else null;
  unit = c: name: if c.systemd.units ? ${name} then c.systemd.units.${name}.text else null;
  service = c: name: c.systemd.services.${name} or null;
in
{
  inherit eval brief;

  # The toplevel's derivation path (evaluating it runs every assertion and warning NixOS
  # checks, as nixos-rebuild would) and the rendered documentation of every option.
  whole =
    e:
    let
      lib = e.pkgs.lib;
    in
    {
      toplevel = e.config.system.build.toplevel.drvPath;
      # Every option's documentation renders (types, defaultText, literalMD).
      docs = map (o: {
        inherit (o) name type;
        default = o.default or null;
      }) (builtins.filter (o: o.visible && !o.internal) (lib.optionAttrSetToDocList e.options.services.tracehook));
    };

  # What a working configuration renders.
  facts =
    e:
    let
      c = e.config;
      lib = e.pkgs.lib;
      hook = c.nix.settings.post-build-hook or null;
    in
    brief e
    // {
      nixConf = text (etc c "nix/nix.conf");
      signToml = text (etc c "tracehook/sign.toml");
      policyToml = (etc c "tracehook/policy.toml").text or null;
      hook = if hook == null then null else hook.text;
      units = {
        gate = unit c "tracehook-gate.service";
        publish = unit c "tracehook-publish.service";
      };
      gateStart =
        let
          s = service c "tracehook-gate";
        in
        if s == null then null else s.serviceConfig.ExecStart.text;
      publishStart =
        let
          s = service c "tracehook-publish";
        in
        if s == null then null else s.serviceConfig.ExecStart.text;
      tmpfiles = builtins.filter (lib.hasInfix "tracehook") c.systemd.tmpfiles.rules;
      users = lib.mapAttrs (_: u: { inherit (u) isSystemUser group; }) (
        lib.filterAttrs (n: _: n == "tracehook") c.users.users
      );
      nixPackage = toString c.nix.package;
      package = toString c.services.tracehook.package;
      settings = {
        sign = c.services.tracehook.sign.settings;
        gate = c.services.tracehook.gate.settings;
      };
    };

  # A policy attribute set as the module types, checks and renders it (no NixOS needed).
  policy =
    value:
    let
      lib = import (nixpkgs + "/lib");
      p = import ../module/policy.nix {
        inherit lib;
        t = import ../module/lib.nix { inherit lib; };
      };
      checked =
        (lib.evalModules {
          modules = [
            {
              options.policy = lib.mkOption { type = p.type; };
              config.policy = value;
            }
          ];
        }).config.policy;
    in
    {
      text = p.render checked;
      problems = p.problems "policy" checked;
    };

  # The package as the module builds it from this repository, with the tree's packages.
  package =
    let
      pkgs = import nixpkgs { inherit system; };
      pkg = pkgs.callPackage ../package.nix { };
    in
    {
      inherit (pkg) name version;
      drvPath = pkg.drvPath;
      src = toString pkg.src;
      wrapper = builtins.concatStringsSep " " pkg.makeWrapperArgs;
      # The Python packages it propagates, by their PyPI names.
      dependencies = map (d: d.pname) (
        builtins.filter (d: d ? pythonModule && d.pname != d.pythonModule.pname) pkg.propagatedBuildInputs
      );
      nix = toString pkgs.nix;
    };
}
