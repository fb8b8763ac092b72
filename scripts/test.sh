#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (Debian packages, real
# Nix 2.26 and 2.8, a virtualenv with the package and its test extras), then runs ruff,
# mypy --strict, the import-linter contracts and pytest (real-Nix tests included; none is skipped for lack of Nix).
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
. .venv/bin/activate
echo "== ruff" >&2
ruff check src tests bench
echo "== mypy --strict" >&2
mypy
echo "== import-linter (layers; decisions do no I/O)" >&2
lint-imports
echo "== pytest" >&2
exec pytest -q "$@"
