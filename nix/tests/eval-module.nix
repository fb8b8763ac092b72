# Evaluates nix/module.nix with nixpkgs' `lib.evalModules`, without NixOS: stand-in
# declarations of the few options the module sets (nix.settings, systemd.services,
# systemd.tmpfiles, environment.*, assertions, warnings), typed like NixOS's, and a table of
# named scenarios with the expected outcome. Any broken expectation aborts the evaluation
# with the scenario's name.
#
#   nix-instantiate --eval --strict --json nix/tests/eval-module.nix \
#     --arg lib 'import <nixpkgs/lib>'
#
# The flake's `checks.<system>.module-eval` runs it with the flake's nixpkgs and real `pkgs`;
# without `pkgs` (as here) a stand-in gives `formats.toml`, `writeShellScript` and a package,
# and the rendered files can be read back, so the checks go further.
{
  lib,
  pkgs ? null,
  module ? ../module.nix,
}:

let
  inherit (lib) mkOption types;

  stubbed = pkgs == null;

  stubPackage = {
    type = "derivation";
    name = "tracehook-0.0.0";
    outPath = "/nix/store/00000000000000000000000000000000-tracehook-0.0.0";
  };

  stubPkgs = {
    tracehook = stubPackage;
    formats.toml = _: {
      type = types.attrsOf types.anything;
      # JSON is a TOML stand-in good enough to read the rendered settings back.
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
    writeShellScript = name: text: builtins.toFile name text;
  };

  # ------------------------------------------------------------------ stand-in NixOS options

  confAtom = types.nullOr (
    types.oneOf [
      types.bool
      types.int
      types.float
      types.str
      types.path
      types.package
    ]
  );
  unitAtom = types.oneOf [
    types.bool
    types.int
    types.str
    types.path
    types.package
  ];

  serviceType = types.submodule {
    options = {
      description = mkOption { type = types.str; };
      wantedBy = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wants = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      after = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      before = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      environment = mkOption {
        type = types.attrsOf (types.either types.str types.path);
        default = { };
      };
      serviceConfig = mkOption {
        type = types.attrsOf (types.either unitAtom (types.listOf unitAtom));
        default = { };
      };
    };
  };

  nixosStandIns =
    { lib, ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf (
            types.submodule {
              options.assertion = mkOption { type = types.bool; };
              options.message = mkOption { type = types.str; };
            }
          );
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        environment.etc = mkOption {
          type = types.attrsOf (types.submodule { options.source = mkOption { type = types.path; }; });
          default = { };
        };
        nix.settings = mkOption {
          type = types.submodule {
            freeformType = types.attrsOf (types.either confAtom (types.listOf confAtom));
            options = {
              substituters = mkOption { type = types.listOf types.str; };
              trusted-substituters = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
              trusted-public-keys = mkOption { type = types.listOf types.str; };
            };
          };
          default = { };
        };
        systemd.services = mkOption {
          type = types.attrsOf serviceType;
          default = { };
        };
        systemd.tmpfiles.rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
      };
      # What NixOS itself puts there (nixos/modules/config/nix.nix).
      config.nix.settings = {
        substituters = lib.mkAfter [ "https://cache.nixos.org/" ];
        trusted-public-keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      };
    };

  evalWith =
    settings:
    (lib.evalModules {
      modules = [
        module
        nixosStandIns
        { _module.args.pkgs = if stubbed then stubPkgs else pkgs; }
        settings
      ];
    }).config;

  failing = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  check =
    scenario: cond: what:
    if cond then true else throw "eval-module: scenario ${scenario}: ${what}";

  checkAll =
    scenario: checks:
    builtins.all (c: check scenario (builtins.elemAt c 0) (builtins.elemAt c 1)) checks;

  mentions = needle: msgs: builtins.any (m: lib.hasInfix needle m) msgs;

  # hasInfix refuses a needle that refers to a store path; only the text matters here.
  contains = needle: text: lib.hasInfix (builtins.unsafeDiscardStringContext needle) text;

  readJSON = path: builtins.fromJSON (builtins.readFile path);

  gateKey = "vm-gate-1:mI8foXpQ/M0gMJvJHNr2XZPOyrR1QSZfMyGSiOfPbo8=";
  builderKey = "vm-builder-1:tZygNnstFeq8DRl4vzjgHJ/5qdFzbJTHXaJlrBtcntY=";
  policy = {
    traces = [ "https://traces.example.org" ];
    keys.builder = builderKey;
    trust.require = "builder";
  };

  # ------------------------------------------------------------------ scenarios

  scenarios = {
    nothing-enabled =
      let
        c = evalWith { };
      in
      checkAll "nothing-enabled" [
        [
          (failing c == [ ])
          "no assertion may fail"
        ]
        [
          (!(c.nix.settings ? post-build-hook))
          "no post-build-hook"
        ]
        [
          (c.systemd.services == { })
          "no services"
        ]
        [
          (c.nix.settings.substituters == [ "https://cache.nixos.org/" ])
          "substituters untouched"
        ]
      ];

    sign =
      let
        c = evalWith {
          services.tracehook.sign = {
            enable = true;
            secretKeyFile = "/etc/nix/builder.sec";
            publishTo = [
              "file:///var/lib/tracehook/traces"
              "https://traces.example.org"
            ];
          };
        };
        svc = c.systemd.services.tracehook-publish;
        hook = toString c.nix.settings.post-build-hook;
        conf = c.services.tracehook.sign.configFile;
      in
      checkAll "sign" [
        [
          (failing c == [ ])
          "no assertion may fail: ${toString (failing c)}"
        ]
        [
          (lib.hasPrefix builtins.storeDir hook)
          "post-build-hook is a store path"
        ]
        [
          (svc.serviceConfig.ExecStart == "${c.services.tracehook.sign.package}/bin/tracehook publish --daemon")
          "publisher runs `tracehook publish --daemon`"
        ]
        [
          (svc.environment.TRACEHOOK_CONFIG == toString conf)
          "publisher gets TRACEHOOK_CONFIG"
        ]
        [
          (builtins.elem "-/var/lib/tracehook/traces" svc.serviceConfig.ReadWritePaths)
          "publisher may write the file:// trace store"
        ]
        [
          (builtins.elem "/var/lib/tracehook/spool" svc.serviceConfig.ReadWritePaths)
          "publisher may write the spool"
        ]
        [
          (svc.serviceConfig.ProtectSystem == "strict")
          "publisher is hardened"
        ]
        [
          (builtins.elem "d /var/lib/tracehook/spool 0700 root root -" c.systemd.tmpfiles.rules)
          "spool created 0700"
        ]
        [
          (c.environment.etc."tracehook/sign.toml".source == conf)
          "sign.toml in /etc"
        ]
        [
          (c.nix.settings.substituters == [ "https://cache.nixos.org/" ])
          "signer leaves substituters alone"
        ]
        [
          (
            !stubbed
            || readJSON conf == {
              secret-key-file = "/etc/nix/builder.sec";
              publish-to = [
                "file:///var/lib/tracehook/traces"
                "https://traces.example.org"
              ];
              spool-dir = "/var/lib/tracehook/spool";
              log-file = "/var/log/tracehook/sign.log";
              strict = false;
            }
          )
          "sign.toml holds the options under the signer's key names"
        ]
        [
          (
            !stubbed
            || (
              contains "export TRACEHOOK_CONFIG=${toString conf}" (builtins.readFile hook)
              && contains "exec ${stubPackage}/bin/tracehook-post-build" (builtins.readFile hook)
            )
          )
          "hook wrapper exports TRACEHOOK_CONFIG and execs tracehook-post-build"
        ]
      ];

    sign-key-from-nix-settings =
      let
        c = evalWith {
          services.tracehook.sign.enable = true;
          services.tracehook.sign.publishTo = [ "https://traces.example.org" ];
          nix.settings.secret-key-files = [ "/etc/nix/builder.sec" ];
        };
      in
      checkAll "sign-key-from-nix-settings" [
        [
          (failing c == [ ])
          "secret-key-files is an accepted key source"
        ]
        [
          (!stubbed || !(readJSON c.services.tracehook.sign.configFile ? secret-key-file))
          "no secret-key-file written"
        ]
      ];

    sign-strict-and-settings =
      let
        c = evalWith {
          services.tracehook.sign = {
            enable = true;
            secretKeyFile = "/k";
            strict = true;
            settings.nix-flavor = "lix";
          };
        };
        conf = c.services.tracehook.sign.configFile;
      in
      checkAll "sign-strict-and-settings" [
        [
          (mentions "stay in" c.warnings)
          "empty publishTo warns"
        ]
        [
          (!stubbed || (readJSON conf).strict && (readJSON conf).nix-flavor == "lix")
          "strict and extra settings rendered"
        ]
      ];

    gate-exclusive =
      let
        c = evalWith {
          services.tracehook.gate = {
            enable = true;
            upstreams = [ "https://cache.example.org" ];
            inherit policy;
            signingKeyFile = "/var/lib/secrets/gate.sec";
            signingPublicKey = gateKey;
          };
        };
        svc = c.systemd.services.tracehook-gate;
        sc = svc.serviceConfig;
        start = toString sc.ExecStart;
      in
      checkAll "gate-exclusive" [
        [
          (failing c == [ ])
          "no assertion may fail: ${toString (failing c)}"
        ]
        [
          (c.nix.settings.substituters == [ "http://127.0.0.1:37515" ])
          "the gate is the only substituter"
        ]
        [
          (c.nix.settings.trusted-public-keys == [ gateKey ])
          "only the gate's key is trusted"
        ]
        [
          (c.nix.settings.trusted-substituters == [ ])
          "no trusted substituters"
        ]
        [
          (c.nix.settings.narinfo-cache-positive-ttl == 0 && c.nix.settings.narinfo-cache-negative-ttl == 0)
          "narinfo cache TTLs set"
        ]
        [
          (!(c.nix.settings ? post-build-hook))
          "the gate sets no hook"
        ]
        [
          (sc.DynamicUser && sc.ProtectSystem == "strict" && sc.PrivateTmp && sc.NoNewPrivileges)
          "gate hardened"
        ]
        [
          (sc.ReadOnlyPaths == [
            "/nix/store"
            "/nix/var/nix/db"
          ])
          "store read-only"
        ]
        [
          (sc.LoadCredential == [ "signing-key:/var/lib/secrets/gate.sec" ])
          "signing key as a credential"
        ]
        [
          (sc.RestrictAddressFamilies == [
            "AF_UNIX"
            "AF_INET"
            "AF_INET6"
          ])
          "address families restricted"
        ]
        [
          (!(sc ? IPAddressDeny))
          "no IP filter unless allowedIPs is set"
        ]
        [
          (lib.hasPrefix builtins.storeDir (toString c.services.tracehook.gate.policyFile))
          "policy rendered into the store"
        ]
        [
          (!stubbed || readJSON c.services.tracehook.gate.policyFile == policy)
          "policy rendered from the attribute set"
        ]
        [
          (
            !stubbed
            || (
              let
                text = builtins.readFile start;
              in
              contains "${stubPackage}/bin/tracehook gate --policy" text
              && contains "--listen 127.0.0.1:37515 --log-file /var/log/tracehook-gate/gate.log" text
              && contains "--upstream https://cache.example.org" text
              && contains ''--signing-key "$CREDENTIALS_DIRECTORY/signing-key"'' text
            )
          )
          "gate command line"
        ]
      ];

    gate-shared =
      let
        c = evalWith {
          services.tracehook.gate = {
            enable = true;
            exclusive = false;
            listen = "127.0.0.1:9000";
            upstreams = [ "https://cache.example.org" ];
            policy = "/etc/tracehook/policy.toml";
            signingKeyFile = "/k";
            signingPublicKey = gateKey;
            allowedIPs = [ "192.0.2.10" ];
            narinfoCacheTtl.positive = 600;
          };
        };
        sc = c.systemd.services.tracehook-gate.serviceConfig;
      in
      checkAll "gate-shared" [
        [
          (failing c == [ ])
          "no assertion may fail: ${toString (failing c)}"
        ]
        [
          (c.nix.settings.substituters == [
            "http://127.0.0.1:9000"
            "https://cache.nixos.org/"
          ])
          "gate added before the other substituters"
        ]
        [
          (builtins.elem gateKey c.nix.settings.trusted-public-keys && builtins.length c.nix.settings.trusted-public-keys == 2)
          "gate key added to the others"
        ]
        [
          (c.services.tracehook.gate.policyFile == "/etc/tracehook/policy.toml")
          "a policy path is used as it is"
        ]
        [
          (c.nix.settings.narinfo-cache-positive-ttl == 600)
          "positive TTL configurable"
        ]
        [
          (sc.IPAddressDeny == "any" && sc.IPAddressAllow == [ "localhost" "192.0.2.10" ])
          "IP filter from allowedIPs"
        ]
      ];

    example-configuration =
      let
        c = evalWith ../../examples/nixos/configuration.nix;
      in
      checkAll "example-configuration" [
        [
          (failing c == [ ])
          "examples/nixos/configuration.nix passes every assertion: ${toString (failing c)}"
        ]
        [
          (c.nix.settings.substituters == [ "http://127.0.0.1:37515" ])
          "the example's gate is the only substituter"
        ]
        [
          (c.systemd.services ? tracehook-gate && c.systemd.services ? tracehook-publish)
          "the example runs the gate and the publisher"
        ]
      ];

    gate-without-policy =
      let
        c = evalWith {
          services.tracehook.gate = {
            enable = true;
            upstreams = [ "https://cache.example.org" ];
          };
        };
      in
      checkAll "gate-without-policy" [
        [
          (mentions "without a trust policy" (failing c))
          "assertion: gate without a policy"
        ]
      ];

    sign-without-key =
      let
        c = evalWith { services.tracehook.sign.enable = true; };
      in
      checkAll "sign-without-key" [
        [
          (mentions "without a key" (failing c))
          "assertion: sign without a key"
        ]
      ];

    exclusive-gate-without-upstreams =
      let
        c = evalWith {
          services.tracehook.gate = {
            enable = true;
            inherit policy;
          };
        };
      in
      checkAll "exclusive-gate-without-upstreams" [
        [
          (mentions "no upstreams" (failing c))
          "assertion: exclusive gate without upstreams"
        ]
      ];

    signing-key-without-public-key =
      let
        c = evalWith {
          services.tracehook.gate = {
            enable = true;
            upstreams = [ "https://cache.example.org" ];
            inherit policy;
            signingKeyFile = "/k";
          };
        };
      in
      checkAll "signing-key-without-public-key" [
        [
          (mentions "without signingPublicKey" (failing c))
          "assertion: signing key without its public half"
        ]
      ];

    gate-listening-beyond-loopback =
      let
        c = evalWith {
          services.tracehook.gate = {
            enable = true;
            listen = "0.0.0.0:80";
            upstreams = [ "https://cache.example.org" ];
            inherit policy;
          };
        };
      in
      checkAll "gate-listening-beyond-loopback" [
        [
          (!(builtins.tryEval (builtins.deepSeq c.services.tracehook.gate.listen true)).success)
          "a non-loopback listen address is a type error"
        ]
      ];
  };
in
{
  inherit stubbed;
  inherit scenarios;
  passed = builtins.attrNames scenarios;
}
