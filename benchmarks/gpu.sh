#!/usr/bin/env bash
# GPU throughput benchmark: one short run (under 5 minutes on one H100) that measures on
# CUDA what benchmarks/throughput.py measures on a CPU, plus the report's batch-16 recipe
# (eager, CUDA graphs via compile: reduce-overhead, 1/2/4/8 concurrent jobs) and batch 512
# bf16 channels_last (goal: >= 80,000 images/s). Synthetic data: no internet needed.
#
#   benchmarks/gpu.sh                 # on a CUDA machine; JSON to $OUT/ when OUT is set
#   benchmarks/gpu.sh --smoke         # tiny sizes on a CPU: proves the script runs
#
# Extra arguments go to `python -m benchmarks.gpu` (--budget SECONDS, --json PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export NO_ALBUMENTATIONS_UPDATE=1
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
exec "$PY" -m benchmarks.gpu "$@"
