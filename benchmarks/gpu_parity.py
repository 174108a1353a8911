"""Does the accelerator compute the same training as the CPU?

  python benchmarks/gpu_parity.py [--config tiny] [--steps 3]

Runs the real train step (all five objectives, AdamW) for --steps steps on the
same synthetic batch, once on the host CPU in float32 with XLA attention (the
reference) and once per variant on the default backend: float32 and bfloat16
with XLA attention, and bfloat16 with cuDNN attention where the backend is a
GPU. It prints each variant's largest relative difference from the reference
over every task's loss and the gradient norm at every step, against its
tolerance. On GPU, float32 matmuls may run as TF32, hence 1e-2 for float32
(bfloat16: 5e-2).
The last line is `parity_max_relative_difference: <value>` over all variants.
It exits non-zero if any variant is out of tolerance.
"""

import argparse
import sys

import jax
import numpy as np

from item_jax.model import model_config
from item_jax.objectives import ObjectiveConfig
from item_jax.train.optimizer import OptimizerConfig
from train_step import build_step, synthetic_batch, synthetic_tokens

TOLERANCE = {"fp32": 1e-2, "bf16": 5e-2}
SIZES = {"tiny": dict(image_size=64, patch_size=8, title_len=24, vocab_size=1000, batch=16),
         "small": dict(image_size=224, patch_size=16, title_len=40, vocab_size=30522, batch=8)}


def run(device, name: str, dtype: str, attention: str, steps: int) -> list[dict]:
  """Each step's metrics (floats) for one variant on one device."""
  sizes = SIZES[name]
  config = model_config(name, vocab_size=sizes["vocab_size"], image_size=sizes["image_size"],
                        patch_size=sizes["patch_size"], dropout_rate=0.0,
                        dtype="bfloat16" if dtype == "bf16" else "float32",
                        attention_implementation=attention)
  step, state, batch = build_step(
      config, OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=100),
      ObjectiveConfig(), synthetic_tokens(sizes["vocab_size"]),
      synthetic_batch(sizes["batch"], sizes["title_len"], sizes["image_size"],
                      sizes["vocab_size"]), devices=[device])
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append({key: float(value) for key, value in jax.device_get(metrics).items()})
  return history


def largest_difference(history: list[dict], reference: list[dict]) -> tuple[float, str]:
  worst, where = 0.0, ""
  for number, (got, want) in enumerate(zip(history, reference), start=1):
    for key in want:
      if key.endswith("accuracy") or key not in got:
        continue
      difference = abs(got[key] - want[key]) / max(abs(want[key]), 1e-6)
      if difference > worst:
        worst, where = difference, f"{key} at step {number}"
  return worst, where


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny", choices=sorted(SIZES))
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()

  device = jax.devices()[0]
  reference = run(jax.devices("cpu")[0], args.config, "fp32", "xla", args.steps)
  variants = [("fp32", "xla"), ("bf16", "xla")]
  if device.platform == "gpu":
    variants.append(("bf16", "cudnn"))
  print(f"reference: CPU float32; variants on {device.device_kind} ({device.platform})")
  worst_overall, failed = 0.0, False
  for dtype, attention in variants:
    try:
      history = run(device, args.config, dtype, attention, args.steps)
    except Exception as error:  # a variant the backend cannot run is reported, not fatal
      print(f"{dtype} {attention}: failed: {type(error).__name__}: {str(error)[:300]}")
      failed = True
      continue
    worst, where = largest_difference(history, reference)
    ok = worst <= TOLERANCE[dtype]
    failed |= not ok
    worst_overall = max(worst_overall, worst)
    print(f"{dtype} {attention}: largest relative difference {worst:.2e} ({where}); "
          f"tolerance {TOLERANCE[dtype]:.0e}: {'ok' if ok else 'OUT OF TOLERANCE'}; "
          f"loss at step {args.steps}: {history[-1]['loss']:.4f} "
          f"(reference {reference[-1]['loss']:.4f})")
  print(f"parity_max_relative_difference: {worst_overall:.3e}")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
