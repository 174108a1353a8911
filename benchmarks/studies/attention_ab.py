"""The step with our attention and GELU against `jax.nn`'s, in one process.

  python benchmarks/studies/attention_ab.py --config tiny [--rounds 10 --steps 5]

Builds benchmarks/train_step.py's step twice for the same model and batch as
benchmarks/torch_vs_jax.py: once as the model is (`item_jax.model.layers.
attention`, plain XLA ops with a hand-written backward; GELU written with erf),
once with `jax.nn.dot_product_attention` (its XLA path, differentiated by JAX)
and `jax.nn.gelu(approximate=False)`. Checks that both give the same first-step
losses and gradient norm, then times them in alternating turns of --steps
steps, so that a shared machine's changing load falls on both alike: run-to-run
noise on a small shared CPU is larger than the difference between separate runs.
The last line is `jax_nn_over_ours_<config>: <median ms with jax.nn / ours>`.
"""

import argparse
import pathlib
import statistics
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/
import torch_vs_jax
import train_step as jax_bench
from item_jax.model import layers, model_config
from item_jax.model import item as item_module
from item_jax.objectives import ObjectiveConfig
from item_jax.train.optimizer import OptimizerConfig


def _jax_nn_attention(query, key, value, key_mask, implementation=None):
  return jax.nn.dot_product_attention(query, key, value,
                                      mask=key_mask[:, None, None, :],
                                      implementation=implementation)


def _jax_nn_gelu(x):
  return jax.nn.gelu(x, approximate=False)


def build(name: str, sizes: dict, attention, gelu):
  """The compiled step, its state and batch, with `attention` and `gelu` in
  the model (both are looked up when the step is traced)."""
  saved = layers.attention, layers.gelu, item_module.gelu
  layers.attention, layers.gelu, item_module.gelu = attention, gelu, gelu
  try:
    config = model_config(name, vocab_size=sizes["vocab_size"],
                          image_size=sizes["image_size"],
                          patch_size=sizes["patch_size"], dropout_rate=0.0)
    optimizer = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=100_000)
    local_batch = jax_bench.synthetic_batch(sizes["batch"], sizes["title_len"],
                                            sizes["image_size"], sizes["vocab_size"])
    step, state, batch = jax_bench.build_step(
        config, optimizer, ObjectiveConfig(),
        jax_bench.synthetic_tokens(sizes["vocab_size"]), local_batch)
    return step.lower(state, batch).compile(), state, batch
  finally:
    layers.attention, layers.gelu, item_module.gelu = saved


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny", choices=sorted(torch_vs_jax.CONFIG_DEFAULTS))
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()
  sizes = torch_vs_jax.CONFIG_DEFAULTS[args.config]
  runs = {"ours": build(args.config, sizes, layers.attention, layers.gelu),
          "jax.nn": build(args.config, sizes, _jax_nn_attention, _jax_nn_gelu)}
  first = {}
  for label, (compiled, state, batch) in runs.items():
    state, metrics = compiled(state, batch)
    first[label] = {name: float(metrics[name]) for name in ("loss", "grad_norm")}
    state, _ = jax_bench.time_steps(compiled, state, batch, args.warmup)
    runs[label] = (compiled, state, batch)
    print(f"{label:7s} first step: loss {first[label]['loss']:.6f}, "
          f"grad norm {first[label]['grad_norm']:.6f}")
  for name in ("loss", "grad_norm"):
    np.testing.assert_allclose(first["ours"][name], first["jax.nn"][name], rtol=1e-5,
                               err_msg=name)
  times = {label: [] for label in runs}
  for _ in range(args.rounds):
    for label, (compiled, state, batch) in runs.items():
      state, seconds = jax_bench.time_steps(compiled, state, batch, args.steps)
      runs[label] = (compiled, state, batch)
      times[label] += seconds
  medians = {label: statistics.median(values) * 1e3 for label, values in times.items()}
  for label, values in times.items():
    print(f"{label:7s} step: median {medians[label]:.1f} ms (min {min(values) * 1e3:.1f}) "
          f"of {len(values)}")
  print(f"jax_nn_over_ours_{args.config}: {medians['jax.nn'] / medians['ours']:.3f}")


if __name__ == "__main__":
  main()
