#!/usr/bin/env bash
# stop.sh - stop the single-node SLURM cluster that start.sh started.
# Cancels the jobs still queued (so no job processes are left behind), then stops ONLY
# the daemons whose PIDs start.sh recorded in $SLURM_LOCAL_RUN (default /run/slurm-local),
# and only while each PID still belongs to the expected program. Never kills by name.
# Daemons that were already running before start.sh (e.g. a system munged) are left alone.
set -uo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

RUN_DIR=${SLURM_LOCAL_RUN:-/run/slurm-local}
log() { echo "[slurm-local] $*" >&2; }

[ "$(id -u)" = 0 ] || { log "ERROR: must run as root"; exit 1; }

# is_running PID [COMM]: PID exists, is not a zombie, and, if given, is called COMM
is_running() {
    local st
    [[ "$1" =~ ^[0-9]+$ ]] || return 1
    st=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ] || return 1
    [ -z "${2:-}" ] || [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}
pid_of() {  # NAME COMM: echo the recorded PID if it is a live COMM process
    local pid
    pid=$(cat "$RUN_DIR/$1.pid" 2>/dev/null) || return 1
    is_running "$pid" "$2" || return 1
    echo "$pid"
}

# cancel remaining jobs while the controller is still up
if pid_of slurmctld slurmctld >/dev/null && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 1 50); do
            [ -z "$(squeue -h -t R,CG -o '%i' 2>/dev/null)" ] && break; sleep 0.2
        done
    fi
fi

stopped=()
# slurmdbd and mariadbd are recorded only by the shared script's accounting mode, which
# uses the same PID folder; stopping them here keeps the two interchangeable.
for spec in slurmd:slurmd slurmctld:slurmctld slurmdbd:slurmdbd mariadbd:mariadbd munged:munged; do
    name=${spec%%:*}; comm=${spec##*:}
    if pid=$(pid_of "$name" "$comm"); then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 150); do is_running "$pid" || break; sleep 0.1; done
        if is_running "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for 15 s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        stopped+=("$name=$pid")
    fi
    rm -f "$RUN_DIR/$name.pid"
done

if (( ${#stopped[@]} )); then
    echo "stopped: ${stopped[*]}"
else
    echo "nothing to stop (no live recorded PIDs in $RUN_DIR)"
fi
