#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one go: a parity check of the tiny step
# against the host CPU, then `base` train steps on one GPU.
#
#   bash benchmarks/gpu_suite.sh [LOG_DIR]
#
# Each variant runs benchmarks/train_step.py under its own time limit and
# writes LOG_DIR/<variant>.log; the summary (examples/s and MFU per variant)
# comes last. Variants run best-first, so a cut-short run still has the
# headline rows; each log shows how far its variant got (state initialised,
# compiled, timed). XLA_FLAGS from the environment apply to every variant.
set -u
cd "$(dirname "$0")/.." || exit 1
log_dir="${1:-/tmp/item-jax-gpu}"
mkdir -p "$log_dir"
# The checkout itself is importable, installed or not.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
python="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$python" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee "$log_dir/env.log"

run() {  # run NAME LIMIT_S ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name: train_step.py $*"
  timeout "$limit" "$python" benchmarks/train_step.py "$@" >"$log_dir/$name.log" 2>&1
  echo "   exit $? ($(grep -E '^(state|compile|step|MFU|peak memory)' "$log_dir/$name.log" | tr '\n' ';'))"
}

echo "== parity: tiny, 3 steps, against the host CPU"
timeout 120 "$python" benchmarks/gpu_parity.py --config tiny --steps 3 >"$log_dir/parity.log" 2>&1
echo "   exit $? ($(grep -E '^(fp32|bf16|parity)' "$log_dir/parity.log" | tr '\n' ';'))"

run base_bf16_cudnn_b256 240 --config base --dtype bf16 --attention cudnn --batch 256 --steps 20
run base_bf16_xla_b256 200 --config base --dtype bf16 --attention xla --batch 256 --steps 20
run base_bf16_cudnn_b512 200 --config base --dtype bf16 --attention cudnn --batch 512 --steps 20
run base_bf16_cudnn_b512_remat 160 --config base --dtype bf16 --attention cudnn --batch 512 --remat block --steps 20

echo "== summary (variant: examples/s, MFU)"
for f in "$log_dir"/base_*.log; do
  name=$(basename "$f" .log)
  echo "$name: $(grep -h '^train_step_examples_per_s' "$f" | cut -d' ' -f2) ex/s," \
       "$(grep -h '^MFU' "$f" | cut -d' ' -f2-3)"
  grep -q '^train_step_examples_per_s' "$f" || tail -n 5 "$f"
done
