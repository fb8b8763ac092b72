# Test derivations for tracehook's real-Nix tests. No nixpkgs: every builder is a static
# busybox added to the store as a directory (busybox dispatches on argv[0]).
#   nix-build derivations.nix -A caChain --arg salt '"x"'
{ salt ? "", bb ? ./bb }:
let
  busybox = builtins.path { path = bb; name = "busybox-static"; };
  system = builtins.currentSystem;
  sh = script: {
    builder = "${busybox}/busybox";
    args = [ "sh" "-eu" "-c" script ];
    PATH = "${busybox}";
  };
  ca = { __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };

  # A chain of n floating content-addressed derivations, each reading the one below.
  caStep = name: deps: derivation ({
    inherit name system salt;
    deps = deps;
  } // ca // sh ''
    busybox mkdir -p $out/bin
    echo "${name} ${salt}" > $out/name
    for d in $deps; do busybox cat $d/name >> $out/name; done
    printf '#!/bin/sh\necho ${name}\n' > $out/bin/${name}
    busybox chmod +x $out/bin/${name}
    busybox ln -s ../name $out/bin/link
  '');
  caA = caStep "ca-a" [ ];
  caB = caStep "ca-b" [ caA ];
  caC = caStep "ca-c" [ caB caA ];

  # The same shape, input-addressed.
  iaStep = name: deps: derivation ({
    inherit name system salt;
    deps = deps;
  } // sh ''
    echo "${name} ${salt}" > $out
    for d in $deps; do busybox cat $d >> $out; done
  '');
  iaA = iaStep "ia-a" [ ];
  iaB = iaStep "ia-b" [ iaA ];
  iaC = iaStep "ia-c" [ iaB iaA ];

  # Fixed-output: flat sha256 of "hello\n", and a recursive (NAR) one.
  fodFlat = derivation ({
    name = "fod-flat.txt";
    inherit system;
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
  } // sh "echo hello > $out");
  fodRec = derivation ({
    name = "fod-rec";
    inherit system;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = "sha256-uRqcZqBPz7sJqIcT7XuvNwfQMOCjeytl/YaXOnJQV+Y=";
  } // sh "busybox mkdir $out; echo fixed > $out/data");

  # Content-addressed on top of fixed-output sources.
  caOnFod = derivation ({
    name = "ca-on-fod";
    inherit system salt;
    src = fodFlat;
    tree = fodRec;
  } // ca // sh "busybox cat $src $tree/data > $out");

  # Multi-output, input-addressed and content-addressed.
  multiIa = derivation ({
    name = "multi-ia";
    inherit system salt;
    outputs = [ "out" "dev" "doc" ];
  } // sh "echo out > $out; echo dev > $dev; busybox mkdir $doc; echo doc > $doc/README");
  multiCa = derivation ({
    name = "multi-ca";
    inherit system salt;
    outputs = [ "out" "lib" ];
  } // ca // sh "echo out > $out; echo lib > $lib");
  useMulti = derivation ({
    name = "use-multi";
    inherit system salt;
    lib = multiCa.lib;
    dev = multiIa.dev;
  } // ca // sh "busybox cat $lib $dev > $out");

  # Multi-output content-addressed with a content-addressed input: Nix resolves it, and a
  # consumer may ask for one output only (`multiOnCaLib`).
  multiOnCa = derivation ({
    name = "multi-on-ca";
    inherit system salt;
    dep = caA;
    outputs = [ "out" "lib" "dev" ];
  } // ca // sh "busybox cat $dep/name > $out; echo lib > $lib; echo dev > $dev");

  # Input-addressed on top of content-addressed (its output path is deferred until the
  # inputs are built, then computed from the resolved derivation).
  iaOnCa = derivation ({
    name = "ia-on-ca";
    inherit system salt;
    dep = caB;
  } // sh "busybox cat $dep/name > $out");

  # Awkward strings: quotes, backslashes, newlines, tabs, non-ASCII, dollar signs.
  weirdEnv = derivation ({
    name = "weird-env";
    inherit system salt;
    quoted = "a \"quoted\" word, a back\\slash, a\ttab,\r\na CRLF and a\nnewline";
    unicode = "ünïcödé ✓ 雪 — 🎉";
    dollar = "\${not-interpolated} $HOME";
    empty = "";
  } // sh ''printf '%s|%s|%s' "$quoted" "$unicode" "$dollar" > $out'');

  # For the attack table (tests/test_attacks.py). Outputs that refer to their inputs (Nix
  # finds the path in the output and records it as a reference):
  refLib = derivation ({ name = "ref-lib"; inherit system salt; } // sh "echo lib > $out");
  refApp = derivation ({
    name = "ref-app";
    inherit system salt;
    lib = refLib;
  } // sh "echo $lib > $out");
  refEvil = derivation ({ name = "ref-evil"; inherit system salt; } // sh "echo evil > $out");
  caRefLib = derivation ({ name = "ca-ref-lib"; inherit system salt; } // ca // sh "echo lib > $out");
  caRefApp = derivation ({
    name = "ca-ref-app";
    inherit system salt;
    lib = caRefLib;
  } // ca // sh "echo $lib > $out");
  # Fixed outputs pinned by weak hashes (md5, sha1 of "hello\n"), and steps built on them.
  weakFod = algo: hash: derivation ({
    name = "fod-${algo}.txt";
    inherit system;
    outputHashMode = "flat";
    outputHashAlgo = algo;
    outputHash = hash;
  } // sh "echo hello > $out");
  fodMd5 = weakFod "md5" "b1946ac92492d2347c6235b4d2611184";
  fodSha1 = weakFod "sha1" "f572d396fae9206628714fb2ce00f72e94f2258f";
  caOnMd5 = derivation ({ name = "ca-on-md5"; inherit system salt; src = fodMd5; }
    // ca // sh "busybox cat $src > $out");
  caOnSha1 = derivation ({ name = "ca-on-sha1"; inherit system salt; src = fodSha1; }
    // ca // sh "busybox cat $src > $out");
  # Not reproducible: two builders get different outputs, and so different resolutions of
  # the step above it.
  caRandom = derivation ({ name = "ca-random"; inherit system salt; }
    // ca // sh "busybox head -c 16 /dev/urandom | busybox od -x > $out");
  caOnRandom = derivation ({ name = "ca-on-random"; inherit system salt; dep = caRandom; }
    // ca // sh "busybox cat $dep > $out");
in
{
  inherit caA caB caC iaA iaB iaC fodFlat fodRec caOnFod multiIa multiCa useMulti iaOnCa weirdEnv;
  inherit multiOnCa;
  inherit refLib refApp refEvil caRefLib caRefApp fodMd5 fodSha1 caOnMd5 caOnSha1;
  inherit caRandom caOnRandom;
  multiOnCaLib = multiOnCa.lib;
  # Everything at once, for tests that walk the whole set.
  all = [ caC iaC caOnFod useMulti iaOnCa weirdEnv ];
}
