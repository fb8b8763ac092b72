# Helpers shared by the module's parts: option types that check at evaluation time what the
# package would refuse at start, a TOML renderer, and the systemd hardening both services use.
#
# The types mirror the package's own parsers (src/tracehook/...):
#   publicKey      trace/crypto.py parse_public_key: `name:base64` of 32 bytes, name without ':'
#                  (and without white space: nix.conf lists keys separated by spaces)
#   traceStoreUrl  stores/tracestore.py open_store (the schemes in traceStoreSchemes; an
#                  http(s) store takes only `?single-writer=`)
#   cacheUrl       stores/binarycache.py open_upstream
#                  (s3:// for both: stores/s3.py S3Location.parse, bucket, prefix, parameters)
#   listen         gate/config.py parse_listen, restricted to loopback and ports 1 to 65535
#   dateTime       verify/policy.py `not-after`: a TOML date or an offset date-time (RFC 3339)
{ lib }:

let
  inherit (lib)
    all
    concatStringsSep
    elem
    filterAttrs
    hasPrefix
    isAttrs
    isBool
    isDerivation
    isFloat
    isInt
    isList
    isString
    mapAttrsToList
    mkOptionType
    partition
    types
    ;

  matches = pattern: s: isString s && builtins.match pattern s != null;
  between =
    lo: hi: s:
    let
      n = lib.toIntBase10 s;
    in
    n >= lo && n <= hi;
