#!/usr/bin/env bash
# GPU benchmark of the report's recipes: one short run (under 5 minutes on one H100/H200),
# synthetic CIFAR-shaped data (no internet needed). See benchmarks/gpu.py for what it
# measures: batch 512 bf16 channels_last SGD images/s (goal >= 80,000), the report's two
# batch-16 recipes (single_asam, ensemble_adam) eager and with compile: reduce-overhead,
# and 1/2/4/8 concurrent training processes, without and then with CUDA MPS.
#
#   benchmarks/gpu.sh                 # on a CUDA machine; JSON to $OUT/ when OUT is set
#   benchmarks/gpu.sh --smoke         # tiny sizes on a CPU: proves the script runs
#
# Extra arguments go to `python -m benchmarks.gpu` (--budget SECONDS, --json PATH,
# --smoke-compile). MPS: when nvidia-cuda-mps-control is on PATH, this script starts its
# daemon (own pipe and log folders) for the second phase and stops it on exit, whatever
# happens; when it is missing, or fails to start, the JSON and the table say so.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export NO_ALBUMENTATIONS_UPDATE=1
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"

smoke=0
json=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --smoke) smoke=1 ;;
        --json) json="${args[i + 1]:-}" ;;
        --json=*) json="${args[i]#--json=}" ;;
    esac
done
if [[ -z "$json" ]]; then
    if [[ -n "${OUT:-}" ]]; then json="$OUT/gpu_benchmark.json"
    elif ((smoke)); then json="benchmarks/results/gpu_smoke.json"
    else json="benchmarks/results/gpu.json"
    fi
    args+=(--json "$json")
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,compute_mode --format=csv,noheader || true
fi

status=0
"$PY" -m benchmarks.gpu "${args[@]}" || status=$?

# ------------------------------------------------------------------ phase 2: CUDA MPS
mps_dir=""
stop_mps() {
    if [[ -n "$mps_dir" ]]; then
        echo quit | nvidia-cuda-mps-control >/dev/null 2>&1 || true
        sleep 1
        rm -rf "$mps_dir"
        mps_dir=""
        echo "gpu.sh: MPS daemon stopped" >&2
    fi
}
trap stop_mps EXIT

if ((smoke)); then
    "$PY" -m benchmarks.gpu --phase mps "${args[@]}" || status=$?
elif ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    note="not measured: nvidia-cuda-mps-control is not on this machine's PATH"
    echo "gpu.sh: MPS $note" >&2
    "$PY" -m benchmarks.gpu --phase mps --mps-note "$note" "${args[@]}" || status=$?
else
    mps_dir=$(mktemp -d)
    export CUDA_MPS_PIPE_DIRECTORY="$mps_dir/pipe" CUDA_MPS_LOG_DIRECTORY="$mps_dir/log"
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
        echo "gpu.sh: MPS daemon started (pipes in $CUDA_MPS_PIPE_DIRECTORY)" >&2
        "$PY" -m benchmarks.gpu --phase mps "${args[@]}" || status=$?
        if [[ -s "$CUDA_MPS_LOG_DIRECTORY/server.log" ]]; then
            tail -n 5 "$CUDA_MPS_LOG_DIRECTORY/server.log" >&2 || true
        fi
        stop_mps
    else
        note="not measured: nvidia-cuda-mps-control -d failed (exit $?)"
        mps_dir_failed=$mps_dir
        mps_dir=""
        rm -rf "$mps_dir_failed"
        echo "gpu.sh: MPS $note" >&2
        "$PY" -m benchmarks.gpu --phase mps --mps-note "$note" "${args[@]}" || status=$?
    fi
fi
exit "$status"
