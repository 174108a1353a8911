#!/usr/bin/env bash
# Integration test of launch/slurm_gpu.sbatch on a real (one-node, localhost)
# SLURM cluster, on the CPU: too heavy for the unit tests (a few minutes on 2
# cores). Run it as root from the repository root, in the project's venv:
#
#   tests/integration/test_slurm.sh
#
# 1. `sbatch launch/slurm_gpu.sbatch` with 2 tasks trains the tiny config as
#    2 JAX processes (jax.distributed.initialize() from SLURM's environment).
# 2. Once it has written a checkpoint, the batch script gets USR1 (what
#    `--signal=B:USR1@300` sends before the time limit): the processes save a
#    checkpoint and exit 0, the job requeues itself and resumes to the end.
# 3. A second sbatch with more steps resumes from the last checkpoint.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
root=${ITEM_JAX_SLURM_TEST_DIR:-/tmp/item-jax-slurm-test}
cluster="${root}/cluster"
workdir="${root}/workdir"
data="${root}/prepared"
cd "${repo}"
command -v item-jax > /dev/null || { echo "activate the project's venv first" >&2; exit 1; }

log() { echo "[test_slurm $(date +%T)] $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

rm -rf "${workdir}" "${cluster}"
mkdir -p "${root}"
if [ ! -f "${data}/dataset.json" ]; then
  log "preparing the data"
  item-jax synth --output "${root}/catalogue" --num-products 40 --workers 1
  item-jax prepare --catalogue "${root}/catalogue/catalogue.csv" \
    --images "${root}/catalogue/images" --output "${data}" --vocab-size 300 --workers 1
fi

log "starting SLURM"
tests/integration/slurm_cluster.sh start "${cluster}"
trap 'tests/integration/slurm_cluster.sh stop "${cluster}"' EXIT
export SLURM_CONF="${cluster}/slurm.conf"

# What the job needs from this environment (sbatch exports it to the job).
export ITEM_JAX_CONFIG=configs/item_tiny.py:runlocal
export ITEM_JAX_WORKDIR="${workdir}"
export ITEM_JAX_DATA="${data}"
export ITEM_JAX_VENV="${VIRTUAL_ENV:-}"
export JAX_PLATFORMS=cpu
tiny=(--config.model.image_size=32 --config.model.patch_size=8
  --config.global_batch_size=8 --config.log_every_steps=10
  --config.checkpoint_every_steps=10)

submit() {  # $1: total steps; prints the job id
  sbatch --parsable --nodes=1 --ntasks-per-node=2 --gpus-per-node=2 \
    --cpus-per-task=1 --mem=0 --time=15 --output="${root}/job-%j.out" \
    launch/slurm_gpu.sbatch "${tiny[@]}" "--config.total_steps=$1"
}

job_state() {
  scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'
}

restarts() {
  scontrol show job "$1" 2>/dev/null | sed -n 's/.*Restarts=\([0-9]*\).*/\1/p'
}

wait_for() {  # $1: seconds, $2: what; the rest: a command that succeeds when done
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    [ "${SECONDS}" -lt "${deadline}" ] || fail "timed out waiting for ${what}"
    sleep 1
  done
}

finished() {  # $1: job id
  local state
  state=$(job_state "$1")
  case "${state}" in
    COMPLETED) return 0 ;;
    FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE)
      cat "${root}/job-$1.out" >&2
      fail "job $1 ended ${state}" ;;
    *) return 1 ;;
  esac
}

checkpoint_exists() { [ -d "${workdir}/checkpoints/$1" ]; }
requeued() { [ "$(restarts "$1")" -ge 1 ] 2>/dev/null; }

started=${SECONDS}
log "job 1: 200 steps, stopped by USR1 after its first checkpoint"
job=$(submit 200)
wait_for 300 "job ${job}'s first checkpoint" checkpoint_exists 10
scancel --batch --signal=USR1 "${job}"
wait_for 120 "job ${job} to requeue itself" requeued "${job}"
# Requeued jobs wait for their begin time; release it now.
scontrol update JobId="${job}" StartTime=now > /dev/null 2>&1 || true
wait_for 600 "job ${job} to finish after its restart" finished "${job}"
out="${root}/job-${job}.out"
grep -q "stop requested (requeue=1)" "${out}" || fail "no stop request in ${out}"
grep -q "requeueing job ${job}" "${out}" || fail "no requeue in ${out}"
grep -q "stopping at step" "${out}" || fail "training did not stop at a step"
grep -q "restart 1" "${out}" || fail "the job did not run again"
grep -q "checkpoint: restored step" "${out}" || fail "the restart did not resume"
checkpoint_exists 200 || fail "no final checkpoint 200"
stopped=$(sed -n 's/.*stopping at step \([0-9]*\).*/\1/p' "${out}" | head -n 1)
log "job ${job}: stopped at step ${stopped}, requeued, resumed and finished 200 steps"

log "job 2: resume to 220 steps"
job2=$(submit 220)
wait_for 600 "job ${job2}" finished "${job2}"
out2="${root}/job-${job2}.out"
grep -q "checkpoint: restored step 200" "${out2}" || fail "job ${job2} did not resume from 200"
checkpoint_exists 220 || fail "no checkpoint 220"
processes=$(grep -c "processes, 2 GPUs per node" "${out2}" || true)
[ "${processes}" -ge 1 ] || fail "job ${job2} did not run 2 processes"
log "job ${job2}: resumed from step 200 and finished 220 steps"
log "PASSED in $((SECONDS - started)) s (logs: ${root}/job-*.out)"
