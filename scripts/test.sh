#!/usr/bin/env bash
# The whole test suite: set up .venv (first run only), lint, check formatting and types, then
# every test (slow ones too).
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k engine
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy  # strict on src/cryomamba: [tool.mypy] in pyproject.toml
exec .venv/bin/python -m pytest "$@"
