"""MobileNetV2's depthwise convolutions on CPU: XLA's grouped convolution
against the sums of shifted copies `item_jax.model.mobilenet` uses there, in
alternating turns in one process.

  python benchmarks/studies/depthwise_cpu.py --image-size 224 --stride 32 --batch 32

Times the network (`run_blocks`, random weights) cut at `--stride` on a
batch of random photos, forward only (a frozen stem, evaluation and the
MobileNetV2 baseline) and forward + backward (a stem that learns), and
checks that both ways give the same cells. The last line is
`depthwise_shifts_speedup_forward: <conv time / shifts time>`.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from item_jax.model import mobilenet


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--stride", type=int, default=32)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--turns", type=int, default=3)
  args = parser.parse_args()
  blocks = mobilenet.stem_architecture(args.stride)
  # The stem's own fresh (fan-in normal) weights: the timing does not
  # depend on their values.
  params = mobilenet.MobileNetStem(args.stride, rngs=nnx.Rngs(0)).weights()
  images = jnp.asarray(np.random.default_rng(1).normal(
      size=(args.batch, args.image_size, args.image_size, 3)), jnp.float32)
  runs = {}
  for way in ("conv", "shifts"):
    forward = jax.jit(lambda p, x, way=way: mobilenet.run_blocks(p, x, blocks, way))
    backward = jax.jit(jax.grad(
        lambda p, x, way=way: jnp.sum(mobilenet.run_blocks(p, x, blocks, way) ** 2)))
    runs[(way, "forward")] = forward
    runs[(way, "forward + backward")] = backward
  conv_cells = np.asarray(runs[("conv", "forward")](params, images))
  shift_cells = np.asarray(runs[("shifts", "forward")](params, images))
  error = np.abs(conv_cells - shift_cells).max() / np.abs(conv_cells).max()
  for fn in runs.values():
    jax.block_until_ready(fn(params, images))  # compile
  times = {key: [] for key in runs}
  for _ in range(args.turns):
    for key, fn in runs.items():
      for _ in range(args.repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(params, images))
        times[key].append(time.perf_counter() - started)
  median = {key: statistics.median(values) for key, values in times.items()}
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; MobileNetV2 to "
        f"stride {args.stride}, {args.batch} photos of {args.image_size} px; "
        f"median of {args.turns} x {args.repeats}; largest difference "
        f"{error:.1e} of the largest cell")
  for (way, what), seconds in median.items():
    print(f"{way:>6}, {what}: {seconds:.3f} s ({args.batch / seconds:.1f} photos/s)")
  for what in ("forward + backward", "forward"):
    print(f"depthwise_shifts_speedup_{what.replace(' + ', '_').replace(' ', '_')}: "
          f"{median[('conv', what)] / median[('shifts', what)]:.2f}")


if __name__ == "__main__":
  main()
