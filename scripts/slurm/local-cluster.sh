#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian's slurm-wlm and munge), for the cluster tests and for
# trying scripts/slurm/train.sbatch. Needs root; installs the packages on first use.
#
#   scripts/slurm/local-cluster.sh start    # prints the SLURM_CONF to export for sbatch, squeue, scontrol
#   scripts/slurm/local-cluster.sh stop
#   scripts/slurm/local-cluster.sh status
set -euo pipefail
STATE=${DISTRAIN_SLURM_DIR:-/tmp/distrain-slurm}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
}

write_conf() {
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  mkdir -p "$STATE"/spool/ctld "$STATE"/spool/d "$STATE"/log "$STATE"/run
  cat > "$CONF" <<CONF
ClusterName=distrain-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmdSpoolDir=$STATE/spool/d
StateSaveLocation=$STATE/spool/ctld
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SchedulerType=sched/backfill
MpiDefault=none
KillWait=30
InactiveLimit=0
MinJobAge=300
JobRequeue=1
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then
      runuser -u munge -- munged
    else
      munged --force
    fi
  fi
}

# Stop the daemons and job steps; those that do not leave in 10 s are killed.
stop_daemons() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -f '^slurmstepd' 2>/dev/null || true
  for _ in $(seq 20); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.5; done
  pkill -9 -x slurmd 2>/dev/null || true
  pkill -9 -x slurmctld 2>/dev/null || true
  pkill -9 -f '^slurmstepd' 2>/dev/null || true
  for _ in $(seq 20); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.25; done
}

# Whether each running daemon is this cluster's (its pid in this state dir): another cluster's daemons, e.g. left
# by a killed test run, would serve another slurm.conf, and the node would never come up here.
ours() {
  for daemon in slurmctld slurmd; do
    pgrep -x "$daemon" >/dev/null || continue
    [ "$(pgrep -x "$daemon")" = "$(cat "$STATE/run/$daemon.pid" 2>/dev/null)" ] || return 1
  done
}

case "${1:-}" in
  start)
    install
    start_munge
    write_conf
    ours || stop_daemons
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
      if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "SLURM is up: export SLURM_CONF=$CONF"
        exit 0
      fi
      sleep 1
    done
    echo "SLURM did not come up; see $STATE/log" >&2
    exit 1
    ;;
  stop)
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    stop_daemons
    pkill -x munged 2>/dev/null || true  # started by `start` (this machine has no other user of munge)
    echo "SLURM and munge stopped (state kept in $STATE)"
    ;;
  status)
    sinfo && squeue
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
