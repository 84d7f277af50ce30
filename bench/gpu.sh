#!/usr/bin/env bash
# Inference benchmark for a GPU machine: xut-base, 1024 x 1024, 28 steps, CFG, bf16, SDPA, eager and compiled.
# Usage (from the repo root): bash bench/gpu.sh   [extra args for bench/gpu.py]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -c "import torch, einops, safetensors" 2>/dev/null || "$PY" -m pip install -q einops safetensors
PYTHONPATH=. "$PY" -m bench.gpu "$@"
