# Evaluates nix/module.nix with nixpkgs' `lib.evalModules`, without NixOS: stand-in
# declarations of the options the module sets (nix.*, systemd.*, users.*, environment.*,
# assertions, warnings), typed like NixOS's, and a table of named scenarios with the
# expected outcome. Any broken expectation aborts the evaluation with the scenario's name.
#
#   nix-instantiate --eval --strict --json nix/tests/eval-module.nix \
#     --arg lib 'import <nixpkgs/lib>'
#
# The flake's `checks.<system>.module-eval` runs it with the flake's nixpkgs and real `pkgs`;
# without `pkgs` (as in tests/test_nix_files.py) a stand-in gives what the module calls.
# tests/test_nixos_eval.py goes further: the module inside a real NixOS evaluation.
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
  stubNix = {
    type = "derivation";
    name = "nix-2.18.2";
    pname = "nix";
    version = "2.18.2";
    outPath = "/nix/store/11111111111111111111111111111111-nix-2.18.2";
  };

  textFile = name: text: {
    type = "derivation";
    inherit name text;
    outPath = builtins.toFile name text;
  };

  stubPkgs = {
    tracehook = stubPackage;
    coreutils = textFile "coreutils" "";
    formats.toml = _: { type = types.attrsOf types.anything; };
    writeText = textFile;
    writeShellScript = textFile;
    runCommand =
      name: env: _script:
      textFile name (env.text or "") // env.passthru or { };
    stdenv = {
      buildPlatform.canExecute = _: true;
      hostPlatform = { };
    };
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
  list = type: mkOption {
    type = types.listOf type;
    default = [ ];
  };

  serviceType = types.submodule {
    options = {
      description = mkOption { type = types.str; };
      wantedBy = list types.str;
      wants = list types.str;
      after = list types.str;
      path = list types.package;
      restartTriggers = list types.unspecified;
      reloadTriggers = list types.unspecified;
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
        assertions = list (
          types.submodule {
            options.assertion = mkOption { type = types.bool; };
            options.message = mkOption { type = types.str; };
          }
        );
        warnings = list types.str;
        environment.systemPackages = list types.package;
        environment.etc = mkOption {
          type = types.attrsOf (types.submodule { options.source = mkOption { type = types.path; }; });
          default = { };
        };
        nix.package = mkOption {
          type = types.package;
          default = stubNix;
        };
        nix.extraOptions = mkOption {
          type = types.lines;
          default = "";
        };
        nix.settings = mkOption {
          type = types.submodule {
            freeformType = types.attrsOf (types.either confAtom (types.listOf confAtom));
            options = {
              substituters = mkOption { type = types.listOf types.str; };
              trusted-substituters = list types.str;
              trusted-public-keys = mkOption { type = types.listOf types.str; };
              trusted-users = mkOption {
                type = types.listOf types.str;
                default = [ "root" ];
              };
            };
          };
          default = { };
        };
        systemd.services = mkOption {
          type = types.attrsOf serviceType;
          default = { };
        };
        systemd.tmpfiles.rules = list types.str;
        users.users = mkOption {
          type = types.attrsOf types.attrs;
          default = { };
        };
        users.groups = mkOption {
          type = types.attrsOf types.attrs;
          default = { };
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

  fails = value: !(builtins.tryEval (builtins.deepSeq value true)).success;

  gateKey = "vm-gate-1:mI8foXpQ/M0gMJvJHNr2XZPOyrR1QSZfMyGSiOfPbo8=";
  builderKey = "vm-builder-1:tZygNnstFeq8DRl4vzjgHJ/5qdFzbJTHXaJlrBtcntY=";
  policy = {
    traces = [ "https://traces.example.org" ];
    keys.builder = builderKey;
    trust.require = "builder";
  };
  gate = extra: {
    services.tracehook.gate = {
      enable = true;
      upstreams = [ "https://cache.example.org" ];
      inherit policy;
      secretKeyFile = "/var/lib/secrets/gate.sec";
      signingPublicKey = gateKey;
    } // extra;
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
              "file://localhost/srv/traces"
              "https://traces.example.org"
            ];
            chainHooks = [ "/etc/nix/upload-to-cache.sh" ];
          };
        };
        svc = c.systemd.services.tracehook-publish;
        sc = svc.serviceConfig;
        hook = c.nix.settings.post-build-hook;
        conf = c.services.tracehook.sign.configFile;
      in
      checkAll "sign" [
        [
          (failing c == [ ])
          "no assertion may fail: ${toString (failing c)}"
        ]
        [
          (lib.hasPrefix builtins.storeDir (toString hook))
          "post-build-hook is a store path"
        ]
        [
          (sc.User == "tracehook" && sc.Group == "tracehook" && c.users.users ? tracehook && sc.RuntimeDirectory == "tracehook")
          "publisher runs as its own user, the agent's socket in its RuntimeDirectory"
        ]
        [
          (sc.LoadCredential == [ "secret-key:/etc/nix/builder.sec" ])
          "the secret key reaches the publisher as a credential"
        ]
        [
          (builtins.elem "/var/lib/tracehook/traces" sc.ReadWritePaths && builtins.elem "/var/lib/tracehook/spool" sc.ReadWritePaths)
          "publisher may write the spool and the file:// trace store"
        ]
        [
          (builtins.elem "d /var/lib/tracehook/spool 2770 tracehook tracehook -" c.systemd.tmpfiles.rules)
          "spool created 2770, owned by the publisher"
        ]
        [
          (builtins.elem "d /var/lib/tracehook/traces 0755 tracehook tracehook -" c.systemd.tmpfiles.rules)
          "file:// trace store created"
        ]
        [
          (builtins.elem "d /srv/traces 0755 tracehook tracehook -" c.systemd.tmpfiles.rules && builtins.elem "/srv/traces" sc.ReadWritePaths)
          "file://localhost/DIR names DIR"
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
            builtins.fromTOML conf.text == {
              secret-key-file = "/etc/nix/builder.sec";
              publish-to = [
                "file:///var/lib/tracehook/traces"
                "file://localhost/srv/traces"
                "https://traces.example.org"
              ];
              spool-dir = "/var/lib/tracehook/spool";
              log-file = "/var/log/tracehook/sign.log";
              strict = false;
              chain-hooks = [ "/etc/nix/upload-to-cache.sh" ];
              agent-user = "tracehook";
              agent-socket = "/run/tracehook/agent.sock";
            }
          )
          "sign.toml holds the options under the signer's key names"
        ]
        [
          (
            !stubbed
            || (
              contains "export TRACEHOOK_CONFIG=/etc/tracehook/sign.toml" hook.text
              && contains "export PATH=${c.nix.package}/bin" hook.text
              && contains "exec ${stubPackage}/bin/tracehook-post-build" hook.text
            )
          )
          "hook wrapper: config path, the system's Nix first on PATH, tracehook-post-build"
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
          (!(builtins.fromTOML c.services.tracehook.sign.configFile.text ? secret-key-file))
          "no secret-key-file written"
        ]
        [
          (c.systemd.services.tracehook-publish.serviceConfig.LoadCredential == [ "secret-key:/etc/nix/builder.sec" ])
          "the agent gets nix.conf's key as a credential"
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
            settings.agent-timeout = 5;
          };
        };
        conf = builtins.fromTOML c.services.tracehook.sign.configFile.text;
      in
      checkAll "sign-strict-and-settings" [
        [
          (mentions "stay in" c.warnings)
          "empty publishTo warns"
        ]
        [
          (conf.strict && conf.nix-flavor == "lix" && conf.agent-timeout == 5)
          "strict and freeform settings rendered"
        ]
      ];

    gate-exclusive =
      let
        c = evalWith (gate { });
        sc = c.systemd.services.tracehook-gate.serviceConfig;
        start = sc.ExecStart;
        policyFile = c.environment.etc."tracehook/policy.toml".source;
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
          (c.nix.settings.trusted-substituters == [ ] && c.nix.settings.extra-substituters == [ ])
          "no trusted or extra substituters"
        ]
        [
          (c.nix.settings.narinfo-cache-positive-ttl == 0 && c.nix.settings.narinfo-cache-negative-ttl == 0)
          "narinfo cache TTLs set"
        ]
        [
          (sc.DynamicUser && sc.ProtectSystem == "strict" && sc.PrivateMounts && sc.DeviceAllow == "")
          "gate hardened"
        ]
        [
          (!(sc ? ReadOnlyPaths))
          "no read-only store database"
        ]
        [
          (sc.LoadCredential == [ "signing-key:/var/lib/secrets/gate.sec" ])
          "signing key as a credential"
        ]
        [
          (builtins.fromTOML policyFile.text == policy)
          "policy rendered from the attribute set"
        ]
        [
          (c.systemd.services.tracehook-gate.reloadTriggers == [ policyFile ])
          "a new policy reloads the gate"
        ]
        [
          (
            !stubbed
            || (
              contains "${stubPackage}/bin/tracehook gate" start.text
              && contains "'--policy' '/etc/tracehook/policy.toml'" start.text
              && contains "'--listen' '127.0.0.1:37515'" start.text
              && contains "'--upstream' 'https://cache.example.org'" start.text
              && contains "'--cache-dir' '/var/cache/tracehook-gate'" start.text
              && contains "'--signing-key' '/run/credentials/tracehook-gate.service/signing-key'" start.text
            )
          )
          "gate command line"
        ]
      ];

    gate-shared =
      let
        c = evalWith (gate {
          exclusive = false;
          listen = "127.0.0.1:9000";
          policy = "/etc/tracehook/policy.toml";
          allowedIPs = [ "192.0.2.10" ];
          narinfoCacheTtl.positive = 600;
        });
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
          (c.services.tracehook.gate.policyFile == "/etc/tracehook/policy.toml" && !(c.environment.etc ? "tracehook/policy.toml"))
          "a policy path outside the store is used as it is"
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

    exclusive-drops-extra-substituters =
      let
        c = evalWith (
          lib.recursiveUpdate (gate { }) {
            nix.settings.extra-substituters = [ "https://sneaky.example.org" ];
            nix.settings.substituters = [ "https://mine.example.org" ];
          }
        );
      in
      checkAll "exclusive-drops-extra-substituters" [
        [
          (c.nix.settings.extra-substituters == [ ] && c.nix.settings.substituters == [ "http://127.0.0.1:37515" ])
          "extra-substituters and substituters forced to the gate"
        ]
        [
          (mentions "drops nix.settings.extra-substituters = [ \"https://sneaky.example.org\" ]" c.warnings)
          "the dropped extra-substituters named in a warning"
        ]
        [
          (mentions "drops nix.settings.substituters = [ \"https://mine.example.org\" ]" c.warnings)
          "the dropped substituters named in a warning"
        ]
      ];

    exclusive-gate-trusting-no-key =
      let
        c = evalWith (gate {
          secretKeyFile = null;
          signingPublicKey = null;
        });
      in
      checkAll "exclusive-gate-trusting-no-key" [
        [
          (failing c == [ ] && c.nix.settings.trusted-public-keys == [ ])
          "a gate without a key is allowed, and Nix trusts no key"
        ]
        [
          (mentions "Nix trusts no key" c.warnings)
          "warning: nothing input-addressed can come through"
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
        c = evalWith (gate { policy = null; });
      in
      checkAll "gate-without-policy" [
        [
          (mentions "without a trust policy" (failing c))
          "assertion: gate without a policy"
        ]
      ];

    sign-beside-another-hook =
      let
        c = evalWith {
          services.tracehook.sign = {
            enable = true;
            secretKeyFile = "/k";
          };
          nix.settings.post-build-hook = "/etc/nix/upload-to-cache.sh";
        };
      in
      checkAll "sign-beside-another-hook" [
        [
          (mentions "Move that hook to services.tracehook.sign.chainHooks" (failing c))
          "assertion: another post-build-hook"
        ]
        [
          (lib.hasSuffix "tracehook-post-build-hook" (toString c.nix.settings.post-build-hook))
          "nix.conf names the signer's hook, not a merge error"
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
        c = evalWith (gate { upstreams = [ ]; });
      in
      checkAll "exclusive-gate-without-upstreams" [
        [
          (mentions "no upstreams" (failing c))
          "assertion: exclusive gate without upstreams"
        ]
      ];

    signing-key-without-public-key =
      let
        c = evalWith (gate { signingPublicKey = null; });
      in
      checkAll "signing-key-without-public-key" [
        [
          (mentions "secretKeyFile is set without" (failing c))
          "assertion: signing key without its public half"
        ]
      ];

    public-key-without-signing-key =
      let
        c = evalWith (gate { secretKeyFile = null; });
      in
      checkAll "public-key-without-signing-key" [
        [
          (mentions "signingPublicKey is set without" (failing c))
          "assertion: public key without the secret key file"
        ]
      ];

    secret-in-store =
      let
        c = evalWith (gate { secretKeyFile = "${builtins.storeDir}/00000000000000000000000000000000-gate.sec"; });
      in
      checkAll "secret-in-store" [
        [
          (mentions "services.tracehook.gate.secretKeyFile = ${builtins.storeDir}/" (failing c))
          "assertion: a secret key in the store"
        ]
      ];

    policy-mistakes =
      let
        c = evalWith (gate {
          policy = {
            keys.a = builderKey;
            trust.require.of = [
              "a"
              "b"
            ];
            trust.require.threshold = 3;
          };
        });
      in
      checkAll "policy-mistakes" [
        [
          (mentions "services.tracehook.gate.policy.trust.require.threshold = 3 is out of range" (failing c))
          "assertion: threshold beyond its members"
        ]
        [
          (mentions "services.tracehook.gate.policy.trust.require.of[1] names key \"b\"" (failing c))
          "assertion: an undefined key"
        ]
        [
          (mentions "services.tracehook.gate.policy.traces is empty" (failing c))
          "assertion: no trace store"
        ]
      ];

    type-errors = checkAll "type-errors" [
      [
        (fails (evalWith (gate { listen = "0.0.0.0:80"; })).services.tracehook.gate.listen)
        "a non-loopback listen address is a type error"
      ]
      [
        (fails (evalWith (gate { listen = "127.0.0.1:99999"; })).services.tracehook.gate.listen)
        "port 99999 is a type error"
      ]
      [
        (fails (evalWith (gate { listen = "127.999.0.1:80"; })).services.tracehook.gate.listen)
        "127.999.0.1 is a type error"
      ]
      [
        (!fails (evalWith (gate { listen = "[::1]:1"; })).services.tracehook.gate.listen)
        "[::1]:1 is a loopback address"
      ]
      [
        (fails (evalWith (gate { signingPublicKey = ":mI8foXpQ/M0gMJvJHNr2XZPOyrR1QSZfMyGSiOfPbo8="; })).services.tracehook.gate.signingPublicKey)
        "a nameless gate public key is a type error"
      ]
      [
        (fails (evalWith (gate { policy = policy // { kyes = { }; }; })).services.tracehook.gate.policy)
        "an unknown policy attribute is an error"
      ]
      [
        (fails (evalWith (gate { policy = policy // { keys.builder = ":abc"; }; })).services.tracehook.gate.policy)
        "a nameless key is a type error"
      ]
      [
        (fails (evalWith { services.tracehook.sign.publishTo = [ "ftp://x" ]; }).services.tracehook.sign.publishTo)
        "an unsupported trace store scheme is a type error"
      ]
    ];
  };
in
{
  inherit stubbed;
  inherit scenarios;
  passed = builtins.attrNames scenarios;
}
