# services.tracehook.gate: the gate service (a DynamicUser), its trust policy and nix.conf.
#
# The policy, when given as an attribute set or a Nix path, is rendered (module/policy.nix),
# checked by `tracehook policy check` at build time and installed as
# /etc/tracehook/policy.toml. The gate reads that fixed path, so a changed policy does not
# change the unit: switching reloads it (`reloadTriggers`, `ExecReload` = check, then
# SIGHUP) instead of restarting it.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    escapeShellArgs
    hasPrefix
    literalExpression
    literalMD
    mkEnableOption
    mkIf
    mkOption
    optional
    optionalAttrs
    optionals
    types
    ;

  t = import ./lib.nix { inherit lib; };
  p = import ./policy.nix { inherit lib t; };
  cfg = config.services.tracehook;
  gcfg = cfg.gate;
  settings = gcfg.settings;

  unitName = "tracehook-gate.service";
  credential = "/run/credentials/${unitName}/signing-key";
  etcPolicy = "/etc/tracehook/policy.toml";

  policyIsSet = gcfg.policy != null && builtins.isAttrs gcfg.policy && !(gcfg.policy ? outPath);
  # A policy the build can see: a set (rendered here) or a file in the store (a path literal
  # or a derivation). A string path outside the store is read at run time only.
  policyInStore =
    gcfg.policy != null
    && (
      policyIsSet
      || builtins.isPath gcfg.policy
      || hasPrefix builtins.storeDir (toString gcfg.policy)
    );
  checkedPolicy =
    pkgs.runCommand "tracehook-policy.toml"
      (
        {
          nativeBuildInputs = optional gcfg.checkPolicy cfg.package;
          preferLocalBuild = true;
          allowSubstitutes = false;
        }
        // (
          if policyIsSet then
            rec {
              text = p.render gcfg.policy;
              passAsFile = [ "text" ];
              passthru = { inherit text; };
            }
          else
            { src = gcfg.policy; }
        )
      )
      ''
        policy=''${textPath:-$src}
        ${lib.optionalString gcfg.checkPolicy ''tracehook policy check "$policy"''}
        cp "$policy" "$out"
      '';

  policyPath =
    if gcfg.policy == null then
      null
    else if policyInStore then
      etcPolicy
    else
      toString gcfg.policy;

  args = lib.cli.toGNUCommandLine { } settings ++ gcfg.extraArgs;

  # A script, not an ExecStart line: arguments are shell-quoted once, and nothing in a URL
  # is taken for a systemd specifier or variable.
  gateStart = pkgs.writeShellScript "tracehook-gate-start" ''
    exec ${cfg.package}/bin/tracehook gate ${escapeShellArgs args}
  '';
  checkCommand = "${cfg.package}/bin/tracehook policy check ${lib.escapeShellArg settings.policy}";

  keysInNixConf = optional (gcfg.signingPublicKey != null) gcfg.signingPublicKey;
