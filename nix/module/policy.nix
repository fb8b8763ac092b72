# The trust policy as a typed value: the same schema as the TOML file (docs/POLICY.md,
# src/tracehook/verify/policy.py), checked at evaluation time, rendered to TOML.
#
#   types.policy   a submodule: `traces`, `keys`, `trust.require` and nothing else (a typo is
#                  an unknown option, named by the module system); keys are checked as
#                  `name:base64` of 32 bytes, `not-after` as an RFC 3339 date(-time) string
#   problems       what the types cannot see, each message naming the option: a `require`
#                  naming an undefined key, a node with no or two forms, a threshold out of
#                  range, a narinfo-key out of place, a key counted twice, duplicate keys,
#                  no trace store for a trace requirement
#   render         the TOML text (`not-after` written as a TOML date-time)
#
# The loader stays the authority: the module also runs `tracehook policy check` on the
# rendered file at build time and before the gate starts or reloads.
{ lib, t }:

let
  inherit (lib)
    concatLists
    concatMap
    filter
    filterAttrs
    imap0
    length
    mapAttrs
    mkOption
    optional
    types
    unique
    ;

  opt =
    type: description:
    mkOption {
      type = types.nullOr type;
      default = null;
      inherit description;
    };

  forms = [
    "of"
    "all-of"
    "any-of"
  ];

  requireTable = types.submodule {
    options = {
      threshold = opt types.int "With `of`: how many of its entries must be satisfied (1 to their number).";
      of = opt (types.nonEmptyListOf requireNode) "Entries, of which `threshold` must be satisfied.";
      all-of = opt (types.nonEmptyListOf requireNode) "Entries that must all be satisfied.";
      any-of = opt (types.nonEmptyListOf requireNode) "Entries of which one must be satisfied.";
      narinfo-key = opt t.publicKey "A binary cache key whose narinfo signatures are accepted (docs/POLICY.md, adoption path).";
      not-after = opt t.dateTime "With `narinfo-key`: the key counts for nothing from then on.";
      revoked = opt types.bool "With `narinfo-key`: the key never counts.";
    };
  };

  requireNode = types.either types.str requireTable // {
    description = "trust requirement (a key name, or a set with `of` and `threshold`, `all-of`, `any-of` or `narinfo-key`)";
    descriptionClass = "noun";
  };

  keyTable = types.submodule {
    options = {
      key = mkOption {
        type = t.publicKey;
        description = "The public key.";
      };
      not-after = opt t.dateTime "From this date on the key counts for nothing.";
      revoked = opt types.bool "A revoked key never counts.";
    };
  };

  tcbTable = types.submodule {
    options = lib.genAttrs t.tcbFields (
      f:
      if f == "fmc" then
        opt types.ints.u8 "The least `fmc` version accepted (optional)."
      else
        mkOption {
          type = types.ints.u8;
          description = "The least `${f}` security version accepted.";
        }
    );
  };

  evidenceTable = types.submodule {
    options = {
      kind = mkOption {
        type = types.enum t.evidenceKinds;
        description = "The kind of hardware evidence.";
      };
      measurements = mkOption {
        type = types.nonEmptyListOf (types.strMatching "[0-9a-fA-F]{${toString t.measurementHexDigits}}");
        description = "Launch measurements of the guest images accepted (hex).";
      };
      min-tcb = opt tcbTable "The least firmware security versions accepted.";
      roots = opt (types.listOf (types.enum t.amdRoots)) "Pinned AMD roots accepted (default: all).";
      root-files = opt (types.listOf (types.strMatching "/.*")) "Other roots, as PEM files (tests only).";
      not-after = opt t.dateTime "From this date on the element counts for nothing.";
      revoked = opt types.bool "A revoked element never counts.";
      unsafe-allow-debug = opt types.bool "UNSAFE: accept debuggable guests.";
    };
  };

  policyModule = {
    options = {
      weak-fixed-output-hashes = opt (types.enum [
        "allow"
        "refuse"
      ]) "Whether md5- or sha1-pinned fixed outputs anchor chains (default: refuse).";
      evidence = mkOption {
        type = types.attrsOf evidenceTable;
        default = { };
        description = "Hardware evidence elements; their names count in `trust.require` as keys' do.";
      };
      traces = mkOption {
        type = types.listOf t.traceStoreUrl;
        default = [ ];
        description = "Trace stores to read.";
      };
      keys = mkOption {
        type = types.attrsOf (
          types.either t.publicKey keyTable
          // {
            description = "Nix public key, or a set with `key` and optional `not-after` and `revoked`";
          }
        );
        default = { };
        description = "The keys the policy names; `trust.require` refers to them by attribute name.";
      };
      trust = mkOption {
        type = types.submodule {
          options.require = mkOption {
            type = requireNode;
            description = "The trust requirement.";
          };
        };
        description = "The `[trust]` table.";
      };
    };
  };

  # ------------------------------------------------------------------ the TOML-shaped value

  isNode = builtins.isAttrs;

  rawNode =
    n:
    if isNode n then
      filterAttrs (_: v: v != null) (
        {
          inherit (n)
            threshold
            narinfo-key
            not-after
            revoked
            ;
        }
        // lib.genAttrs forms (f: if n.${f} == null then null else map rawNode n.${f})
      )
    else
      n;

  rawKey =
    k:
    if isNode k then
      filterAttrs (_: v: v != null) { inherit (k) key not-after revoked; }
    else
      k;

  nonNull = filterAttrs (_: v: v != null);
  rawEvidence =
    e:
    nonNull (
      builtins.removeAttrs e [ "_module" ]
      // {
        min-tcb = if e.min-tcb == null then null else nonNull (builtins.removeAttrs e.min-tcb [ "_module" ]);
      }
    );

  raw = policy: {
    inherit (policy) traces weak-fixed-output-hashes;
    keys = mapAttrs (_: rawKey) policy.keys;
    evidence = mapAttrs (_: rawEvidence) policy.evidence;
    require = rawNode policy.trust.require;
  };

  # ------------------------------------------------------------------ checks

  # docs/POLICY.md: a narinfo-key is the whole `require`, or a direct entry of its top-level
  # any-of (or threshold-1 `of`). (top-level alternatives, cache entries)
  splitTop =
    where: r:
    let
      form =
        if r ? any-of then
          "any-of"
        else if r ? of && (r.threshold or null) == 1 then
          "of"
        else
          null;
      items = imap0 (i: m: {
        where = "${where}.${form}[${toString i}]";
        node = m;
      }) r.${form};
      isCache = e: isNode e.node && e.node ? narinfo-key;
      # As the loader: any other entry, or any-of beside of/threshold, makes it one whole.
      others = filter (k: !(builtins.elem k [ "any-of" "of" "threshold" ])) (builtins.attrNames r);
      plain = others == [ ] && !(r ? any-of && (r ? of || r ? threshold));
    in
    if isNode r && r ? narinfo-key then
      {
        trace = [ ];
        cache = [
          {
            inherit where;
            node = r;
          }
        ];
      }
    else if !(isNode r) || form == null || !plain || !(builtins.any isCache items) then
      {
        trace = [
          {
            inherit where;
            node = r;
          }
        ];
        cache = [ ];
      }
    else
      {
        trace = filter (e: !(isCache e)) items;
        cache = filter isCache items;
      };

  placement =
    "a narinfo-key is allowed only as the whole trust.require or as a direct entry of its "
    + "top-level any-of (or threshold = 1): a cache signature takes responsibility for "
    + "everything below it, so it can only be an alternative to the whole trace requirement";

  formsOf = n: filter (f: n ? ${f}) forms;

  nodeKeys =
    n:
    if isNode n then
      unique (concatMap nodeKeys (concatMap (f: n.${f}) (formsOf n)))
    else
      [ n ];

  nodeProblems =
    names: where: n:
    if !(isNode n) then
      optional (!(builtins.elem n names)) "${where} names key \"${n}\", which ${
        if names == [ ] then "is not defined: keys is empty" else "keys does not define, nor evidence (defined: ${lib.concatStringsSep ", " names})"
      }"
    else if n ? narinfo-key then
      [ "${where}: ${placement}" ]
    else
      let
        fs = formsOf n;
        form = builtins.head fs;
        count = length n.${form};
        extra = filter (k: !(builtins.elem k (forms ++ [ "threshold" ]))) (builtins.attrNames n);
        th = n.threshold or null;
        own =
          if length fs != 1 || extra != [ ] then
            [
              "${where} must be a key name or a set with exactly one of of (with threshold), all-of, any-of${
                lib.optionalString (extra != [ ]) " (${lib.concatStringsSep ", " extra} belong only next to narinfo-key)"
              }"
            ]
          else if form == "of" then
            if th == null then
              [ "${where}: `of` needs `threshold = N`" ]
            else
              optional (th < 1 || th > count) "${where}.threshold = ${toString th} is out of range: with ${toString count} entries in `of` it must be 1 to ${toString count}"
          else
            optional (th != null) "${where}: `${form}` takes no threshold; use `of` with `threshold`";
        children = lib.optionals (length fs == 1) (
          concatLists (imap0 (i: m: nodeProblems names "${where}.${form}[${toString i}]" m) n.${form})
        );
        thresholdOf = if length fs != 1 then 1 else if form == "all-of" then count else if form == "any-of" then 1 else if th == null then 1 else th;
        # Below a threshold of two or more, one signer must not count twice.
        doubles =
          let
            go =
              seen: ms:
              if ms == [ ] then
                [ ]
              else
                let
                  ks = nodeKeys (builtins.head ms);
                  shared = filter (k: builtins.elem k seen) ks;
                in
                optional (shared != [ ]) "${where}: key \"${builtins.head shared}\" appears in two entries of a threshold of ${toString thresholdOf}, so one signer would count twice; name it once"
                ++ go (seen ++ ks) (builtins.tail ms);
          in
          lib.optionals (length fs == 1 && thresholdOf >= 2) (lib.take 1 (go [ ] n.${form}));
      in
      own ++ children ++ doubles;

  cacheProblems =
    entries:
    concatMap (
      e:
      let
        extra = filter (k: !(builtins.elem k [ "narinfo-key" "not-after" "revoked" ])) (builtins.attrNames e.node);
      in
      optional (extra != [ ]) "${e.where}: ${lib.concatStringsSep ", " extra} cannot stand next to narinfo-key (allowed: narinfo-key, not-after, revoked)"
    ) entries
    ++ (
      let
        names = map (e: keyName e.node.narinfo-key) entries;
      in
      optional (length (unique names) != length names) "the same narinfo-key is listed twice in trust.require; list each cache key once"
    );

  keyName = k: builtins.head (lib.splitString ":" k);
  keyText = k: if isNode k then k.key else k;

  keyProblems =
    where: keys:
    let
      names = builtins.attrNames keys;
      dup =
        f: what:
        let
          go =
            seen: ns:
            if ns == [ ] then
              [ ]
            else
              let
                n = builtins.head ns;
                v = f (keyText keys.${n});
              in
              (if seen ? ${v} then [ "${where}.${n}: ${what} is already used by keys.${seen.${v}}; list each key once" ] else [ ])
              ++ go (seen // { ${v} = n; }) (builtins.tail ns);
          in
          go { } names;
    in
    dup (k: builtins.elemAt (lib.splitString ":" k) 1) "the same public key"
    ++ dup keyName "the key name (before ':', which traces name their key by)";
in
{
  type = types.submodule policyModule;

  inherit raw;

  # Messages for what the types cannot check; `where` is the option's name.
  problems =
    where: policy:
    let
      r = raw policy;
      top = splitTop "${where}.trust.require" r.require;
      keyNames = builtins.attrNames r.keys;
      evidenceNames = builtins.attrNames r.evidence;
      names = lib.sort lib.lessThan (lib.unique (keyNames ++ evidenceNames));
    in
    concatMap (e: nodeProblems names e.where e.node) top.trace
    ++ cacheProblems top.cache
    ++ keyProblems "${where}.keys" r.keys
    ++ map (n: "${where}: \"${n}\" is both in keys and in evidence; a name in trust.require must mean one thing, rename one") (
      lib.intersectLists keyNames evidenceNames
    )
    ++ concatMap (
      n:
      optional ((r.evidence.${n}.roots or [ "default" ]) == [ ] && (r.evidence.${n}.root-files or [ ]) == [ ])
        "${where}.evidence.${n}: no allowed root; list roots (default: ${lib.concatStringsSep ", " t.amdRoots}) or root-files"
    ) evidenceNames
    ++ optional (top.trace != [ ] && r.keys == { } && r.evidence == { }) "${where}.keys is empty: the trust requirement names keys, define them here"
    ++ optional (top.trace != [ ] && r.traces == [ ]) "${where}.traces is empty: the gate would find no trace to verify and refuse everything; list the trace stores to read";

  render =
    policy:
    let
      r = raw policy;
      dates =
        v:
        if isNode v then
          mapAttrs (k: x: if k == "not-after" then t.tomlDateTime x else dates x) v
        else if builtins.isList v then
          map dates v
        else
          v;
    in
    t.toTOML (
      filterAttrs (_: v: v != [ ] && v != { } && v != null) {
        inherit (r) traces weak-fixed-output-hashes;
        keys = mapAttrs (_: dates) r.keys;
        evidence = mapAttrs (_: dates) r.evidence;
      }
      // {
        trust.require = dates r.require;
      }
    );
}
