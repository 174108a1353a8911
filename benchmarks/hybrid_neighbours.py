"""What the lexical side costs: `item-jax neighbours --rank-by hybrid` (and
`lexical`) against the embedding alone, on N listings searched against
themselves, in alternating turns in one process.

  python benchmarks/hybrid_neighbours.py --sizes 10000,30000,100000 --dim 384

The listings: random unit rows (as benchmarks/neighbours.py) and titles of
6-12 words drawn from a Zipf-distributed vocabulary of 20,000 made-up words
plus a model code, about the length and n-gram spread of marketplace titles
(TF-IDF over their character 2-4-grams, as `item-jax eval`'s baseline).
Each turn runs `neighbours_command` to a CSV (k = 10), the embedding's
search on the devices, the lexical and hybrid ones on the host
(`item_jax.eval.fusion.hybrid_blocks`: every candidate scored). A size whose
predicted time exceeds what is left of --budget-seconds is skipped; 1M is
extrapolated quadratically from the largest size run. The last line is
`hybrid_over_dense_time_<N>: <ratio>` for the largest N run.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from item_jax.eval.neighbours import neighbours_command


def listings(num: int, dim: int, seed: int):
  rng = np.random.default_rng(seed)
  vectors = rng.standard_normal((num, dim), dtype=np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  vocabulary = ["".join(rng.choice(letters, rng.integers(3, 10)))
                for _ in range(20_000)]
  ranks = np.minimum(rng.zipf(1.3, size=(num, 12)) - 1, len(vocabulary) - 1)
  lengths = rng.integers(6, 13, size=num)
  titles = [" ".join(vocabulary[r] for r in ranks[row, :lengths[row]])
            + f" {rng.choice(letters).upper()}{rng.choice(letters).upper()}"
              f"-{rng.integers(100, 1000)}"
            for row in range(num)]
  return vectors, titles


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="10000,30000,100000")
  parser.add_argument("--dim", type=int, default=384)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--weight", type=float, default=0.5)
  parser.add_argument("--budget-seconds", type=float, default=1800)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  started, results, last = time.perf_counter(), {}, None
  for size in (int(text) for text in args.sizes.split(",")):
    if last is not None:
      predicted = sum(last[1].values()) * (size / last[0]) ** 2
      left = args.budget_seconds - (time.perf_counter() - started)
      if predicted > left:
        print(f"N={size:,}: skipped (about {predicted:.0f} s predicted, {left:.0f} s left)")
        continue
    vectors, titles = listings(size, args.dim, args.seed)
    with tempfile.TemporaryDirectory() as folder:
      path = os.path.join(folder, "listings")
      np.save(path + ".npy", vectors)
      with open(path + ".ids.json", "w", encoding="utf-8") as file:
        json.dump({"item_id": [str(row) for row in range(size)], "title": titles}, file)
      seconds = {}
      for rank_by, weight in (("embedding", None), ("lexical", None),
                              ("hybrid", args.weight)):
        begin = time.perf_counter()
        summary = neighbours_command(path, os.path.join(folder, f"{rank_by}.csv"),
                                     k=args.k, rank_by=rank_by, fusion_weight=weight)
        seconds[rank_by] = time.perf_counter() - begin
        assert summary["complete"] and summary["pairs"] == size * args.k
    results[size] = seconds
    last = (size, seconds)
    print(f"N={size:,}: embedding {seconds['embedding']:.1f} s, lexical "
          f"{seconds['lexical']:.1f} s, hybrid {seconds['hybrid']:.1f} s "
          f"({seconds['hybrid'] / seconds['embedding']:.1f}x the embedding's)",
          flush=True)
  size, seconds = last
  million = {name: value * (1_000_000 / size) ** 2 / 3600
             for name, value in seconds.items()}
  print(f"1M x 1M extrapolated from N={size:,}: " + ", ".join(
      f"{name} {hours:.1f} h" for name, hours in million.items()))
  print(f"hybrid_over_dense_time_{size}: {seconds['hybrid'] / seconds['embedding']:.2f}")


if __name__ == "__main__":
  main()
