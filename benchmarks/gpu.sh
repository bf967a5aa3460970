#!/usr/bin/env bash
# The GPU path, measured (issue 10): CUDA labels vs nnU-Net's predictor, then ours vs
# nnU-Net on a 512³ volume with a default-size network (time, first slab, peak GPU memory).
# Needs one CUDA GPU and a CUDA build of PyTorch; finishes in under 8 minutes.
#
#   benchmarks/gpu.sh                 # on the GPU machine, from the repository root
#   benchmarks/gpu.sh --device cpu --small   # the same steps on tiny shapes: tests the script
#
# Paste the tables it prints into docs/benchmarks.md ("GPU" section).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --device cpu "* ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device (CPU build?)")'
fi
exec timeout 480 "$PY" benchmarks/gpu.py "$@"
