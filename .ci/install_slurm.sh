#!/usr/bin/env bash
# Bring up a one-node, CPU-only Slurm cluster on this machine for tests/slurm/.
#
# Idempotent: installs slurm-wlm + munge with apt only when missing, writes the configs only
# when they differ, and starts munged / slurmctld / slurmd only when they are not running.
# Everything runs as root (CI and the dev machines are containers without systemd and without
# usable cgroups, hence proctrack/linuxproc, task/none and no cgroup plugin).
# Never fails the caller: when something cannot be done it says why and exits 0, and the Slurm
# tests skip because `sinfo` does not show an idle node.
#
# Usage: bash .ci/install_slurm.sh            (CI: `bash .ci/install_slurm.sh || true`)
#        MEGAMOE_SLURM_RESTART=1 bash ...     restart the daemons (after a config change)

set -u

log() { echo "install_slurm: $*"; }
give_up() { log "$* -- Slurm tests will be skipped"; exit 0; }

[ "$(id -u)" = 0 ] || give_up "needs root (apt-get, daemons)"

SLURM_ETC=/etc/slurm
NODE=$(hostname -s 2>/dev/null || hostname)

# ------------------------------------------------------------------------------------ packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || give_up "no apt-get to install slurm-wlm"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts must not try to start services (no init system in a container).
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    created_policy=1
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
        > /tmp/install_slurm_apt.log 2>&1
    rc=$?
    [ "${created_policy:-0}" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $rc = 0 ] || { tail -5 /tmp/install_slurm_apt.log; give_up "apt-get install failed"; }
fi

# --------------------------------------------------------------------------------------- munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
id munge >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key

# ---------------------------------------------------------------------------------- slurm.conf
mkdir -p "$SLURM_ETC" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
# The node's real CPU count and memory; slurmd refuses a node whose config overstates them.
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

NEW_CONF=$(cat <<EOF
# Written by .ci/install_slurm.sh: one node, CPU only, no accounting, no cgroups.
ClusterName=megamoe-ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Step credentials live 10 s (default 120); this is also how long a requeued job waits before it
# may start again, which the requeue test would otherwise spend idle.
AuthInfo=cred_expire=10
CryptoType=crypto/munge
MpiDefault=none
# Containers have no writable cgroup hierarchy: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Tiny cluster: schedule every 2 s, so a requeued job starts right after cred_expire instead of
# at the next 30 s backfill / 60 s main-loop pass.
SchedulerParameters=bf_interval=2,sched_interval=2
# Requeued jobs may start again at once (the default waits before they are eligible).
JobRequeue=1
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=30
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
# cgroup.conf: read by slurmd even when no cgroup plugin is used; keep it inert.
NEW_CGROUP=$(cat <<EOF
# Written by .ci/install_slurm.sh: no cgroup enforcement (container).
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
)

changed=0
write_if_changed() {  # path content
    if [ ! -f "$1" ] || [ "$(cat "$1")" != "$2" ]; then
        printf '%s\n' "$2" > "$1"
        changed=1
    fi
}
write_if_changed "$SLURM_ETC/slurm.conf" "$NEW_CONF"
write_if_changed "$SLURM_ETC/cgroup.conf" "$NEW_CGROUP"

# ------------------------------------------------------------------------------------- daemons
running() { pgrep -x "$1" >/dev/null 2>&1; }
stop_daemon() {  # name pidfile
    local pid
    pid=$(cat "$2" 2>/dev/null || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    for _ in $(seq 20); do running "$1" || return 0; sleep 0.5; done
}
if [ "$changed" = 1 ] || [ "${MEGAMOE_SLURM_RESTART:-0}" = 1 ]; then
    stop_daemon slurmd /run/slurm/slurmd.pid
    stop_daemon slurmctld /run/slurm/slurmctld.pid
fi

if ! running munged; then
    log "starting munged"
    # munged refuses to run as root; run it as its own user.
    runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force \
        || give_up "munged did not start"
fi
for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || give_up "munge does not work"

if ! running slurmctld; then
    log "starting slurmctld"
    slurmctld || give_up "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
fi
if ! running slurmd; then
    log "starting slurmd"
    slurmd || give_up "slurmd did not start (see /var/log/slurm/slurmd.log)"
fi

# ------------------------------------------------------------------------------- wait for idle
for _ in $(seq 60); do
    state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1)
    case "$state" in
        idle|mix|alloc) log "cluster up: node $NODE is $state"; exit 0 ;;
        down*|drain*|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 1
done
give_up "node $NODE did not become idle (state '${state:-?}'; see /var/log/slurm/)"
