#!/usr/bin/env bash
# The GPU benchmark as one prepared command: under 8 minutes on one H100/H200, compiles
# included (default budget 420 s for everything below, MPS phase included), synthetic
# CIFAR-shaped data (no internet needed). benchmarks/gpu.py says what each section measures;
# most valuable first: the report's two batch-16 recipes eager and with compile:
# reduce-overhead (compile seconds, CUDA-graph skips, graphs, recompiles, BatchNorm's
# num_batches_tracked, loss against eager), resnet18 at 224 px, channels_last on/off,
# batch 512 bf16 SGD, 1/2/4/8 concurrent processes, and last those again under CUDA MPS.
#
#   timeout -k 15 480 bash benchmarks/gpu.sh   # the one GPU run: JSON and logs to $OUT/ when set
#   bash benchmarks/gpu.sh --smoke             # tiny sizes on a CPU: proves the script runs
#
# Extra arguments go to `python -m benchmarks.gpu` (--budget SECONDS, --json PATH). The JSON
# is rewritten after every section, so a run cut off by a time limit keeps what it
# measured; the workers' stderr and this script's own output are kept in <json>_logs/.
# Every external call (nvidia-smi, nvidia-cuda-mps-control) runs under a timeout. MPS: when
# nvidia-cuda-mps-control is on PATH and at least 60 s of the budget are left, this script
# starts its daemon (own pipe and log folders) for the last phase and stops it on exit,
# whatever happens; otherwise the JSON and the table say why not.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export NO_ALBUMENTATIONS_UPDATE=1
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
MPS_FLOOR=60  # as benchmarks/gpu.py's MPS_FLOOR (SMOKE_FLOOR on a smoke run)

smoke=0
json=""
budget=420
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --smoke) smoke=1 ;;
        --json) json="${args[i + 1]:-}" ;;
        --json=*) json="${args[i]#--json=}" ;;
        --budget) budget="${args[i + 1]:-420}" ;;
        --budget=*) budget="${args[i]#--budget=}" ;;
    esac
done
if [[ -z "$json" ]]; then
    if [[ -n "${OUT:-}" ]]; then json="$OUT/gpu_benchmark.json"
    elif ((smoke)); then json="benchmarks/results/gpu_smoke.json"
    else json="benchmarks/results/gpu.json"
    fi
    args+=(--json "$json")
fi
if ((smoke)); then MPS_FLOOR=10; fi
start=$(date +%s)
deadline=$((start + ${budget%.*}))
left() { echo $((deadline - $(date +%s))); }
# the time limit of a phase: what is left of the budget plus a grace, never under 5 s (timeout
# takes 0 as "no limit" and refuses a negative one)
limit() { local t=$(( $(left) + 20 )); (( t < 5 )) && t=5; echo "$t"; }
logs="${json%.json}_logs"
mkdir -p "$logs"
# tee ignores the time limit's SIGTERM, so the last lines still reach the log and the screen
exec > >(trap '' TERM INT; exec tee -a "$logs/gpu_sh.log") 2>&1
# A time limit's SIGTERM reaches python too (same process group: timeout --foreground below),
# which saves the JSON and kills its workers; then the EXIT trap stops MPS.
trap 'exit 143' TERM INT

# ------------------------------------------------------------- what this machine is, first
echo "gpu.sh: $(date -u +%FT%TZ), budget ${budget%.*} s, JSON $json, logs $logs/"
echo "gpu.sh: python $("$PY" -c 'import platform; print(platform.python_version())' 2>&1 || true) ($PY)"
if command -v nvidia-smi >/dev/null 2>&1; then
    timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,compute_mode \
        --format=csv || echo "gpu.sh: nvidia-smi failed or timed out (exit $?)"
else
    echo "gpu.sh: no nvidia-smi on PATH"
fi
if command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    echo "gpu.sh: MPS: nvidia-cuda-mps-control at $(command -v nvidia-cuda-mps-control)"
else
    echo "gpu.sh: MPS: nvidia-cuda-mps-control is not on PATH"
fi

status=0
# ------------------------------------------------- main phase: every section but MPS
set +e
timeout --foreground -k 10 "$(limit)" "$PY" -m benchmarks.gpu --deadline "$deadline" "${args[@]}"
status=$?
set -e
if ((status == 124 || status == 137)); then
    echo "gpu.sh: ERROR: the main phase passed its time limit (exit $status); the JSON keeps the sections it finished"
elif ((status != 0)); then
    echo "gpu.sh: the main phase exited $status (errors are listed above and in the JSON)"
fi

# ------------------------------------------------------------------ last phase: CUDA MPS
mps_dir=""
stop_mps() {
    if [[ -n "$mps_dir" ]]; then
        echo quit | timeout -k 5 20 nvidia-cuda-mps-control >/dev/null 2>&1 \
            || echo "gpu.sh: 'echo quit | nvidia-cuda-mps-control' failed or timed out" >&2
        sleep 1
        rm -rf "$mps_dir"
        mps_dir=""
        echo "gpu.sh: MPS daemon stopped" >&2
    fi
}
trap stop_mps EXIT

mps_phase() {
    local rc=0
    timeout --foreground -k 10 "$(limit)" "$PY" -m benchmarks.gpu --phase mps --deadline "$deadline" "$@" "${args[@]}" \
        || rc=$?
    if ((rc != 0)); then
        echo "gpu.sh: the MPS phase exited $rc"
        status=$((status ? status : rc))
    fi
}

if (($(left) < MPS_FLOOR)); then
    mps_phase --mps-note "skipped: $(left) s left of the budget (the MPS phase needs $MPS_FLOOR s)"
elif ((smoke)); then
    mps_phase
elif ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
    mps_phase --mps-note "not measured: nvidia-cuda-mps-control is not on this machine's PATH"
else
    mps_dir=$(mktemp -d)
    export CUDA_MPS_PIPE_DIRECTORY="$mps_dir/pipe" CUDA_MPS_LOG_DIRECTORY="$mps_dir/log"
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if timeout -k 5 20 nvidia-cuda-mps-control -d; then
        echo "gpu.sh: MPS daemon started (pipes in $CUDA_MPS_PIPE_DIRECTORY)"
        mps_phase
        if [[ -s "$CUDA_MPS_LOG_DIRECTORY/server.log" ]]; then
            cp "$CUDA_MPS_LOG_DIRECTORY/server.log" "$logs/mps_server.log" || true
            tail -n 5 "$CUDA_MPS_LOG_DIRECTORY/server.log" || true
        fi
        cp "$CUDA_MPS_LOG_DIRECTORY/control.log" "$logs/mps_control.log" 2>/dev/null || true
        stop_mps
    else
        rc=$?
        note="not measured: nvidia-cuda-mps-control -d failed or timed out (exit $rc)"
        rm -rf "$mps_dir"
        mps_dir=""
        unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
        echo "gpu.sh: MPS $note"
        mps_phase --mps-note "$note"
    fi
fi
echo "gpu.sh: done in $(($(date +%s) - start)) s, exit $status; JSON $json"
exit "$status"
