#!/usr/bin/env bash
# The main job on a fresh machine: installs real Nix (2.26 and 2.8) and tracehook into .venv
# (idempotent), then runs the end-to-end demo with Nix 2.26: a builder builds and signs a
# chain, a fresh store substitutes it through the gate, a tampered trace is refused.
# Usage: scripts/demo.sh [--workdir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
exec .venv/bin/tracehook demo --nix-bin "$TRACEHOOK_NIX_2_26_BIN" "$@"
