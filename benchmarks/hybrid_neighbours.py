"""What the lexical side costs: `item-jax neighbours --rank-by hybrid` (and
`lexical`) against the embedding alone, on N listings searched against
themselves, in alternating turns in one process.

  python benchmarks/hybrid_neighbours.py --sizes 10000,30000,100000 --dim 384 \
      --lexical char:2-4,char_wb:3-3

The listings: random unit rows (as benchmarks/neighbours.py) and titles of
6-12 words drawn from a Zipf-distributed vocabulary of 20,000 made-up words
plus a model code, about the length and n-gram spread of marketplace titles
(TF-IDF over their character n-grams: each lexical side of --lexical,
`item_jax.eval.fusion.lexical_side`; char:2-4 is `item-jax eval`'s
baseline). Each turn runs `neighbours_command` to a CSV (k = 10): the
embedding's search on the devices, then for each lexical side the hybrid
(and, with --lexical-alone, the lexical ranking) on the host
(`item_jax.eval.fusion.hybrid_blocks`: every candidate scored). A size whose
predicted time exceeds what is left of --budget-seconds is skipped; 1M is
extrapolated quadratically from the largest size run. The last lines are
`hybrid_over_dense_time_<N>_<side>: <ratio>` for the largest N run, one
per lexical side, the first side's last.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from item_jax.eval.fusion import lexical_name
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
  parser.add_argument("--lexical", default="char:2-4",
                      help="comma-separated lexical sides, ANALYZER:LOW-HIGH")
  parser.add_argument("--lexical-alone", action="store_true",
                      help="also time ranking by each lexical side alone")
  parser.add_argument("--budget-seconds", type=float, default=1800)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  # Checked and spelt one way before any turn runs; each side once.
  sides = list(dict.fromkeys(lexical_name(side.strip())
                             for side in args.lexical.split(",") if side.strip()))
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
      turns = [("embedding", None, "char:2-4")]
      for side in sides:
        turns.append(("hybrid", args.weight, side))
        if args.lexical_alone:
          turns.append(("lexical", None, side))
      for rank_by, weight, side in turns:
        name = rank_by if rank_by == "embedding" else f"{rank_by} {side}"
        begin = time.perf_counter()
        summary = neighbours_command(path, os.path.join(folder, "out.csv"),
                                     k=args.k, rank_by=rank_by, fusion_weight=weight,
                                     lexical=side)
        seconds[name] = time.perf_counter() - begin
        assert summary["complete"] and summary["pairs"] == size * args.k
    results[size] = seconds
    last = (size, seconds)
    print(f"N={size:,}: " + ", ".join(f"{name} {value:.1f} s"
                                      for name, value in seconds.items())
          + " (hybrid / embedding: " + ", ".join(
              f"{side} {seconds[f'hybrid {side}'] / seconds['embedding']:.2f}x"
              for side in sides) + ")", flush=True)
  size, seconds = last
  million = {name: value * (1_000_000 / size) ** 2 / 3600
             for name, value in seconds.items()}
  print(f"1M x 1M extrapolated from N={size:,}: " + ", ".join(
      f"{name} {hours:.1f} h" for name, hours in million.items()))
  for side in sides[::-1]:
    print(f"hybrid_over_dense_time_{size}_{side.replace(':', '')}: "
          f"{seconds[f'hybrid {side}'] / seconds['embedding']:.2f}")


if __name__ == "__main__":
  main()