in
rec {
  # Trace-store URL schemes the package reads and publishes to: keep in step with
  # stores/tracestore.py open_store (tests/test_nix_files.py compares the two).
  traceStoreSchemes = [
    "file"
    "http"
    "https"
    "s3"
  ];
  cacheSchemes = [
    "file"
    "http"
    "https"
    "s3"
  ];

  # Query parameters of an s3:// URL (stores/s3.py PARAMETERS), each at most once: `scheme`
  # is http or https, `single-writer` a boolean, true only for a trace store.
  s3Parameters = [
    "endpoint"
    "scheme"
    "region"
    "profile"
    "single-writer"
  ];
  falses = [
    "0"
    "false"
    "no"
  ];
  booleans = [
    "1"
    "true"
    "yes"
  ] ++ falses;

  validParameters =
    traceStore: known: query:
    let
      pairs = map (builtins.match "([^=&]+)=([^&]*)") (lib.splitString "&" query);
      names = map builtins.head pairs;
      value = name: lib.last (lib.findFirst (p: builtins.head p == name) null pairs);
      has = name: elem name names;
    in
    all (p: p != null) pairs
    && all (n: elem n known) names
    && lib.unique names == names
    && (!has "scheme" || elem (value "scheme") [ "http" "https" ])
    && (!has "endpoint" || matches "(https?://)?[^/?#]*" (value "endpoint"))
    && (
      !has "single-writer"
      || elem (lib.toLower (value "single-writer")) (if traceStore then booleans else falses)
    );

  # s3://BUCKET[/PREFIX][?PARAMETERS], as S3Location.parse reads it.
  validS3 =
    traceStore: rest:
    let
      m =
        builtins.match "([A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9])(/[A-Za-z0-9._+=:@/-]*)?(\\?(.*))?"
          rest;
      bucket = builtins.elemAt m 0;
      prefix = builtins.elemAt m 1;
      query = builtins.elemAt m 3;
      segments = lib.filter (s: s != "") (
        lib.splitString "/" (if prefix == null then "" else prefix)
      );
    in
    m != null
    && !(lib.hasInfix "#" rest)
    && !(lib.hasInfix ".." bucket)
    && all (matches "[A-Za-z0-9_+=:@-][A-Za-z0-9._+=:@-]*") segments
    && (query == null || query == "" || validParameters traceStore s3Parameters query);

  # http(s)://HOST[:PORT][/PATH] (stores/http.py Endpoint.parse): a port up to 65535, no
  # fragment, and no query but a trace store's `?single-writer=` (tracestore.py).
  validHttp =
    traceStore: rest:
    let
      m = builtins.match "([^/?#[:space:]]+)([^?#]*)(\\?([^#]*))?" rest;
      port = builtins.match ".*:([0-9]*)" (builtins.head m);
      p = builtins.head port;
      query = builtins.elemAt m 3;
    in
    m != null
    && (port == null || p == "" || (builtins.stringLength p <= 5 && between 0 65535 p))
    && (
      if traceStore then
        query == null || validParameters true [ "single-writer" ] query
      else
        query == null || query == ""
    );

  # Hardware evidence in a policy (verify/evidencepolicy.py; tests/test_nix_files.py
  # compares these with the package's own lists).
  evidenceKinds = [ "sev-snp" ];
  amdRoots = [
    "amd-milan"
    "amd-genoa"
    "amd-turin"
  ];
  tcbFields = [
    "bootloader"
    "tee"
    "snp"
    "microcode"
    "fmc"
  ];
  measurementHexDigits = 96;

  # `traceStore`: the URL names a trace store (s3 takes `single-writer`, http(s) takes it alone);
  # else a binary cache.
  validUrl =
    traceStore: schemes: s:
    let
      m = builtins.match "([a-z0-9+.-]+)://(.*)" s;
      scheme = builtins.elemAt m 0;
      rest = builtins.elemAt m 1;
    in
    isString s
    && m != null
    && elem scheme schemes
    && (
      if scheme == "file" then
        matches "(localhost)?/.*" rest
      else if scheme == "s3" then
        validS3 traceStore rest
      else
        validHttp traceStore rest
    )
    && !(matches ".*[[:space:]].*" s);

  schemeForms = {
    file = "file:///DIR";
    s3 = "s3://BUCKET[/PREFIX]?endpoint=HOST:PORT&scheme=http|https&region=R&profile=P";
  };

  urlType =
    what: traceStore: schemes:
    mkOptionType {
      name = "tracehook${lib.replaceStrings [ " " ] [ "" ] what}Url";
      description = "${what} URL (${concatStringsSep ", " (map (s: schemeForms.${s} or "${s}://HOST...") schemes)})";
      descriptionClass = "noun";
      check = validUrl traceStore schemes;
      merge = lib.options.mergeEqualOption;
    };

  traceStoreUrl = urlType "trace store" true traceStoreSchemes;
  cacheUrl = urlType "binary cache" false cacheSchemes;

  publicKeyPattern = "[^:[:space:]]+:[A-Za-z0-9+/]{43}=";
  publicKey = types.strMatching publicKeyPattern // {
    description = "Nix public key (`name:base64` of 32 bytes, as `nix key convert-secret-to-public` prints it)";
    descriptionClass = "noun";
  };

  validListen =
    s:
    let
      m4 = builtins.match "127\\.([0-9]{1,3})\\.([0-9]{1,3})\\.([0-9]{1,3}):([0-9]{1,5})" s;
      m6 = builtins.match "(\\[::1]|localhost):([0-9]{1,5})" s;
      port = p: between 1 65535 p;
    in
    isString s
    && (
      if m4 != null then
        all (between 0 255) (lib.take 3 m4) && port (builtins.elemAt m4 3)
      else
        m6 != null && port (builtins.elemAt m6 1)
    );

  listen = mkOptionType {
    name = "tracehookListen";
    description = "loopback `HOST:PORT` (127.x.y.z, [::1] or localhost; port 1 to 65535)";
    descriptionClass = "noun";
    check = validListen;
    merge = lib.options.mergeEqualOption;
  };

  # A TOML local date, or an offset date-time (RFC 3339 with a zone). A date-time without a
  # zone is refused, as by the policy loader.
  validDateTime =
    s:
    let
      m = builtins.match "([0-9]{4})-([0-9]{2})-([0-9]{2})([T ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\\.[0-9]+)?(Z|[+-]([0-9]{2}):([0-9]{2})))?" s;
      at = builtins.elemAt m;
    in
    isString s
    && m != null
    && between 1 12 (at 1)
    && between 1 31 (at 2)
    && (
      at 3 == null
      || (
        between 0 23 (at 4)
        && between 0 59 (at 5)
        && between 0 60 (at 6)
        && (at 9 == null || (between 0 23 (at 9) && between 0 59 (at 10)))
      )
    );

  dateTime = mkOptionType {
    name = "tracehookDateTime";
    description = "RFC 3339 date or date-time with a zone (e.g. \"2027-06-01T00:00:00Z\")";
    descriptionClass = "noun";
    check = validDateTime;
    merge = lib.options.mergeEqualOption;
  };

  # Secrets: an absolute path as a string. `types.path` also takes path literals, which the
  # assertions below refuse with a message (a literal is copied into the store).
  secretPath = types.path // {
    description = "absolute path outside the Nix store, as a string";
  };

  secretProblems =
    option: value:
    lib.optional (value != null && builtins.isPath value) ''
      ${option} = ${toString value} is a Nix path literal: Nix copies it into the
      world-readable store. Give the path as a string, e.g. "${toString value}".
    ''
    ++ lib.optional (value != null && !(builtins.isPath value) && hasPrefix builtins.storeDir (toString value)) ''
      ${option} = ${builtins.unsafeDiscardStringContext (toString value)} is in the Nix store,
      which every local user (and every machine the closure is copied to) can read. Keep the
      secret outside the store and give its path as a string, e.g. "/var/lib/secrets/...".
    '';

  # S3 credentials for a service: an AWS shared-credentials file (INI: `[default]`,
  # `aws_access_key_id = ...`, `aws_secret_access_key = ...`; a profile per `profile=` of a
  # URL), passed as the systemd credential `aws` so the service's user needs no access to
  # the file, and found by botocore's lookup through AWS_SHARED_CREDENTIALS_FILE.
  s3CredentialsOption =
    service: example:
    lib.mkOption {
      type = types.nullOr secretPath;
      default = null;
      inherit example;
      description = ''
        AWS shared-credentials file (INI, `[default]` with `aws_access_key_id` and
        `aws_secret_access_key`, or one section per `profile=` of an `s3://` URL) with the
        keys ${service} uses for `s3://` stores. Passed as the systemd credential `aws`
        (`LoadCredential`), read through `AWS_SHARED_CREDENTIALS_FILE`: the service's user
        needs no access to the file. A string outside the Nix store. Keys in an
        `environmentFile` (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`) take precedence,
        unless the URL names a `profile`. Null: no credentials from a file (anonymous
        reads, when the bucket allows them).
      '';
    };
  s3CredentialName = "aws";
  s3CredentialsEnvironment =
    file:
    lib.optionalAttrs (file != null) {
      AWS_SHARED_CREDENTIALS_FILE = "%d/${s3CredentialName}";
    };
  s3LoadCredential = file: lib.optional (file != null) "${s3CredentialName}:${toString file}";

  # ------------------------------------------------------------------ other modules' settings

  # The values a definition contributes, through mkIf / mkMerge / mkOverride / mkOrder.
  active =
    v:
    let
      type = v._type or null;
    in
    if type == "if" then
      (if v.condition then active v.content else [ ])
    else if type == "merge" then
      lib.concatMap active v.contents
    else if type == "override" || type == "order" then
      active v.content
    else
      [ v ];

  # Who else defines `nix.settings.<name>`: [ { file; value = [ ... ]; } ], from the option's
  # definitions (not its merged value, which this module may have forced), leaving out
  # `ownFiles` and the values in `ignore`.
  settingDefinitions =
    options: name: ownFiles: ignore:
    lib.concatMap (
      def:
      let
        values = lib.concatMap (s: if isAttrs s && s ? ${name} then active s.${name} else [ ]) (
          active def.value
        );
        kept = lib.filter (x: !(elem x ignore)) (lib.concatMap lib.toList values);
      in
      lib.optional (kept != [ ] && !(elem def.file ownFiles)) {
        inherit (def) file;
        value = kept;
      }
    ) options.nix.settings.definitionsWithLocations;

  # `nix.extraOptions` as nix.conf lines: (setting name or null, the line).
  strip =
    l:
    let
      m = builtins.match "[[:space:]]*([^[:space:]](.*[^[:space:]])?)?[[:space:]]*" l;
    in
    if m == null || builtins.head m == null then "" else builtins.head m;
  confLines = text: lib.filter (l: l != "") (map strip (lib.splitString "\n" text));
  settingOf =
    l:
    let
      m = builtins.match "([A-Za-z0-9-]+)[[:space:]]*=.*" l;
    in
    if m == null then null else builtins.head m;

  # ------------------------------------------------------------------ TOML
  #
  # pkgs.formats.toml renders at build time (remarshal) and writes every string quoted, so
  # it cannot write a TOML date-time. This renderer runs at evaluation time (the text is
  # available to assertions and tests) and writes `tomlDateTime s` bare.

  tomlDateTime = s: {
    _type = "tomlDateTime";
    value = s;
  };

  tomlKey = k: if matches "[A-Za-z0-9_-]+" k then k else builtins.toJSON k;

  tomlValue =
    v:
    if (v._type or null) == "tomlDateTime" then
      v.value
    else if isBool v then
      lib.boolToString v
    else if isInt v then
      toString v
    else if isFloat v then
      toString v
    else if isString v || builtins.isPath v || isDerivation v then
      builtins.toJSON (toString v)
    else if isList v then
      "[" + concatStringsSep ", " (map tomlValue v) + "]"
    else if isAttrs v then
      let
        pairs = mapAttrsToList (k: x: "${tomlKey k} = ${tomlValue x}") (dropNulls v);
      in
      if pairs == [ ] then "{}" else "{ " + concatStringsSep ", " pairs + " }"
    else
      throw "tracehook: no TOML for the value ${lib.generators.toPretty { } v}";

  dropNulls = filterAttrs (_: v: v != null);

  isTable = v: isAttrs v && (v._type or null) != "tomlDateTime" && !(isDerivation v);

  # Top-level keys first, then one `[table]` per attribute set (deeper sets inline).
  toTOML =
    doc:
    let
      parts = partition (n: isTable doc.${n}) (builtins.attrNames (dropNulls doc));
      line = k: v: "${tomlKey k} = ${tomlValue v}\n";
      table =
        n:
        "\n[${tomlKey n}]\n"
        + lib.concatStrings (mapAttrsToList line (dropNulls doc.${n}));
    in
    lib.concatStrings (map (n: line n doc.${n}) parts.wrong) + lib.concatStrings (map table parts.right);

  # ------------------------------------------------------------------ systemd

  hardening = {
    NoNewPrivileges = true;
    PrivateTmp = true;
    PrivateDevices = true;
    PrivateMounts = true;
    DeviceAllow = "";
    ProtectHome = true;
    ProtectSystem = "strict";
    ProtectHostname = true;
    ProtectClock = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    RemoveIPC = true;
    LockPersonality = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    SystemCallArchitectures = "native";
    SystemCallFilter = [
      "@system-service"
      "~@privileged"
      "~@resources"
    ];
    SystemCallErrorNumber = "EPERM";
    RestrictAddressFamilies = [
      "AF_UNIX"
      "AF_INET"
      "AF_INET6"
    ];
    LimitNOFILE = 65536;
    # MemoryDenyWriteExecute is left off: cffi (used by PyNaCl) may need writable executable
    # memory on older libffi.
  };
}
