# tracehook as a Nix package: `callPackage ./nix/package.nix { }` (the flake does this).
#
# The version comes from pyproject.toml (one source of truth). Nix is put at the *end* of the
# PATH of every wrapped executable, as a fallback only: the post-build-hook runs inside the
# nix-daemon's environment, whose PATH need not contain Nix, and the CLI shells out to Nix
# for a few queries. The NixOS module puts the system's `nix.package` (the daemon's Nix, or
# Lix) first, so the hook and the services never run another Nix than the daemon.
{
  lib,
  python3Packages,
  nix,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;
  root = ../.;
  fs = lib.fileset;

  # Only what the wheel is built from (editing tests, docs or nix/ does not rebuild it), and
  # of that only the files git tracks: never a local src/tracehook.egg-info or __pycache__.
  # A flake's source (no .git) is already the tracked tree.
  wanted = fs.unions [
    ../pyproject.toml
    ../README.md
    ../src
  ];
  untracked = fs.unions [
    (fs.maybeMissing ../src/tracehook.egg-info)
    (fs.fileFilter (f: f.hasExt "pyc") ../src)
  ];
  source =
    if builtins.pathExists (root + "/.git") then
      fs.intersection (fs.gitTracked root) wanted
    else
      fs.difference wanted untracked;
in
python3Packages.buildPythonApplication {
  pname = pyproject.project.name;
  inherit (pyproject.project) version;
  pyproject = true;

  src = fs.toSource {
    inherit root;
    fileset = source;
  };

  build-system = [ python3Packages.setuptools ];

  # pyproject.toml's dependencies and its `s3` extra, so that every URL the module accepts
  # opens (tests/test_nixos_whole.py compares the two).
  dependencies = [
    python3Packages.pynacl
    python3Packages.cryptography # hardware evidence (X.509, ECDSA)
    python3Packages.botocore # the `s3` extra: s3:// trace stores and binary caches
  ] ++ lib.optionals (python3Packages.pythonOlder "3.11") [ python3Packages.tomli ];

  makeWrapperArgs = [
    "--suffix"
    "PATH"
    ":"
    (lib.makeBinPath [ nix ])
  ];

  # The test suite drives real Nix stores (chroots, a sandbox): it cannot run inside a
  # Nix build. The flake's checks cover the Nix side (module evaluation, the VM test).
  doCheck = false;
  pythonImportsCheck = [ "tracehook" ];

  meta = {
    description = pyproject.project.description;
    license = lib.licenses.mit;
    mainProgram = "tracehook";
    platforms = lib.platforms.linux;
  };
}
