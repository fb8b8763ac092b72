# services.tracehook.sign: the post-build-hook (root, inside nix-daemon) and
# `tracehook publish --daemon` (an unprivileged user), which also serves the signing agent.
#
# Who touches what:
#   hook       root. Asks the agent on /run/tracehook/agent.sock (accepting only a peer of
#              `agent-user`); when no agent answers it signs itself with `secret-key-file`
#              and writes the spool entry (group-readable, in a setgid directory, so the
#              publisher can read and move it). Then runs `chain-hooks`.
#   publisher  user `sign.user`, group `sign.group`. Reads the secret key only as the
#              systemd credential `secret-key` (and S3 keys, if any, as `aws`); writes the
#              spool, its log and the file:// trace stores, which tmpfiles creates with
#              these owners.
{
  config,
  lib,
  options,
  pkgs,
  ...
}:

let
  inherit (lib)
    filter
    hasPrefix
    literalExpression
    literalMD
    mkEnableOption
    mkIf
    mkOption
    optional
    optionals
    removePrefix
    types
    unique
    ;

  t = import ./lib.nix { inherit lib; };
  cfg = config.services.tracehook;
  scfg = cfg.sign;
  settings = scfg.settings;

  configPath = "/etc/tracehook/sign.toml";
  # The agent's socket lives in the publisher's RuntimeDirectory, which systemd creates
  # owned by the publisher and not writable by others (the hook checks both).
  socketMatch = builtins.match "/run/([^/]+)/[^/]+" settings.agent-socket;
  runtimeDirectory = if socketMatch == null then "tracehook" else builtins.head socketMatch;

  nixPackage = config.nix.package;

  signConfigFile = pkgs.writeText "tracehook-sign.toml" (t.toTOML settings);

  # The key the publisher's signing agent signs with: settings.secret-key-file, else the first of
  # nix.settings.secret-key-files (the hook's own fallback, as root, reads the same file).
  nixKeyFiles = lib.toList (config.nix.settings.secret-key-files or [ ]);
  keyFile =
    if settings.secret-key-file != null then
      settings.secret-key-file
    else if nixKeyFiles != [ ] then
      toString (builtins.head nixKeyFiles)
    else
      null;

  # The hook runs in the nix-daemon's environment: it finds its configuration at a fixed
  # path (a changed sign.toml takes effect at the next build, without a daemon restart),
  # and the daemon's own Nix first on PATH.
  hookWrapper = pkgs.writeShellScript "tracehook-post-build-hook" ''
    export TRACEHOOK_CONFIG=${configPath}
    export PATH=${nixPackage}/bin''${PATH:+:$PATH}
    exec ${cfg.package}/bin/tracehook-post-build "$@"
  '';

  publishStart = pkgs.writeShellScript "tracehook-publish-start" ''
    export TRACEHOOK_SECRET_KEY_FILE="$CREDENTIALS_DIRECTORY/secret-key"
    exec ${cfg.package}/bin/tracehook publish --daemon --config ${configPath}
  '';

  fileStoreDirs = map (u: removePrefix "localhost" (removePrefix "file://" u)) (
    filter (hasPrefix "file://") settings.publish-to
  );
  logDir = if settings.log-file == "" then null else dirOf settings.log-file;

  # Nix runs a single post-build-hook: any other one would replace the signer (or be
  # replaced by it). Other definitions fail evaluation, pointing at chainHooks.
  otherHooks = t.settingDefinitions options "post-build-hook" [ (toString ./sign.nix) ] [ ];
  otherHookLines = lib.filter (l: t.settingOf l == "post-build-hook") (
    t.confLines config.nix.extraOptions
  );
  owner = "${scfg.user} ${scfg.group}";
