#!/usr/bin/env bash
# start.sh - a throw-away single-node SLURM cluster for `make test-slurm` (Debian/Ubuntu,
# run as root, no systemd needed). Adapted and trimmed from the development machines'
# shared slurm-local scripts: no accounting (no slurmdbd, so `sacct` does not work and the
# test profile polls with squeue).
#
#   munged + slurmctld + slurmd on one node named $(hostname -s), partition "debug",
#   fake GPUs declared as gres/gpu (jobs that ask for --gpus get scheduled; they see
#   CUDA_VISIBLE_DEVICES but no real device).
#
# Idempotent: installs missing packages (apt-get), (re)writes /etc/slurm/{slurm,gres}.conf,
# starts only the daemons not already running (restarts ours when the config changed),
# waits until `sinfo` shows the node usable. The PIDs it starts go to $SLURM_LOCAL_RUN
# for stop.sh, which stops exactly those.
#
# Environment:
#   SLURM_LOCAL_GPUS=2         fake GPUs (gres/gpu) to declare, 0 = none
#   SLURM_LOCAL_PARTITION=debug
#   SLURM_LOCAL_TIMEOUT=60     seconds to wait for the node to become idle
#   SLURM_LOCAL_RUN=/run/slurm-local   where the PID records go
set -euo pipefail
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"

GPUS=${SLURM_LOCAL_GPUS:-2}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
RUN_DIR=${SLURM_LOCAL_RUN:-/run/slurm-local}
CONF_DIR=/etc/slurm
# A config file carrying this marker was written by this script (or the shared one it
# derives from) and may be overwritten; any other one is backed up first.
MARKER="# managed by slurm-local"

t0=$(date +%s.%N)
log() { echo "[slurm-local] $*" >&2; }
die() {
    log "ERROR: $*"
    for f in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log /var/log/munge/munged.log; do
        [ -f "$f" ] && { log "--- tail $f"; tail -n 15 "$f" >&2; }
    done
    exit 1
}

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
mkdir -p "$RUN_DIR"

# is_running PID [COMM]: PID exists, is not a zombie (a killed daemon can linger as
# <defunct> until PID 1 reaps it), and, if given, its command name is COMM
is_running() {
    local st
    [[ "$1" =~ ^[0-9]+$ ]] || return 1
    st=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ] || return 1
    [ -z "${2:-}" ] || [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}
recorded_pid() { cat "$RUN_DIR/$1.pid" 2>/dev/null || true; }
pid_alive() { is_running "$(recorded_pid "$1")" "$2"; }   # NAME COMM

# wait_pidfile FILE COMM SECONDS: wait until FILE names a live COMM process; echo the PID
wait_pidfile() {
    local f=$1 comm=$2 n=$(( $3 * 10 )) pid
    while (( n-- > 0 )); do
        pid=$(cat "$f" 2>/dev/null || true)
        if is_running "$pid" "$comm"; then echo "$pid"; return 0; fi
        sleep 0.1
    done
    return 1
}

# stop_recorded NAME COMM: stop a daemon this script started earlier (recorded PID only)
stop_recorded() {
    local pid
    pid_alive "$1" "$2" || { rm -f "$RUN_DIR/$1.pid"; return 0; }
    pid=$(recorded_pid "$1")
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do is_running "$pid" || break; sleep 0.1; done
    if is_running "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$RUN_DIR/$1.pid"
}

