# NixOS module: services.tracehook.sign (the post-build-hook and its publisher) and
# services.tracehook.gate (the pre-substitution gate, a loopback binary-cache front).
#
# Used from the flake as `tracehook.nixosModules.default`, or imported directly as a path.
# It sets only `nix.settings`, `systemd.services`, `systemd.tmpfiles.rules`, `environment.*`,
# `assertions` and `warnings`; `nix/tests/eval-module.nix` evaluates it against stand-in
# declarations of exactly those.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    concatMap
    escapeShellArg
    escapeShellArgs
    filter
    hasPrefix
    literalExpression
    mkEnableOption
    mkForce
    mkIf
    mkMerge
    mkOption
    optional
    optionalAttrs
    optionals
    removePrefix
    types
    ;

  cfg = config.services.tracehook;
  tomlFormat = pkgs.formats.toml { };

  defaultPackage = pkgs.tracehook or (pkgs.callPackage ./package.nix { });
  packageOption = mkOption {
    type = types.package;
    default = defaultPackage;
    defaultText = literalExpression "pkgs.tracehook or (pkgs.callPackage ./package.nix { })";
    description = "The tracehook package to use.";
  };

  # ---------------------------------------------------------------- signer

  signSettings = {
    publish-to = cfg.sign.publishTo;
    spool-dir = cfg.sign.spoolDir;
    log-file = cfg.sign.logFile;
    strict = cfg.sign.strict;
  }
  // optionalAttrs (cfg.sign.secretKeyFile != null) {
    secret-key-file = toString cfg.sign.secretKeyFile;
  }
  // cfg.sign.settings;

  signConfigFile = tomlFormat.generate "tracehook-sign.toml" signSettings;

  # The post-build-hook runs in the nix-daemon's environment (or the building client's),
  # which knows nothing of TRACEHOOK_CONFIG: bake the config path into the hook itself.
  hookWrapper = pkgs.writeShellScript "tracehook-post-build-hook" ''
    export TRACEHOOK_CONFIG=${escapeShellArg signConfigFile}
    exec ${cfg.sign.package}/bin/tracehook-post-build "$@"
  '';

  fileStoreDirs = urls: map (u: removePrefix "file://" u) (filter (hasPrefix "file://") urls);

  # ---------------------------------------------------------------- gate

  gateUrl = "http://${cfg.gate.listen}";

  # In the service's LogsDirectory (a DynamicUser writes nowhere else):
  # `tracehook log --refused /var/log/tracehook-gate/gate.log`.
  gateLogFile = "/var/log/tracehook-gate/gate.log";

  policyFile =
    if cfg.gate.policy == null then
      null
    else if builtins.isAttrs cfg.gate.policy && !(cfg.gate.policy ? outPath) then
      tomlFormat.generate "tracehook-policy.toml" cfg.gate.policy
    else
      cfg.gate.policy;

  gateArgs = [
    "gate"
    "--policy"
    (toString policyFile)
    "--listen"
    cfg.gate.listen
    "--log-file"
    gateLogFile
  ]
  ++ concatMap (u: [
    "--upstream"
    u
  ]) cfg.gate.upstreams
  ++ cfg.gate.extraArgs;

  # A script, not an ExecStart line: arguments are shell-quoted once, and nothing in a URL
  # is taken for a systemd specifier or variable.
  gateStart = pkgs.writeShellScript "tracehook-gate-start" ''
    exec ${cfg.gate.package}/bin/tracehook ${escapeShellArgs gateArgs} ${
      lib.optionalString (cfg.gate.signingKeyFile != null) ''--signing-key "$CREDENTIALS_DIRECTORY/signing-key"''
    }
  '';

  # POSIX ERE as Nix's builtins.match reads it: brackets are matched as `[[]` and `[]]`.
  listenPattern = "(127(\\.[0-9]+){3}|[[]::1[]]|localhost):[0-9]+";

  hardening = {
    NoNewPrivileges = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectHome = true;
    ProtectHostname = true;
    ProtectClock = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    SystemCallArchitectures = "native";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    # MemoryDenyWriteExecute is left off: cffi (used by PyNaCl) may need
    # writable executable memory on older libffi.
  };