in
{
  options.services.tracehook.gate = {
    enable = mkEnableOption ''
      the tracehook gate: a loopback binary-cache front, used as this machine's substituter,
      that answers only for store paths whose chain of build traces verifies under the
      trust policy
    '';

    listen = mkOption {
      type = t.listen;
      default = "127.0.0.1:37515";
      description = "Loopback address and port the gate listens on (`settings.listen`).";
    };

    upstreams = mkOption {
      type = types.listOf t.cacheUrl;
      default = [ ];
      example = [ "https://cache.example.org" ];
      description = ''
        Binary caches the gate fetches narinfos and NARs from (`settings.upstream`). With
        {option}`services.tracehook.gate.exclusive` they are reached only through the gate.
        A `file://` cache's narinfos name its NAR files by `file://` URLs, which the
        nix-daemon (root) reads itself and checks against the NarHash the gate signed; set
        `settings.nar-urls = "gate"` to stream them through the gate instead.
      '';
    };

    policy = mkOption {
      type = types.nullOr (types.either types.path p.type);
      default = null;
      example = literalExpression ''
        {
          traces = [ "https://traces.example.org" ];
          keys.mine = "builder.example.org-1:diZIhvLSthXHFH+qz5dY/Fegz/u7Z+8aMekjrabc+fI=";
          keys.old = { key = "old.example.org-1:Dwxy6SpfvApt2NHfA8luc1Lj6sobZoX99epUTo3im6M="; not-after = "2027-06-01T00:00:00Z"; };
          trust.require.any-of = [ "mine" "old" ];
        }
      '';
      description = ''
        The trust policy (docs/POLICY.md): an attribute set with exactly the TOML file's
        schema (`traces`, `keys`, `trust.require`; `not-after` as an RFC 3339 string), checked
        at evaluation time and rendered to TOML, or the path of a policy file. A policy the
        build can see (a set, or a file in the store) is also checked by
        `tracehook policy check` at build time and installed as ${etcPolicy}; a string path
        outside the store is checked when the gate starts or reloads.
      '';
    };

    checkPolicy = mkOption {
      type = types.bool;
      default = pkgs.stdenv.buildPlatform.canExecute pkgs.stdenv.hostPlatform;
      defaultText = literalMD "whether the build platform can run the host's binaries";
      description = "Run `tracehook policy check` on the policy file at build time.";
    };

    secretKeyFile = mkOption {
      type = types.nullOr t.secretPath;
      default = null;
      example = "/var/lib/secrets/tracehook-gate.sec";
      description = ''
        Secret key the gate signs the narinfos and realisations it answers with, so that Nix
        needs to trust that key alone. Passed to the service as a systemd credential (the
        dynamic user never reads the file itself). A string outside the Nix store; requires
        {option}`services.tracehook.gate.signingPublicKey`.
      '';
    };

    signingPublicKey = mkOption {
      type = types.nullOr t.publicKey;
      default = null;
      example = "gate-1:mI8foXpQ/M0gMJvJHNr2XZPOyrR1QSZfMyGSiOfPbo8=";
      description = ''
        Public half of {option}`services.tracehook.gate.secretKeyFile` (`tracehook keygen`
        and `nix key convert-secret-to-public` print it), added to `trusted-public-keys`.
        Nix cannot derive it at evaluation time.
      '';
    };

    exclusive = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Make the gate the only way into the store: `substituters` is the gate alone,
        `trusted-public-keys` its key (and {option}`services.tracehook.gate.upstreamPublicKeys`),
        and `trusted-substituters` and the `extra-` forms of all three are empty. Other
        modules' definitions of these are dropped with a warning naming them; settings that
        cannot be dropped (in {option}`nix.extraOptions`, or forced by another module) fail
        evaluation. Set to false to add the gate beside the other substituters.
      '';
    };

    upstreamPublicKeys = mkOption {
      type = types.listOf t.publicKey;
      default = [ ];
      description = ''
        Keys kept in `trusted-public-keys` in exclusive mode, for a gate without a
        {option}`services.tracehook.gate.secretKeyFile` that passes the upstreams'
        signatures through.
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
      example = [
        "192.0.2.10"
        "2001:db8::/64"
      ];
      description = ''
        When set, the gate may reach only loopback and these addresses or prefixes
        (systemd `IPAddressAllow`): the upstreams' and trace stores' addresses. Host names
        cannot be resolved at evaluation time, so this is not derived from the URLs.
        Null: no address filter.
      '';
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf (
          types.nullOr (
            types.oneOf [
              types.bool
              types.int
              types.float
              types.str
              (types.listOf types.str)
            ]
          )
        );
        options = {
          policy = mkOption {
            type = types.nullOr (types.strMatching "/.*");
            default = policyPath;
            defaultText = literalMD "${etcPolicy} for a policy the build sees, else {option}`services.tracehook.gate.policy`";
            description = "The policy file the gate reads (`--policy`).";
          };
          upstream = mkOption {
            type = types.listOf t.cacheUrl;
            default = gcfg.upstreams;
            defaultText = literalExpression "config.services.tracehook.gate.upstreams";
            description = "Binary caches (`--upstream`, repeated).";
          };
          listen = mkOption {
            type = t.listen;
            default = gcfg.listen;
            defaultText = literalExpression "config.services.tracehook.gate.listen";
            description = "Where the gate listens; the substituter URL follows it.";
          };
          log-file = mkOption {
            type = types.nullOr types.str;
            default = "/var/log/tracehook-gate/gate.log";
            description = ''
              JSON event log, in the service's LogsDirectory (a DynamicUser writes nowhere
              else): `tracehook log --refused /var/log/tracehook-gate/gate.log`.
            '';
          };
          cache-dir = mkOption {
            type = types.nullOr types.str;
            default = "/var/cache/tracehook-gate";
            description = ''
              The persistent verification cache (facts that never change: parsed .drv files,
              signature checks), in the service's CacheDirectory: a restart starts warm, and
              a generation of decisions (`generation-max-age`, 60 s) hands its verified steps
              to the next while nothing they were decided from changed (`no-handover = true`
              turns that off).
            '';
          };
          signing-key = mkOption {
            type = types.nullOr types.str;
            default = if gcfg.secretKeyFile == null then null else credential;
            defaultText = literalMD "the `signing-key` credential when {option}`services.tracehook.gate.secretKeyFile` is set";
            description = "The key the gate signs with (`--signing-key`).";
          };
        };
      };
      default = { };
      example = {
        cache-ttl = 60;
        upstream-timeout = 5;
      };
      description = ''
        Command-line options of `tracehook gate` (RFC 42 freeform settings): `name = value`
        becomes `--name value`, `true` a bare `--name`, a list one `--name` per element; null
        and false are left out. The named options above are the defaults of their keys; a
        key set here wins.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Further arguments for `tracehook gate`, after those from `settings`.";
    };

    environment = mkOption {
      type = types.attrsOf types.str;
      default = { };
      description = "Further environment variables for the gate service.";
    };

    environmentFile = mkOption {
      type = types.nullOr t.secretPath;
      default = null;
      example = "/run/secrets/tracehook-gate.env";
      description = ''
        `KEY=value` lines for the gate's environment (systemd `EnvironmentFile`): secrets
        such as credentials for its upstreams and trace stores.
      '';
    };

    s3CredentialsFile = t.s3CredentialsOption "the gate" "/var/lib/secrets/tracehook-gate.aws";

    policyFile = mkOption {
      type = types.nullOr types.path;
      readOnly = true;
      default = if policyInStore then checkedPolicy else policyPath;
      defaultText = literalMD "the checked policy file";
      description = "The policy file: the checked store file behind ${etcPolicy}, or the path given.";
    };
  };

  config = lib.mkMerge [
    {
      # Each problem is a failed assertion (only for an enabled service).
      assertions = map (message: {
        assertion = false;
        inherit message;
      }) (lib.optionals gcfg.enable (
        t.secretProblems "services.tracehook.gate.secretKeyFile" gcfg.secretKeyFile
        ++ t.secretProblems "services.tracehook.gate.environmentFile" gcfg.environmentFile
        ++ t.secretProblems "services.tracehook.gate.s3CredentialsFile" gcfg.s3CredentialsFile
        ++ lib.optionals policyIsSet (p.problems "services.tracehook.gate.policy" gcfg.policy)
      ));
    }

    (mkIf gcfg.enable {
      assertions = [
        {
          assertion = settings.policy != null;
          message = ''
            services.tracehook.gate is enabled without a trust policy: set
            services.tracehook.gate.policy (an attribute set or a policy file).
          '';
        }
        {
          assertion = !gcfg.exclusive || settings.upstream != [ ];
          message = ''
            services.tracehook.gate is exclusive but has no upstreams: nothing could ever be
            substituted. Set services.tracehook.gate.upstreams, or exclusive = false.
          '';
        }
        {
          assertion = gcfg.secretKeyFile == null || gcfg.signingPublicKey != null;
          message = ''
            services.tracehook.gate.secretKeyFile is set without
            services.tracehook.gate.signingPublicKey: Nix would not trust the narinfos the gate
            signs. Set signingPublicKey to the key's public half.
          '';
        }
        {
          assertion = gcfg.signingPublicKey == null || settings.signing-key != null;
          message = ''
            services.tracehook.gate.signingPublicKey is set without
            services.tracehook.gate.secretKeyFile: nix.conf would trust only a key the gate
            never signs with, and Nix would reject every input-addressed path. Set
            secretKeyFile to the matching secret key, or remove signingPublicKey.
          '';
        }
      ];

      environment.etc."tracehook/policy.toml" = mkIf policyInStore { source = checkedPolicy; };

      nix.settings = {
        narinfo-cache-positive-ttl = gcfg.narinfoCacheTtl.positive;
        narinfo-cache-negative-ttl = gcfg.narinfoCacheTtl.negative;
      }
      // optionalAttrs (!gcfg.exclusive) {
        substituters = lib.mkBefore [ "http://${settings.listen}" ];
        trusted-public-keys = keysInNixConf;
      };

      systemd.services.tracehook-gate = {
        description = "tracehook gate: substitute only what traces back to trusted builds";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        path = [ config.nix.package ];
        environment = {
          PYTHONUNBUFFERED = "1";
          HOME = "/var/lib/tracehook-gate";
        }
        // t.s3CredentialsEnvironment gcfg.s3CredentialsFile
        // gcfg.environment;
        # A new policy reloads the gate (it keeps its sockets and warm caches).
        reloadTriggers = optional policyInStore checkedPolicy;
        serviceConfig =
          t.hardening
          // {
            ExecStartPre = checkCommand;
            ExecStart = gateStart;
            # Check first: a broken policy fails the reload and the running gate keeps the
            # last good one.
            ExecReload = [
              checkCommand
              "${pkgs.coreutils}/bin/kill -HUP $MAINPID"
            ];
            Restart = "always";
            RestartSec = 2;

            DynamicUser = true;
            StateDirectory = "tracehook-gate";
            CacheDirectory = "tracehook-gate";
            LogsDirectory = "tracehook-gate";
            WorkingDirectory = "/var/lib/tracehook-gate";
            UMask = "0077";

            # No ReadOnlyPaths for the store database: the gate reads .drv files, never the
            # database (ProtectSystem = strict keeps the rest read-only).
            PrivateUsers = true;
            LoadCredential =
              optionals (gcfg.secretKeyFile != null) [
                "signing-key:${toString gcfg.secretKeyFile}"
              ]
              ++ t.s3LoadCredential gcfg.s3CredentialsFile;
            EnvironmentFile = optional (gcfg.environmentFile != null) (toString gcfg.environmentFile);
          }
          // optionalAttrs (gcfg.allowedIPs != null) {
            IPAddressDeny = "any";
            IPAddressAllow = [ "localhost" ] ++ gcfg.allowedIPs;
          };
      };
    })
  ];
}
