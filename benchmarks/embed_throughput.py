"""Listings embedded per second: the jitted `Embedder` (the "both" view, the
one `item-jax embed` writes by default) on one host's devices, for model
sizes at the deployment geometry (224 px photos in 16 px patches, 32 title
tokens), random weights and inputs (the speed does not depend on either).

  python benchmarks/embed_throughput.py --sizes tiny,small --batch 64

Each size is timed over `--batches` batches after one warm-up batch (its
compile), in alternating turns when several sizes are given; the best turn
counts. The last line is `embed_listings_per_second_<last size>: <value>`.
"""

import argparse
import time

import numpy as np


def _embedder(size: str, image_size: int, patch_size: int, title_len: int):
  import jax
  from flax import nnx
  from item_jax.eval.embed import Embedder
  from item_jax.model import ItemModel, model_config
  from item_jax.train import sharding
  config = model_config(size, image_size=image_size, patch_size=patch_size,
                        vocab_size=8000, max_title_positions=max(64, title_len + 1))
  model = ItemModel(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  mesh = sharding.make_mesh({"data": jax.device_count(), "fsdp": 1, "model": 1})
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), params)
  return Embedder(graphdef, shardings, mesh, views=("both",)), params


def _batch(batch: int, image_size: int, title_len: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  title_ids = rng.integers(5, 8000, (batch, title_len)).astype(np.int32)
  title_ids[:, -1] = 3
  return {"title_ids": title_ids,
          "image": rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32),
          "valid": np.ones(batch, bool), "has_title": np.ones(batch, bool),
          "has_image": np.ones(batch, bool)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,small")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--turns", type=int, default=2)
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--patch-size", type=int, default=16)
  parser.add_argument("--title-len", type=int, default=32)
  args = parser.parse_args()
  import jax
  sizes = [size.strip() for size in args.sizes.split(",") if size.strip()]
  runs = {size: _embedder(size, args.image_size, args.patch_size, args.title_len)
          for size in sizes}
  batches = [_batch(args.batch, args.image_size, args.title_len, seed)
             for seed in range(args.batches)]
  for embedder, params in runs.values():
    embedder(params, batches[0])  # compiles
  best = {size: 0.0 for size in sizes}
  for turn in range(args.turns):
    for size, (embedder, params) in runs.items():
      started = time.perf_counter()
      for batch in batches:
        out = embedder(params, batch)
      rate = args.batch * len(batches) / (time.perf_counter() - started)
      assert out["both"].shape[0] == args.batch
      best[size] = max(best[size], rate)
      print(f"turn {turn}: {size}: {rate:.1f} listings/s")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; "
        f"{args.image_size} px / {args.patch_size} px patches, {args.title_len} "
        f"title tokens, batch {args.batch}")
  print("| size | listings/s |")
  print("| --- | --- |")
  for size in sizes:
    print(f"| {size} | {best[size]:.1f} |")
  print(f"embed_listings_per_second_{sizes[-1]}: {best[sizes[-1]]:.1f}")


if __name__ == "__main__":
  main()
