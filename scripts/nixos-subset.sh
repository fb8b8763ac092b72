#!/usr/bin/env bash
# Regenerates tests/data/nixos-24.05-subset/tree.tar.xz, the part of a NixOS 24.05 tree the
# NixOS tests read, from a whole tree (tests/nixos_subset.py says how; it needs strace):
#   NIXPKGS_TREE=/path/to/nixpkgs-tree scripts/nixos-subset.sh [--work DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NIXPKGS_TREE:?set NIXPKGS_TREE to a whole NixOS 24.05 tree (tests/data/nixos-24.05-subset/README.md)}"
eval "$(scripts/setup.sh)"
. .venv/bin/activate
exec python tests/nixos_subset.py "$@"
