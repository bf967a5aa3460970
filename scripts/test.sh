#!/usr/bin/env bash
# The whole test suite: set up .venv (first run only), lint, then every test (slow ones too).
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k engine
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
