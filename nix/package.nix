# tracehook as a Nix package: `callPackage ./nix/package.nix { }` (the flake does this).
#
# The version comes from pyproject.toml (one source of truth). `nix` is put on the PATH of
# every wrapped executable: the post-build-hook runs inside the nix-daemon's environment,
# whose PATH need not contain it, and the CLI shells out to Nix for a few queries.
{
  lib,
  python3Packages,
  nix,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;
  root = ../.;
in
python3Packages.buildPythonApplication {
  pname = pyproject.project.name;
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the wheel is built from: editing tests, docs or nix/ does not rebuild it.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md
      ../src
    ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = [
    python3Packages.pynacl
  ] ++ lib.optionals (python3Packages.pythonOlder "3.11") [ python3Packages.tomli ];

  makeWrapperArgs = [
    "--prefix"
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
