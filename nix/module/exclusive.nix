# services.tracehook.gate.exclusive: the gate is the only way a built path enters the store.
#
# nix.conf must name no other substituter and trust no other key, in any of the forms Nix
# reads: `substituters`, `trusted-substituters`, `trusted-public-keys`, their `extra-`
# forms (appended after the module's settings: the hole the first version left), their old
# aliases, lines in `nix.extraOptions` (written last, so they win), and `require-sigs =
# false` (then any local user may import unsigned paths). Definitions in `nix.settings` are
# forced away, and every dropped definition of another module is named in a warning;
# whatever cannot be forced away fails evaluation. The final values are asserted, so
# another module's mkForce cannot slip a cache back in.
{
  config,
  lib,
  options,
  ...
}:

let
  inherit (lib)
    attrNames
    concatMap
    concatStringsSep
    elem
    filter
    mkForce
    mkIf
    optional
    ;

  gcfg = config.services.tracehook.gate;
  nixSettings = config.nix.settings;
  enabled = gcfg.enable && gcfg.exclusive;
  gateUrl = "http://${gcfg.settings.listen}";

  forced = {
    substituters = [ gateUrl ];
    trusted-substituters = [ ];
    trusted-public-keys = optional (gcfg.signingPublicKey != null) gcfg.signingPublicKey ++ gcfg.upstreamPublicKeys;
    extra-substituters = [ ];
    extra-trusted-substituters = [ ];
    extra-trusted-public-keys = [ ];
  };
  # Nix's old names of the same settings: a forced empty value would be a line of its own in
  # nix.conf, overriding the gate, so any definition fails evaluation instead.
  aliases = [
    "binary-caches"
    "trusted-binary-caches"
    "binary-cache-public-keys"
    "extra-binary-caches"
    "extra-trusted-binary-caches"
    "extra-binary-cache-public-keys"
  ];
  watched = attrNames forced ++ aliases;

  # What NixOS itself contributes (nixos/modules/config/nix.nix): dropped without a word.
  nixosDefaults = [
    "https://cache.nixos.org/"
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
  ];
  ownFiles = [ (toString ./exclusive.nix) ];

  t = import ./lib.nix { inherit lib; };
  droppedDefinitions = name: t.settingDefinitions options name ownFiles nixosDefaults;

  hint =
    name:
    if lib.hasSuffix "public-keys" name then
      "to accept what that key signs, trust it in the gate's policy (a narinfo-key, docs/POLICY.md)"
    else
      "to fetch from that cache, list it in services.tracehook.gate.upstreams (it is then reached through the gate)";

  show = v: concatStringsSep " " (map (x: ''"${toString x}"'') v);

  dropWarnings = concatMap (
    name:
    map (d: ''
      services.tracehook.gate.exclusive drops nix.settings.${name} = [ ${show d.value} ] defined in
      ${d.file}: the gate must be the only way into the store; ${hint name}, or set
      services.tracehook.gate.exclusive = false.
    '') (droppedDefinitions name)
  ) (attrNames forced);

  sameSet = a: b: lib.sort lib.lessThan (lib.unique a) == lib.sort lib.lessThan (lib.unique b);
  finalValue = name: lib.toList (nixSettings.${name} or [ ]);

  extraLines = t.confLines config.nix.extraOptions;
  badLines = filter (l: elem (t.settingOf l) watched) extraLines;
  includes = filter (l: builtins.match "!?include[[:space:]].*" l != null) extraLines;
  extraOptionsFiles = concatStringsSep ", " options.nix.extraOptions.files;

  trustedUsers = filter (u: u != "root") (lib.toList (nixSettings.trusted-users or [ "root" ]));
in
{
  config = mkIf enabled {
    nix.settings = lib.mapAttrs (_: mkForce) forced;

    assertions =
      map (name: {
        assertion = sameSet (finalValue name) forced.${name};
        message = ''
          services.tracehook.gate.exclusive: nix.settings.${name} ends up as [ ${show (finalValue name)} ],
          not [ ${show forced.${name}} ]: another module forces it (mkForce, mkOverride). Remove
          that definition, or set services.tracehook.gate.exclusive = false.
        '';
      }) (attrNames forced)
      ++ map (name: {
        assertion = !(nixSettings ? ${name});
        message = ''
          services.tracehook.gate.exclusive: nix.settings.${name} (Nix's old name of ${
            lib.removePrefix "extra-" (
              builtins.replaceStrings
                [ "binary-cache-public-keys" "binary-caches" ]
                [ "trusted-public-keys" "substituters" ]
                name
            )
          }) is set, around the gate. Remove it, or set services.tracehook.gate.exclusive = false.
        '';
      }) aliases
      ++ [
        {
          assertion = badLines == [ ];
          message = ''
            services.tracehook.gate.exclusive: nix.extraOptions (defined in ${extraOptionsFiles})
            sets ${concatStringsSep "; " (map (l: "`${l}`") badLines)}: nix.conf applies it after the
            module's settings, so paths would reach the store around the gate. Move caches to
            services.tracehook.gate.upstreams, or set services.tracehook.gate.exclusive = false.
          '';
        }
        {
          assertion = nixSettings.require-sigs or true;
          message = ''
            services.tracehook.gate.exclusive: nix.settings.require-sigs = false lets every local
            user add unsigned store paths (`nix copy --from`, `nix-store --import`) around the gate.
            Remove it, or set services.tracehook.gate.exclusive = false.
          '';
        }
      ];

    warnings =
      dropWarnings
      ++ map (l: ''
        services.tracehook.gate.exclusive: nix.extraOptions (defined in ${extraOptionsFiles}) has
        `${l}`: make sure that file sets no substituters or trusted keys, or paths reach the
        store around the gate.
      '') includes
      ++ optional (forced.trusted-public-keys == [ ]) ''
        services.tracehook.gate.exclusive: Nix trusts no key (neither
        services.tracehook.gate.signingPublicKey nor upstreamPublicKeys is set), so it takes
        only content-addressed paths from the gate and rejects every input-addressed one.
        Set services.tracehook.gate.secretKeyFile and signingPublicKey.
      ''
      ++ optional (trustedUsers != [ ]) ''
        services.tracehook.gate.exclusive: nix.settings.trusted-users lets ${concatStringsSep ", " trustedUsers}
        pass their own substituters and keys to the daemon (`--option substituters ...`), around
        the gate. Trusted users are as powerful as root over the store.
      '';
  };
}