in
{
  options.services.tracehook.sign = {
    enable = mkEnableOption ''
      the tracehook signer: a `post-build-hook` that signs a build trace for every local
      build and spools it, and a service (`tracehook publish --daemon`, an unprivileged
      user) that publishes the spool to the trace stores outside the build loop and serves
      the hook's signing agent
    '';

    secretKeyFile = mkOption {
      type = types.nullOr t.secretPath;
      default = null;
      example = "/etc/nix/builder.sec";
      description = ''
        Nix secret key file (`nix key generate-secret`, `tracehook keygen`) traces are signed
        with; the default of `settings.secret-key-file`. A string: a path into the Nix store
        (or a path literal, which Nix would copy there) is refused. The publisher reads it as
        a systemd credential, never directly. When null, the first of
        {option}`nix.settings.secret-key-files` is used.
      '';
    };

    publishTo = mkOption {
      type = types.listOf t.traceStoreUrl;
      default = [ ];
      example = [
        "file:///var/lib/tracehook/traces"
        "https://traces.example.org"
      ];
      description = ''
        Trace stores the publisher delivers spooled traces to (`settings.publish-to`).
        `file://` directories are created, owned by {option}`services.tracehook.sign.user`.
        With none, traces stay in the spool.
      '';
    };

    spoolDir = mkOption {
      type = types.strMatching "/.*";
      default = "/var/lib/tracehook/spool";
      description = ''
        Local spool the hook writes signed traces into (`settings.spool-dir`); the publisher
        drains it. Created mode 2770, owned by the publisher's user and group.
      '';
    };

    logFile = mkOption {
      type = types.strMatching "(/.*)?";
      default = "/var/log/tracehook/sign.log";
      description = ''
        JSON log of every hook call and publication (`settings.log-file`; `tracehook log`
        reads it); the empty string logs to stderr only.
      '';
    };

    strict = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Make the hook exit non-zero when it cannot sign (`settings.strict`). Nix then starts
        no further builds (even with `--keep-going`). A failing chained hook never fails the
        build.
      '';
    };

    chainHooks = mkOption {
      type = types.listOf types.path;
      default = [ ];
      example = [ "/etc/nix/upload-to-cache.sh" ];
      description = ''
        Executables the post-build hook runs after signing (`settings.chain-hooks`), each
        with the environment Nix gave the hook (`DRV_PATH`, `OUT_PATHS`, ...). Nix takes a
        single `post-build-hook`: put a cache pusher (Cachix, attic, `nix copy`) here instead.
        A chained hook's failure is logged and does not undo the signature.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "tracehook";
      description = ''
        User the publisher and its signing agent run as (created when left at the default);
        the hook only accepts an agent of this user (`settings.agent-user`).
      '';
    };

    group = mkOption {
      type = types.str;
      default = "tracehook";
      description = "Group of the publisher; the spool and the log are shared with it.";
    };

    environmentFile = mkOption {
      type = types.nullOr t.secretPath;
      default = null;
      example = "/run/secrets/tracehook-publish.env";
      description = ''
        `KEY=value` lines for the publisher's environment (systemd `EnvironmentFile`): secrets
        such as trace-store credentials, which must not enter the Nix store.
      '';
    };

    s3CredentialsFile = t.s3CredentialsOption "the publisher" "/var/lib/secrets/tracehook-publish.aws";

    settings = mkOption {
      type = types.submodule {
        freeformType = (pkgs.formats.toml { }).type;
        options = {
          secret-key-file = mkOption {
            type = types.nullOr types.str;
            default = if scfg.secretKeyFile == null then null else toString scfg.secretKeyFile;
            defaultText = literalExpression "config.services.tracehook.sign.secretKeyFile";
            description = "Secret key the hook signs with when it signs in its own process.";
          };
          publish-to = mkOption {
            type = types.listOf t.traceStoreUrl;
            default = scfg.publishTo;
            defaultText = literalExpression "config.services.tracehook.sign.publishTo";
            description = "Trace stores to publish to.";
          };
          spool-dir = mkOption {
            type = types.strMatching "/.*";
            default = scfg.spoolDir;
            defaultText = literalExpression "config.services.tracehook.sign.spoolDir";
            description = "The spool.";
          };
          log-file = mkOption {
            type = types.strMatching "(/.*)?";
            default = scfg.logFile;
            defaultText = literalExpression "config.services.tracehook.sign.logFile";
            description = "The JSON log.";
          };
          strict = mkOption {
            type = types.bool;
            default = scfg.strict;
            defaultText = literalExpression "config.services.tracehook.sign.strict";
            description = "Fail the build when signing fails.";
          };
          chain-hooks = mkOption {
            type = types.nullOr (types.listOf types.str);
            default = if scfg.chainHooks == [ ] then null else map toString scfg.chainHooks;
            defaultText = literalExpression "config.services.tracehook.sign.chainHooks";
            description = "Executables run after signing.";
          };
          agent-user = mkOption {
            type = types.nullOr types.str;
            default = scfg.user;
            defaultText = literalExpression "config.services.tracehook.sign.user";
            description = "The user the hook expects of the signing agent.";
          };
          agent-socket = mkOption {
            type = types.strMatching "/run/[^/]+/[^/]+";
            default = "/run/tracehook/agent.sock";
            description = ''
              The signing agent's socket, `/run/DIR/NAME`: DIR is the publisher's
              RuntimeDirectory.
            '';
          };
        };
      };
      default = { };
      example = {
        agent-timeout = 2;
        keep-sent = "30d";
      };
      description = ''
        The signer's `sign.toml` (RFC 42 freeform settings; docs/FORMAT.md). The named options
        above are the defaults of their keys; a key set here wins. Unknown keys are refused
        by the signer. Rendered to /etc/tracehook/sign.toml.
      '';
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      default = signConfigFile;
      defaultText = literalMD "the rendered {option}`services.tracehook.sign.settings`";
      description = "The rendered signer configuration (at /etc/tracehook/sign.toml).";
    };
  };

  config = lib.mkMerge [
    {
      # Each problem is a failed assertion (only for an enabled service).
      assertions = map (message: {
        assertion = false;
        inherit message;
      }) (lib.optionals scfg.enable (
        t.secretProblems "services.tracehook.sign.secretKeyFile" scfg.secretKeyFile
        ++ t.secretProblems "services.tracehook.sign.environmentFile" scfg.environmentFile
        ++ t.secretProblems "services.tracehook.sign.s3CredentialsFile" scfg.s3CredentialsFile
        ++ lib.optionals (settings.secret-key-file != toString scfg.secretKeyFile) (
          t.secretProblems "services.tracehook.sign.settings.secret-key-file" settings.secret-key-file
        )
      ));
    }

    (mkIf scfg.enable {
      assertions =
        map (d: {
          assertion = false;
          message = ''
            services.tracehook.sign: nix.settings.post-build-hook is also set in ${d.file}
            (${lib.concatMapStringsSep " " toString d.value}): Nix runs a single post-build hook,
            and the signer is it. Move that hook to services.tracehook.sign.chainHooks: it then
            runs after signing, with the environment Nix gives the hook.
          '';
        }) otherHooks
        ++ map (l: {
          assertion = false;
          message = ''
            services.tracehook.sign: nix.extraOptions sets `${l}`, which would replace the
            signer's hook. Move that hook to services.tracehook.sign.chainHooks.
          '';
        }) otherHookLines
        ++ [
        {
          assertion = keyFile != null;
          message = ''
            services.tracehook.sign is enabled without a key: set
            services.tracehook.sign.secretKeyFile (or nix.settings.secret-key-files).
          '';
        }
      ];

      warnings = optional (settings.publish-to == [ ]) ''
        services.tracehook.sign.publishTo is empty: signed traces stay in ${settings.spool-dir}.
      '';

      environment.etc."tracehook/sign.toml".source = signConfigFile;

      # Above a plain definition, so that another one fails the assertion below rather
      # than the merge of nix.conf.
      nix.settings.post-build-hook = lib.mkOverride 90 hookWrapper;

      users.users = mkIf (scfg.user == "tracehook") {
        tracehook = {
          isSystemUser = true;
          inherit (scfg) group;
          description = "tracehook publisher and signing agent";
        };
      };
      users.groups = mkIf (scfg.group == "tracehook") { tracehook = { }; };

      # The hook (root) and the publisher share the spool through its group: setgid
      # directories, group-readable entries. `Z` hands entries written before the publisher
      # ran unprivileged to its user.
      systemd.tmpfiles.rules =
        [
          "d ${settings.spool-dir} 2770 ${owner} -"
          "Z ${settings.spool-dir} - ${owner} -"
        ]
        ++ optionals (logDir != null) [
          "d ${logDir} 2750 ${owner} -"
          "f ${settings.log-file} 0640 ${owner} -"
        ]
        # Trace stores are public: the gate (another user) may read a local one.
        ++ map (d: "d ${d} 0755 ${owner} -") fileStoreDirs;

      systemd.services.tracehook-publish = {
        description = "tracehook: publish signed build traces, serve the hook's signing agent";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        path = [ nixPackage ];
        environment = {
          PYTHONUNBUFFERED = "1";
        }
        // t.s3CredentialsEnvironment scfg.s3CredentialsFile;
        restartTriggers = [ signConfigFile ];
        serviceConfig = t.hardening // {
          ExecStart = publishStart;
          Restart = "always";
          RestartSec = 5;
          User = scfg.user;
          Group = scfg.group;
          LoadCredential =
            optional (keyFile != null) "secret-key:${keyFile}"
            ++ t.s3LoadCredential scfg.s3CredentialsFile;
          EnvironmentFile = optional (scfg.environmentFile != null) (toString scfg.environmentFile);
          # The agent's socket: root (the hook) may connect, no one else.
          RuntimeDirectory = runtimeDirectory;
          RuntimeDirectoryMode = "0750";
          ReadWritePaths = unique ([ settings.spool-dir ] ++ optional (logDir != null) logDir ++ fileStoreDirs);
          # Trace-store files must be readable by the gate; spool entries are made 0640 by
          # the signer itself.
          UMask = "0022";
          # SO_PEERCRED must see the hook as root: no user namespace.
          PrivateUsers = false;
        };
      };
    })
  ];
}
