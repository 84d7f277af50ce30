#!/usr/bin/env bash
# GPU training throughput for XUT-base at 256 px (spec §1.1 / §6 stage 1 settings): bf16 autocast, TREAD 0.5,
# 256 text tokens, latent 32x32 (VAE x8), largest batch that fits (found by doubling then bisecting).
# The frozen VAE and text encoder are not in the timed step (they are inference-only and can be cached/overlapped);
# the model's forward + backward + AdamW step is. Needs one CUDA GPU; not runnable on the CPU CI machine.
#   bash bench/gpu_train.sh [extra args for `python -m bench.train gpu`]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Without gradient checkpointing (faster per image, smaller max batch) and with it (the reference's setting).
"$PY" -m bench.train gpu --preset xut-base --res 256 --precision bf16 --tread 0.5 --batch auto "$@"
"$PY" -m bench.train gpu --preset xut-base --res 256 --precision bf16 --tread 0.5 --batch auto --grad-ckpt "$@"
# TREAD off at the same batch size as a reference point for the routing speed-up.
"$PY" -m bench.train gpu --preset xut-base --res 256 --precision bf16 --tread 0.0 --batch 64 "$@"
"$PY" -m bench.train gpu --preset xut-base --res 256 --precision bf16 --tread 0.5 --batch 64 "$@"
