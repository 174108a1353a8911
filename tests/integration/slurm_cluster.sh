#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for the integration test: munged with
# its own key and socket, slurmctld and slurmd as root, no cgroups, 2 CPUs and
# 2 stand-in "GPUs" (so that launch/slurm_gpu.sbatch's --gpus-per-node is
# satisfiable; JAX runs on the CPU). Everything lives in one state folder.
#
#   tests/integration/slurm_cluster.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   tests/integration/slurm_cluster.sh stop DIR
#
# Needs Debian's slurm-wlm and munge (installed here when missing, as root).
set -euo pipefail

action=${1:?usage: slurm_cluster.sh start|stop DIR}
state=$(mkdir -p "${2:?usage: slurm_cluster.sh start|stop DIR}" && cd "$2" && pwd)
controller_port=${ITEM_JAX_SLURMCTLD_PORT:-16817}
node_port=${ITEM_JAX_SLURMD_PORT:-16818}
export SLURM_CONF="${state}/slurm.conf"

install_if_missing() {
  if command -v slurmctld > /dev/null && command -v slurmd > /dev/null \
      && command -v munged > /dev/null && command -v mungekey > /dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_cluster.sh: install slurm-wlm and munge first (as root)" >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
}

write_config() {
  mkdir -p "${state}/munge" "${state}/state" "${state}/spool" "${state}/log" \
    "${state}/dev"
  # Two stand-in GPU devices: character devices like /dev/null (SLURM only
  # counts and hands them out; nothing opens them).
  for gpu in 0 1; do
    [ -c "${state}/dev/gpu${gpu}" ] || mknod "${state}/dev/gpu${gpu}" c 1 3
  done
  cat > "${SLURM_CONF}" <<EOF
ClusterName=itemjax
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=${controller_port}
SlurmdPort=${node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${state}/munge/munge.socket
StateSaveLocation=${state}/state
SlurmdSpoolDir=${state}/spool
SlurmctldPidFile=${state}/slurmctld.pid
SlurmdPidFile=${state}/slurmd.pid
SlurmctldLogFile=${state}/log/slurmctld.log
SlurmdLogFile=${state}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MinJobAge=600
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=4096 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  echo "NodeName=localhost Name=gpu File=${state}/dev/gpu[0-1]" > "${state}/gres.conf"
}

wait_until() {  # $1: seconds; the rest: a command that succeeds when ready
  local deadline=$((SECONDS + $1))
  shift
  until "$@" > /dev/null 2>&1; do
    if [ "${SECONDS}" -ge "${deadline}" ]; then
      return 1
    fi
    sleep 1
  done
}

node_idle() {
  sinfo -h -N -o '%T' | grep -qx idle
}

start() {
  install_if_missing
  write_config
  if [ ! -f "${state}/munge/munge.key" ]; then
    mungekey --create --keyfile="${state}/munge/munge.key"
  fi
  chmod 400 "${state}/munge/munge.key"
  munged --force --socket="${state}/munge/munge.socket" \
    --key-file="${state}/munge/munge.key" --log-file="${state}/log/munged.log" \
    --pid-file="${state}/munge/munged.pid" --seed-file="${state}/munge/munged.seed"
  slurmctld -c
  slurmd -N localhost
  if ! wait_until 60 node_idle; then
    echo "slurm_cluster.sh: the node did not become idle; logs in ${state}/log" >&2
    sinfo -N -l >&2 || true
    exit 1
  fi
  echo "SLURM is up: export SLURM_CONF=${SLURM_CONF}"
}

stop_pid_file() {  # $1: a daemon's pid file
  if [ -f "$1" ]; then
    local pid
    pid=$(cat "$1")
    kill "${pid}" 2>/dev/null || true
    wait_until 30 bash -c "! kill -0 ${pid}" || kill -9 "${pid}" 2>/dev/null || true
    rm -f "$1"
  fi
}

stop() {
  scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  stop_pid_file "${state}/slurmd.pid"
  stop_pid_file "${state}/slurmctld.pid"
  stop_pid_file "${state}/munge/munged.pid"
}

case "${action}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
