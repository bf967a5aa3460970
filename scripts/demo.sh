#!/usr/bin/env bash
# The main job: set up .venv with only what the demo needs (first run only: CPU PyTorch and
# CryoMamba's core, no server, napari or test packages), then synthesise a tomogram and
# segment it with the bundled demo model, writing mask.mrc/.nii.gz/.nrrd, stats.json and
# overview.png. Usage: bash scripts/demo.sh [OUTPUT_FOLDER]   (default: ./cryomamba-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh core
exec .venv/bin/cryomamba demo -o "${1:-cryomamba-demo}"
