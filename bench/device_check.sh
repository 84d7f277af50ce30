#!/usr/bin/env bash
# One prepared device check (< 8 min on one H100/H200-class GPU): writes ONE JSON to $OUT (if set) or bench/results/.
#   bash bench/device_check.sh                      # cuda:0
#   bash bench/device_check.sh --device cpu --quick # the same code, small, on CPU (what CI can run)
# Every step runs in its own time-bounded process; a failure is recorded in the JSON and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout 470 env PYTHONPATH="$PWD" "$PY" -m bench.device_check "$@"