in
{
  options.services.tracehook = {
    sign = {
      enable = mkEnableOption ''
        the tracehook signer: a `post-build-hook` that signs a build trace for every local
        build and spools it, and a service (`tracehook publish --daemon`) that publishes
        the spool to the trace stores outside the build loop
      '';

      package = packageOption;

      secretKeyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/etc/nix/builder.sec";
        description = ''
          Nix secret key file (`nix key generate-secret`, `tracehook keygen`) the hook signs
          traces with. Give it as a string so the key stays out of the Nix store. When null,
          the key comes from `nix.settings.secret-key-files`.
        '';
      };

      publishTo = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "file:///var/lib/tracehook/traces"
          "https://traces.example.org"
        ];
        description = ''
          Trace stores the publisher delivers spooled traces to: `file:///DIR`, `http://` or
          `https://` (laut's protocol). With none, traces stay in the spool.
        '';
      };

      spoolDir = mkOption {
        type = types.str;
        default = "/var/lib/tracehook/spool";
        description = ''
          Local spool the hook writes signed traces into (no network on the build's hot path);
          the publisher drains it. A trace that could not be published stays here.
        '';
      };

      logFile = mkOption {
        type = types.str;
        default = "/var/log/tracehook/sign.log";
        description = ''
          JSON log of every hook call and publication (`tracehook log` reads it); the empty
          string logs to stderr only (Nix relays the hook's stderr to the building client).
        '';
      };

      strict = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Make the hook exit non-zero when it cannot sign. Nix then starts no further builds
          (even with `--keep-going`): only for builders whose every output must be traced.
        '';
      };

      settings = mkOption {
        type = tomlFormat.type;
        default = { };
        example = {
          nix-flavor = "nix";
        };
        description = ''
          Further settings for the signer's `sign.toml` (see docs/FORMAT.md); they override
          the options above. Unknown keys are rejected by the signer.
        '';
      };

      configFile = mkOption {
        type = types.path;
        readOnly = true;
        default = signConfigFile;
        defaultText = literalExpression "the rendered sign.toml";
        description = "The rendered signer configuration (also at /etc/tracehook/sign.toml).";
      };
    };

    gate = {
      enable = mkEnableOption ''
        the tracehook gate: a loopback binary-cache front, used as this machine's substituter,
        that answers only for store paths whose chain of build traces verifies under the
        trust policy
      '';

      package = packageOption;

      listen = mkOption {
        type = types.strMatching listenPattern;
        default = "127.0.0.1:37515";
        description = "Loopback address and port the gate listens on (`HOST:PORT`).";
      };

      upstreams = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "https://cache.example.org" ];
        description = ''
          Binary caches (`http(s)://`, `file://`) the gate fetches narinfos and NARs from.
          They should not also be in `nix.settings.substituters`, or Nix bypasses the gate.
        '';
      };

      policy = mkOption {
        type = types.nullOr (types.either types.path tomlFormat.type);
        default = null;
        example = literalExpression ''
          {
            traces = [ "https://traces.example.org" ];
            keys.builderA = "builderA:diZIhvLSthXHFH+qz5dY/Fegz/u7Z+8aMekjrabc+fI=";
            trust.require = "builderA";
          }
        '';
        description = ''
          The trust policy (docs/POLICY.md): an attribute set rendered to TOML, or the path of
          a policy file. TOML datetimes (`not-after`) cannot be written from Nix: use a file
          for policies with key expiry.
        '';
      };

      signingKeyFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        example = "/var/lib/secrets/tracehook-gate.sec";
        description = ''
          Secret key the gate re-signs the narinfos it answers with, so Nix needs to trust
          that key alone. Passed to the service as a systemd credential (the dynamic user
          never reads the file itself). Give it as a string so it stays out of the store.
        '';
      };

      signingPublicKey = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "gate-1:mI8foXpQ/M0gMJvJHNr2XZPOyrR1QSZfMyGSiOfPbo8=";
        description = ''
          Public half of {option}`signingKeyFile` (`tracehook keygen` and
          `nix key convert-secret-to-public` print it), added to `trusted-public-keys`.
          Nix cannot derive it at evaluation time.
        '';
      };

      exclusive = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Make the gate the only substituter (`substituters`, `trusted-substituters` and
          `trusted-public-keys` are forced), so nothing reaches the store around it. Set to
          false to add the gate beside the other substituters.
        '';
      };

      upstreamPublicKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = ''
          Keys kept in `trusted-public-keys` in exclusive mode, for a gate without a
          {option}`signingKeyFile` that passes the upstreams' signatures through.
        '';
      };

      narinfoCacheTtl = {
        positive = mkOption {
          type = types.ints.unsigned;
          default = 0;
          description = ''
            `narinfo-cache-positive-ttl`: seconds Nix remembers a path the gate allowed.
            Nix's default is 30 days, which would outlive a key revocation; the gate caches
            its own decisions, so asking it again is cheap.
          '';
        };
        negative = mkOption {
          type = types.ints.unsigned;
          default = 0;
          description = ''
            `narinfo-cache-negative-ttl`: seconds Nix remembers a refusal (Nix's default is
            one hour); 0 lets a path in as soon as its traces are published.
          '';
        };
      };

      allowedIPs = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        example = [ "192.0.2.10" "2001:db8::/64" ];
        description = ''
          When set, the gate may reach only loopback and these addresses or prefixes
          (systemd `IPAddressAllow`): the upstreams' and trace stores' addresses. Host names
          cannot be resolved at evaluation time, so this is not derived from the URLs.
          Null: no address filter.
        '';
      };

      extraArgs = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Further arguments for `tracehook gate`.";
      };

      environment = mkOption {
        type = types.attrsOf types.str;
        default = { };
        description = "Further environment variables for the gate service.";
      };

      policyFile = mkOption {
        type = types.nullOr types.path;
        readOnly = true;
        default = policyFile;
        defaultText = literalExpression "the policy, rendered to TOML when it is a set";
        description = "The policy file the gate is started with.";
      };
    };
  };

  config = mkMerge [
    {
      assertions = [
        {
          assertion =
            !cfg.sign.enable || cfg.sign.secretKeyFile != null || config.nix.settings ? secret-key-files;
          message = ''
            services.tracehook.sign is enabled without a key: set
            services.tracehook.sign.secretKeyFile (or nix.settings.secret-key-files).
          '';
        }
        {
          assertion = !cfg.gate.enable || cfg.gate.policy != null;
          message = ''
            services.tracehook.gate is enabled without a trust policy: set
            services.tracehook.gate.policy (an attribute set or a policy file).
          '';
        }
        {
          assertion = !cfg.gate.enable || !cfg.gate.exclusive || cfg.gate.upstreams != [ ];
          message = ''
            services.tracehook.gate is exclusive but has no upstreams: nothing could ever be
            substituted. Set services.tracehook.gate.upstreams, or exclusive = false.
          '';
        }
        {
          assertion = !cfg.gate.enable || cfg.gate.signingKeyFile == null || cfg.gate.signingPublicKey != null;
          message = ''
            services.tracehook.gate.signingKeyFile is set without signingPublicKey: Nix would
            not trust the narinfos the gate signs. Set signingPublicKey to the key's public half.
          '';
        }
      ];
    }

    (mkIf (cfg.sign.enable || cfg.gate.enable) {
      environment.systemPackages = lib.unique (
        optional cfg.sign.enable cfg.sign.package ++ optional cfg.gate.enable cfg.gate.package
      );
    })

    (mkIf cfg.sign.enable {
      warnings = optional (cfg.sign.publishTo == [ ] && !(cfg.sign.settings ? publish-to)) ''
        services.tracehook.sign.publishTo is empty: signed traces stay in ${cfg.sign.spoolDir}.
      '';

      environment.etc."tracehook/sign.toml".source = signConfigFile;

      nix.settings.post-build-hook = hookWrapper;

      systemd.tmpfiles.rules = [
        "d ${cfg.sign.spoolDir} 0700 root root -"
      ]
      ++ optional (cfg.sign.logFile != "") "d ${dirOf cfg.sign.logFile} 0750 root root -";

      systemd.services.tracehook-publish = {
        description = "tracehook: publish signed build traces from the spool";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        environment.TRACEHOOK_CONFIG = toString signConfigFile;
        serviceConfig = hardening // {
          ExecStart = "${cfg.sign.package}/bin/tracehook publish --daemon";
          # /run/tracehook/agent.sock: the signing agent the hook hands builds to (the hook
          # falls back to signing in its own, slower, process when the agent is not there).
          RuntimeDirectory = "tracehook";
          RuntimeDirectoryMode = "0700";
          Restart = "on-failure";
          RestartSec = 5;
          # root, like the hook that fills the spool; everything else is read-only.
          ProtectSystem = "strict";
          ReadWritePaths = [
            cfg.sign.spoolDir
          ]
          ++ optional (cfg.sign.logFile != "") (dirOf cfg.sign.logFile)
          ++ map (d: "-${d}") (fileStoreDirs cfg.sign.publishTo);
          CapabilityBoundingSet = "";
          UMask = "0022";
        };
      };
    })

    (mkIf cfg.gate.enable {
      nix.settings = {
        narinfo-cache-positive-ttl = cfg.gate.narinfoCacheTtl.positive;
        narinfo-cache-negative-ttl = cfg.gate.narinfoCacheTtl.negative;
      }
      // (
        if cfg.gate.exclusive then
          {
            substituters = mkForce [ gateUrl ];
            trusted-substituters = mkForce [ ];
            trusted-public-keys = mkForce (
              optional (cfg.gate.signingPublicKey != null) cfg.gate.signingPublicKey
              ++ cfg.gate.upstreamPublicKeys
            );
          }
        else
          {
            substituters = [ gateUrl ];
            trusted-public-keys = optional (cfg.gate.signingPublicKey != null) cfg.gate.signingPublicKey;
          }
      );

      systemd.services.tracehook-gate = {
        description = "tracehook gate: substitute only what traces back to trusted builds";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        environment = {
          PYTHONUNBUFFERED = "1";
          HOME = "/var/lib/tracehook-gate";
        }
        // cfg.gate.environment;
        serviceConfig =
          hardening
          // {
            ExecStart = gateStart;
            Restart = "on-failure";
            RestartSec = 2;

            DynamicUser = true;
            StateDirectory = "tracehook-gate";
            CacheDirectory = "tracehook-gate";
            LogsDirectory = "tracehook-gate";
            WorkingDirectory = "/var/lib/tracehook-gate";
            UMask = "0077";

            ProtectSystem = "strict";
            ProtectProc = "invisible";
            ProcSubset = "pid";
            PrivateUsers = true;
            ReadOnlyPaths = [
              "/nix/store"
              "/nix/var/nix/db"
            ];
            CapabilityBoundingSet = "";
            AmbientCapabilities = "";
            SystemCallFilter = [
              "@system-service"
              "~@privileged"
            ];
            LoadCredential = optionals (cfg.gate.signingKeyFile != null) [
              "signing-key:${toString cfg.gate.signingKeyFile}"
            ];
          }
          // optionalAttrs (cfg.gate.allowedIPs != null) {
            IPAddressDeny = "any";
            IPAddressAllow = [ "localhost" ] ++ cfg.gate.allowedIPs;
          };
      };
    })
  ];
}