# ------------------------------------------------------------------ 1. packages
need=()
for p in munge slurmctld slurmd slurm-client; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if (( ${#need[@]} )); then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ------------------------------------------------------------------ 2. configuration
NODE=$(hostname -s)
# e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
hw=$(/usr/sbin/slurmd -C | head -n 1)
get() { sed -n "s/.*\b$1=\([0-9]*\).*/\1/p" <<<"$hw"; }
CPUS=$(get CPUs); BOARDS=$(get Boards); SOCKETS=$(get SocketsPerBoard)
CORES=$(get CoresPerSocket); THREADS=$(get ThreadsPerCore); MEM=$(get RealMemory)
[ -n "$CPUS" ] && [ -n "$MEM" ] || die "could not parse 'slurmd -C' output: $hw"
REALMEM=$(( MEM * 90 / 100 ))

gres_types=""; node_gres=""
if (( GPUS > 0 )); then gres_types="GresTypes=gpu"; node_gres=" Gres=gpu:$GPUS"; fi

new_conf=$(cat <<CONF
$MARKER (cifar-ensembles scripts/slurm-local/start.sh)
ClusterName=localcluster
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups in a container/VM without systemd: /proc based tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
# start batch jobs right after sbatch instead of up to 3 s later
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# jobs without --mem get 1 GiB per CPU instead of the whole node
DefMemPerCPU=1024
# reject jobs that can never run here (more CPUs/GPUs than the node has) at sbatch time
# instead of leaving them PENDING forever
EnforcePartLimits=ALL
# no slurmdbd: sacct does NOT work ("Slurm accounting storage is disabled")
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
# finished jobs stay visible to squeue for MinJobAge seconds; the Snakemake SLURM plugin
# polls with squeue only if this is >= 3x its slurm-init-seconds-before-status-checks
MinJobAge=600
ReturnToService=2
$gres_types
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$REALMEM$node_gres State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)

new_gres=""
if (( GPUS > 0 )); then
    # slurmd drops GPUs without File= (and then drains the node) and rejects regular
    # files, so each fake GPU is a character device: /dev/null itself for one GPU,
    # copies of it (major 1, minor 3) for more.
    if (( GPUS == 1 )); then
        files=/dev/null
    else
        mkdir -p /var/lib/slurm/fakegpu
        for ((i = 0; i < GPUS; i++)); do
            f=/var/lib/slurm/fakegpu/nvidia$i
            [ -c "$f" ] || { rm -f "$f"; mknod -m 666 "$f" c 1 3; }
        done
        files="/var/lib/slurm/fakegpu/nvidia[0-$((GPUS - 1))]"
    fi
    new_gres="$MARKER (cifar-ensembles scripts/slurm-local/start.sh)
NodeName=$NODE Name=gpu File=$files"
fi

changed=0
write_if_changed() {  # FILE CONTENT (empty content: remove FILE)
    local f=$1 content=$2
    if [ -z "$content" ]; then
        [ -e "$f" ] || return 0
        grep -qF "$MARKER" "$f" || { cp -a "$f" "$f.bak.$(date +%s)"; log "backed up foreign $f"; }
        rm -f "$f"; changed=1; return 0
    fi
    if [ "$(cat "$f" 2>/dev/null || true)" != "$content" ]; then
        if [ -e "$f" ] && ! grep -qF "$MARKER" "$f"; then
            cp -a "$f" "$f.bak.$(date +%s)"; log "backed up foreign $f"
        fi
        printf '%s\n' "$content" > "$f.tmp" && mv "$f.tmp" "$f"
        changed=1
    fi
}
mkdir -p "$CONF_DIR"
write_if_changed "$CONF_DIR/slurm.conf" "$new_conf"
write_if_changed "$CONF_DIR/gres.conf" "$new_gres"
chmod 644 "$CONF_DIR/slurm.conf"

# refuse to fight daemons this script did not start (systemd units, another cluster)
for d in slurmctld slurmd; do
    foreign=""
    for p in $(pgrep -x "$d" || true); do
        [ "$p" = "$(recorded_pid "$d")" ] && continue
        # a short-lived fork of our own daemon (e.g. slurmd launching a job step)
        [ "$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null)" = "$(recorded_pid "$d")" ] && continue
        is_running "$p" "$d" && foreign+="$p "
    done
    [ -z "$foreign" ] || die "a $d not started by this script is running (pid $foreign); stop it first"
done

if (( changed )); then
    log "configuration written to $CONF_DIR"
    stop_recorded slurmd slurmd          # running daemons must pick up the new config
    stop_recorded slurmctld slurmctld
fi

# ------------------------------------------------------------------ 3. munge
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

started=()
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    pid_alive munged munged || log "using an already running munged (not ours, will not be stopped)"
else
    rm -f "$RUN_DIR/munged.pid" /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged || runuser -u munge -- /usr/sbin/munged --force \
        || die "munged failed to start"
    pid=$(wait_pidfile /run/munge/munged.pid munged 10) || die "munged did not write its pid file"
    echo "$pid" > "$RUN_DIR/munged.pid"; started+=("munged=$pid")
    for _ in $(seq 1 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null | unmunge >/dev/null || die "munge round trip failed"
fi

install -d -o slurm -g slurm -m 0755 /var/lib/slurm/slurmctld /var/log/slurm /run/slurm
install -d -m 0755 /var/lib/slurm/slurmd
touch /var/log/slurm/jobcomp.log && chown slurm:slurm /var/log/slurm/jobcomp.log

# ------------------------------------------------------------------ 4. slurmctld
if ! pid_alive slurmctld slurmctld; then
    # a slurmd that outlived its controller re-registers only after a ping delay, and
    # after "slurmctld -c" job IDs can repeat, which slurmd's saved credential state
    # would reject ("Job credential revoked"): restart slurmd from a clean spool too
    stop_recorded slurmd slurmd
    rm -f /var/lib/slurm/slurmd/cred_state /var/lib/slurm/slurmd/cred_state.old /run/slurm/slurmctld.pid
    # -c: clean state (no old jobs, no stale DRAIN/INVAL node state)
    /usr/sbin/slurmctld -c || die "slurmctld failed to start"
    pid=$(wait_pidfile /run/slurm/slurmctld.pid slurmctld 15) || die "slurmctld did not come up"
    echo "$pid" > "$RUN_DIR/slurmctld.pid"; started+=("slurmctld=$pid")
fi
for _ in $(seq 1 150); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"

# ------------------------------------------------------------------ 5. slurmd
if ! pid_alive slurmd slurmd; then
    rm -f /run/slurm/slurmd.pid
    /usr/sbin/slurmd || die "slurmd failed to start"
    pid=$(wait_pidfile /run/slurm/slurmd.pid slurmd 15) || die "slurmd did not come up"
    echo "$pid" > "$RUN_DIR/slurmd.pid"; started+=("slurmd=$pid")
fi

# ------------------------------------------------------------------ 6. wait for the node
state=""; resumed=0
deadline=$(( $(date +%s) + TIMEOUT ))
while (( $(date +%s) < deadline )); do
    state=$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        drain*|inval*)
            if (( !resumed )); then
                log "node is $state ($(sinfo -h -n "$NODE" -o '%E')), trying to resume"
                scontrol update nodename="$NODE" state=resume 2>/dev/null || true
                resumed=1
            fi ;;
    esac
    sleep 0.2
done
case "$state" in
    idle|mixed|allocated|completing) ;;
    *) die "node $NODE not usable after ${TIMEOUT}s: state='$state' reason='$(sinfo -h -n "$NODE" -o '%E' 2>/dev/null)'" ;;
esac

sinfo >&2
log "up in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}")s; node $NODE is $state"
if (( ${#started[@]} )); then
    echo "started: ${started[*]}"
else
    echo "already running: munged=$(recorded_pid munged) slurmctld=$(recorded_pid slurmctld) slurmd=$(recorded_pid slurmd)"
fi
