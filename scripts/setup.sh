#!/usr/bin/env bash
# Set up a virtual environment in .venv with CryoMamba and everything its tests need.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.cryomamba-setup
want=$(cat pyproject.toml scripts/constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run only; a few minutes)..." >&2
"$VPY" -m pip install --quiet --upgrade pip
# CPU torch first, then the project under a constraint that keeps it (see docs/install.md).
"$VPY" -m pip install --quiet torch==2.13.0
"$VPY" -m pip install --quiet -c scripts/constraints.txt -e ".[dev,server]"
echo "$want" > "$stamp"
echo "set-up done" >&2
