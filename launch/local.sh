#!/usr/bin/env bash
# Train item-jax on this machine: one process, or N processes that talk to each
# other through a coordinator on localhost, the way a pod or a cluster runs
# them (debug multi-process behaviour on a laptop's CPU). See docs/LAUNCH.md.
#
#   launch/local.sh [--processes N] [--devices-per-process D] [--port P] [--dry-run] \
#       --config configs/item_tiny.py:runlocal --workdir runs/local \
#       --config.data.dir=runs/demo/prepared [--config.x=y ...]
#
# --devices-per-process D runs JAX on the CPU with D simulated devices per
# process (XLA_FLAGS=--xla_force_host_platform_device_count=D), so N x D devices
# make the mesh. Process 0 prints to the terminal; every process also logs to
# WORKDIR/logs/process-I.log. Ctrl-C (or TERM) reaches every process: each saves
# a checkpoint at its next step and exits; rerun the same command to resume.
set -euo pipefail

processes=1
devices_per_process=
port=
dry_run=0
train_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --processes) processes=$2; shift 2 ;;
    --devices-per-process) devices_per_process=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) train_args+=("$1"); shift ;;
  esac
done

workdir=
for ((i = 0; i < ${#train_args[@]}; i++)); do
  case "${train_args[i]}" in
    --workdir) workdir=${train_args[i + 1]:-} ;;
    --workdir=*) workdir=${train_args[i]#--workdir=} ;;
  esac
done
if [ -z "${workdir}" ]; then
  echo "local.sh: give item-jax train's --workdir" >&2
  exit 2
fi

python=${PYTHON:-python3}
environment=()
if [ -n "${devices_per_process}" ]; then
  environment+=(JAX_PLATFORMS=cpu
    "XLA_FLAGS=${XLA_FLAGS:+${XLA_FLAGS} }--xla_force_host_platform_device_count=${devices_per_process}")
fi

if [ "${processes}" -gt 1 ] && [ -z "${port}" ]; then
  port=$("${python}" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
train_command() {  # $1: process index; sets `command`
  command=(env "${environment[@]}" "${python}" -m item_jax train "${train_args[@]}")
  if [ "${processes}" -gt 1 ]; then
    command+=(--coordinator "localhost:${port}" --num-processes "${processes}"
      --process-id "$1")
  fi
}

if [ "${dry_run}" = 1 ]; then
  for ((i = 0; i < processes; i++)); do
    train_command "${i}"
    printf '%q ' "${command[@]}" | sed 's/ $/\n/'
  done
  exit 0
fi

mkdir -p "${workdir}/logs"
pids=()
# shellcheck disable=SC2317  # run by the trap below
stop_all() {
  echo "local.sh: stopping ${#pids[@]} process(es): each checkpoints first" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap stop_all INT TERM
for ((i = 0; i < processes; i++)); do
  train_command "${i}"
  log="${workdir}/logs/process-${i}.log"
  if [ "${i}" = 0 ]; then
    "${command[@]}" > >(tee -a "${log}") 2>&1 &
  else
    "${command[@]}" >> "${log}" 2>&1 &
  fi
  pids+=($!)
done

# A trapped signal interrupts `wait`: keep waiting until every process ended.
status=0
for pid in "${pids[@]}"; do
  while true; do
    if wait "${pid}"; then code=0; else code=$?; fi
    kill -0 "${pid}" 2>/dev/null || break
  done
  if [ "${code}" != 0 ] && [ "${status}" = 0 ]; then
    status=${code}
  fi
done
exit "${status}"
