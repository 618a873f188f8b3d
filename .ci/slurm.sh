#!/usr/bin/env bash
# A one-node SLURM on this machine for the launcher tests.
#   bash .ci/slurm.sh start   install slurm-wlm + munge if missing, configure, start the daemons
#   bash .ci/slurm.sh stop    cancel every job, stop slurmd, slurmctld and munged (nothing left running)
#   bash .ci/slurm.sh status  sinfo / squeue
# State, spool, pid and log files live in $VIRTEX_SLURM_DIR (default /tmp/virtex-slurm).
# It refuses to overwrite an /etc/slurm/slurm.conf that it did not write.
set -euo pipefail

DIR=${VIRTEX_SLURM_DIR:-/tmp/virtex-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by virtex .ci/slurm.sh"
PARTITION=${VIRTEX_SLURM_PARTITION:-debug}

log() { echo "slurm.sh: $*"; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

wait_gone() {  # wait_gone PIDFILE SECONDS
    local i
    for ((i = 0; i < $2 * 10; i++)); do alive "$1" || return 0; sleep 0.1; done
    return 1
}

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq slurm-wlm munge >/dev/null
}

configure() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        echo "slurm.sh: $CONF exists and was not written by this script: not touching it" >&2
        exit 1
    fi
    mkdir -p "$DIR"/{state,spool,log} /etc/slurm
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)  # MB, below the machine's
    cat >"$CONF" <<EOF
$MARK
ClusterName=virtex-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# test-sized timings: a requeued job may start again after cred_expire seconds (default 120),
# and pending jobs are looked at every second rather than every minute
SchedulerParameters=sched_interval=1,bf_interval=1
AuthInfo=cred_expire=5
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi  # already answering
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown -R munge:munge /etc/munge
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged.ours"
    local i
    for ((i = 0; i < 50; i++)); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    echo "slurm.sh: munged did not start" >&2
    exit 1
}

start() {
    install
    mkdir -p "$DIR"
    configure
    start_munge
    if ! alive "$DIR/slurmctld.pid"; then
        rm -rf "$DIR/state" "$DIR/spool" && mkdir -p "$DIR/state" "$DIR/spool"  # no jobs from before
        slurmctld
    fi
    alive "$DIR/slurmd.pid" || slurmd
    local i state=""
    for ((i = 0; i < 300; i++)); do
        state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
        case "$state" in idle | mixed | allocated) break ;; esac
        sleep 0.1
    done
    case "$state" in
        idle | mixed | allocated) log "up: partition $PARTITION, node $(hostname -s) ($state)" ;;
        *)
            echo "slurm.sh: the node did not come up (state '$state'); logs in $DIR/log" >&2
            tail -n 20 "$DIR"/log/*.log >&2 || true
            exit 1
            ;;
    esac
}

stop() {
    if command -v squeue >/dev/null && alive "$DIR/slurmctld.pid"; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | sort -u || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs || true
            local i
            for ((i = 0; i < 300; i++)); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
        fi
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    local name
    for name in slurmd slurmctld; do
        if alive "$DIR/$name.pid"; then
            wait_gone "$DIR/$name.pid" 10 || kill "$(cat "$DIR/$name.pid")" 2>/dev/null || true
            wait_gone "$DIR/$name.pid" 10 || kill -9 "$(cat "$DIR/$name.pid")" 2>/dev/null || true
        fi
    done
    if [ -f "$DIR/munged.ours" ] && alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid 2>/dev/null)" 2>/dev/null || true
        wait_gone /run/munge/munged.pid 10 || true
    fi
    rm -f "$DIR/munged.ours"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo && squeue ;;
    *) echo "usage: bash .ci/slurm.sh start|stop|status" >&2; exit 2 ;;
esac
