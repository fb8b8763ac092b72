#!/usr/bin/env bash
# Set-up shared by the README's two commands, idempotent: real Nix (both tiers) and a
# virtualenv (.venv) with tracehook installed. Prints the environment to use, as
# shell assignments: eval "$(scripts/setup.sh)".
set -euo pipefail
cd "$(dirname "$0")/.."
nix_env=$(scripts/install-nix.sh)
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import tracehook, pytest, mypy, cryptography' 2>/dev/null; then
  echo "setup: creating .venv and installing tracehook[test]" >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e '.[test]' >&2
fi
printf '%s\n' "$nix_env" | sed 's/^/export /'
