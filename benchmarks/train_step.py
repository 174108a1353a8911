"""Times the real pre-training step (all five objectives) on this machine's devices.

  python benchmarks/train_step.py --config base --dtype bf16 --remat none
  python benchmarks/train_step.py --config tiny --batch 64

Prints compile time, the median step time over --steps timed steps after
warm-up (device-synchronised), examples/s, XLA's FLOP count for the compiled
step, the analytic count, MFU against the device's peak, and peak memory.
The last line is `train_step_examples_per_s: <value>`.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from item_jax.model import model_config
from item_jax.objectives import ObjectiveConfig, TokenSpec
from item_jax.objectives.flops import training_flops_per_example
from item_jax.train import sharding
from item_jax.train.optimizer import OptimizerConfig, make_optimizer
from item_jax.train.step import make_train_step

# Dense bf16 peak FLOP/s per chip (fp32 runs are measured against the same peak).
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}
DEFAULT_BATCH = {"tiny": 64, "small": 32, "base": 32, "large": 16}


def synthetic_batch(batch: int, title_len: int, image_size: int, vocab: int):
  rng = np.random.default_rng(0)
  title_ids = rng.integers(5, vocab, (batch, title_len)).astype(np.int32)
  title_ids[:, -1] = 3
  return {"title_ids": title_ids,
          "image": rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
          "valid": np.ones(batch, bool),
          "index": np.arange(batch, dtype=np.int32)}


def synthetic_tokens(vocab: int) -> TokenSpec:
  """The synthetic batch's special ids: 0-4, [SEP] 3, [MASK] 4."""
  return TokenSpec(vocab, 4, (0, 1, 2, 3, 4))


def build_step(config, optimizer_config: OptimizerConfig,
               objectives: ObjectiveConfig, tokens: TokenSpec, local_batch: dict,
               seed: int = 0, devices=None):
  """(jitted step, fresh state, batch on device): the step as training runs
  it, data parallel over `devices` (default: all)."""
  optimizer = make_optimizer(optimizer_config)
  devices = jax.devices() if devices is None else devices
  mesh = sharding.make_mesh({"data": len(devices), "fsdp": 1, "model": 1}, devices)
  graphdef, state, state_shardings = sharding.create_train_state(
      config, optimizer, mesh, seed=seed)
  step = sharding.jit_train_step(
      make_train_step(graphdef, optimizer, objectives, tokens, seed=seed),
      state_shardings, mesh)
  return step, state, sharding.global_batch(local_batch, mesh)


def time_steps(compiled, state, batch, steps: int):
  """(state, seconds of each step): device-synchronised after every step."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return state, times


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny", choices=sorted(DEFAULT_BATCH))
  parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
  parser.add_argument("--remat", default="none", choices=["none", "block", "full"])
  parser.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
  parser.add_argument("--batch", type=int, default=None, help="global batch")
  parser.add_argument("--title-len", type=int, default=40)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--vocab-size", type=int, default=30522)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the device's peak, when it is not in the table")
  args = parser.parse_args()

  config = model_config(
      args.config, vocab_size=args.vocab_size, image_size=args.image_size,
      dtype="bfloat16" if args.dtype == "bf16" else "float32",
      remat=args.remat, attention_implementation=args.attention)
  batch_size = args.batch or DEFAULT_BATCH[args.config] * jax.device_count()
  objectives = ObjectiveConfig()
  device = jax.devices()[0]
  print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform})")
  print(f"model: {args.config}, dtype {args.dtype}, remat {args.remat}, "
        f"attention {args.attention}, global batch {batch_size}, title "
        f"{args.title_len} tokens, image {args.image_size} px", flush=True)
  start = time.perf_counter()
  step, state, batch = build_step(
      config, OptimizerConfig(learning_rate=1e-4, warmup_steps=10, total_steps=1000),
      objectives, synthetic_tokens(args.vocab_size),
      synthetic_batch(batch_size, args.title_len, args.image_size, args.vocab_size))
  jax.block_until_ready(state)
  print(f"state initialised: {time.perf_counter() - start:.1f} s", flush=True)

  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  print(f"compile: {compile_seconds:.1f} s", flush=True)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0))
  analytic = training_flops_per_example(config, args.title_len, objectives)["total"]

  state, _ = time_steps(compiled, state, batch, args.warmup)
  state, times = time_steps(compiled, state, batch, args.steps)
  step_seconds = statistics.median(times)
  examples_per_second = batch_size / step_seconds

  peak = (args.peak_tflops * 1e12 if args.peak_tflops
          else PEAK_FLOPS.get(device.device_kind))
  memory = compiled.memory_analysis()
  print(f"step: {step_seconds * 1e3:.1f} ms median of {args.steps} "
        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
  print(f"analytic FLOPs per step: {analytic * batch_size:.4g}")
  print(f"XLA FLOPs per step: {xla_flops:.4g} (ratio to analytic "
        f"{xla_flops / (analytic * batch_size):.3f}; per device when sharded)")
  if peak:
    mfu = analytic * examples_per_second / (peak * jax.device_count())
    print(f"MFU: {100 * mfu:.1f} % of {peak / 1e12:.0f} TFLOP/s per device")
  else:
    print("MFU: n/a (no peak known for this device; pass --peak-tflops)")
  if memory is not None:
    print(f"memory per device: arguments {memory.argument_size_in_bytes / 2**20:.0f} MiB, "
          f"temporaries {memory.temp_size_in_bytes / 2**20:.0f} MiB")
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    print(f"peak memory in use: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
  print(f"train_step_examples_per_s: {examples_per_second:.2f}")


if __name__ == "__main__":
  main()
