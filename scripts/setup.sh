#!/usr/bin/env bash
# Set-up shared by the README's two commands, idempotent: real Nix (both tiers) and a
# virtualenv (.venv) with tracehook installed. Prints the environment to use, as
# shell assignments: eval "$(scripts/setup.sh)".
# The virtualenv is (re)installed when it is missing or pyproject.toml changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
nix_env=$(scripts/install-nix.sh)
stamp=.venv/.tracehook-pyproject.sha256
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
    || ! .venv/bin/python -c 'import tracehook, pytest, mypy' 2>/dev/null; then
  echo "setup: creating .venv and installing tracehook[test]" >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e '.[test]' >&2
  printf '%s\n' "$want" > "$stamp"
fi
printf '%s\n' "$nix_env" | sed 's/^/export /'
