"""What the frozen MobileNetV2 stem costs a training step, with photos and
without (a titles-only catalogue such as abt_buy), against the patch
embedding, and against reading the stem's cells from a per-listing cache
(`data.stem_cells="cached"`), in alternating turns in one process.

  python benchmarks/studies/stem_cost.py --layers 6 --hidden 384 --mlp 1536 \
      --batch 32 --image-size 64 --patch-size 16

The model is `configs/item_catalogue.py`'s shape (all-MiniLM-L6-v2's: 6
layers, 384 wide) with its tasks (ITC title:image, joint:title, joint:image
+ MLM + GMLM), the real jitted step (`benchmarks/train_step.py`'s
build_step) on random weights and a synthetic batch of 32-token titles;
"without photos" marks every listing `has_image=False`, as `prepare
--modalities any` writes a title-only catalogue. The stem runs only for a
batch with a photo (`Embeddings.image_tokens_input`). The last line is
`stem_over_patches_step_time_without_photos: <ratio>`.
"""

import argparse
import pathlib
import statistics
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/
from train_step import build_step, synthetic_batch, synthetic_tokens, time_steps

from item_jax.model import ModelConfig
from item_jax.objectives import ObjectiveConfig
from item_jax.train.optimizer import OptimizerConfig


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--hidden", type=int, default=384)
  parser.add_argument("--heads", type=int, default=12)
  parser.add_argument("--mlp", type=int, default=1536)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--title-len", type=int, default=32)
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--patch-size", type=int, default=16)
  parser.add_argument("--vocab-size", type=int, default=30522)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--turns", type=int, default=3)
  args = parser.parse_args()
  objectives = ObjectiveConfig(itm_weight=0.0, mim_weight=0.0, gmim_weight=0.0,
                               itc_weight=1.0,
                               itc_pairs="title:image,joint:title,joint:image")
  batch = synthetic_batch(args.batch, args.title_len, args.image_size, args.vocab_size)
  runs = {}
  for stem in ("patches", "mobilenet_v2", "cached cells"):
    config = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                         num_heads=args.heads, mlp_dim=args.mlp,
                         vocab_size=args.vocab_size, image_size=args.image_size,
                         patch_size=args.patch_size,
                         image_stem="patches" if stem == "patches" else "mobilenet_v2")
    for photos in (True, False) if stem != "cached cells" else (True,):
      local = dict(batch, has_image=np.full(args.batch, photos))
      if stem == "cached cells":
        # data.stem_cells="cached": the step reads the stem's cells.
        local.pop("image")
        local["image_cells"] = np.random.default_rng(0).uniform(
            0, 6, (args.batch, config.num_patches, config.image_token_input_dim)
        ).astype(np.float32)
      step, state, placed = build_step(
          config, OptimizerConfig(learning_rate=1e-4, warmup_steps=10,
                                  total_steps=1000),
          objectives, synthetic_tokens(args.vocab_size), local)
      compiled = step.lower(state, placed).compile()
      state, _ = time_steps(compiled, state, placed, 1)   # warm-up
      runs[(stem, photos)] = [compiled, state, placed, []]
  for _ in range(args.turns):
    for run in runs.values():
      run[1], times = time_steps(run[0], run[1], run[2], args.steps)
      run[3].extend(times)
  median = {key: statistics.median(run[3]) for key, run in runs.items()}
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; {args.layers} "
        f"layers x {args.hidden}, batch {args.batch}, {args.image_size} px, "
        f"median of {args.turns} x {args.steps} steps each")
  for (stem, photos), seconds in median.items():
    print(f"{stem:>13}, {'with' if photos else 'without'} photos: "
          f"{seconds:.3f} s/step")
  print(f"stem_in_step_over_cached_cells_step_time: "
        f"{median[('mobilenet_v2', True)] / median[('cached cells', True)]:.3f}")
  ratio = median[("mobilenet_v2", False)] / median[("patches", False)]
  print(f"stem_over_patches_step_time_without_photos: {ratio:.3f}")


if __name__ == "__main__":
  main()
