"""All-pairs neighbour search time: item_jax.eval.neighbours (the search alone,
and `neighbours_command` with its CSV) against faiss-cpu's IndexFlatIP, on N
random unit rows searched against themselves (each row's own excluded), in
alternating turns in one process; 1M x 1M extrapolated from the largest N.

  pip install -e '.[bench]'
  python benchmarks/neighbours.py --sizes 10000,30000,100000 --dim 384 --k 10

Timings include reading the memory-mapped .npy and XLA's compiles of the
block shapes (a second or less; caches are cleared before each of our turns),
not writing the input files. faiss gets the
array in memory, searches k + 1 and drops each row's own match. The search
grows as N^2; the CSV part (ours with the CSV minus the search alone) as N.
A size whose predicted time exceeds what is left of --budget-seconds is
skipped. The last line is `neighbours_1m_hours_extrapolated: <hours>`, for
`neighbours_command` on 1M x 1M with the CSV, on this machine.
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np


def _unit_vectors(num: int, dim: int, seed: int) -> np.ndarray:
  vectors = np.random.default_rng(seed).standard_normal((num, dim), dtype=np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors


def _faiss_search(vectors: np.ndarray, k: int):
  """IndexFlatIP, k + 1 found, each row's own match dropped (or the last)."""
  import faiss
  index = faiss.IndexFlatIP(vectors.shape[1])
  index.add(vectors)
  scores, indices = index.search(vectors, k + 1)
  own = indices == np.arange(len(vectors))[:, None]
  own[~own.any(axis=1), -1] = True
  keep = ~own
  return (scores[keep].reshape(-1, k), indices[keep].reshape(-1, k))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="10000,30000,100000")
  parser.add_argument("--dim", type=int, default=384)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--block-rows", type=int, default=None,
                      help="query rows per block (default: the library's)")
  parser.add_argument("--index-block-rows", type=int, default=None)
  parser.add_argument("--budget-seconds", type=float, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import faiss
  import jax
  from item_jax.eval import neighbours
  from item_jax.eval import search as search_lib

  blocks = {"block_rows": args.block_rows or neighbours.DEFAULT_BLOCK_ROWS,
            "index_block_rows": args.index_block_rows or neighbours.DEFAULT_INDEX_BLOCK_ROWS}
  device = jax.devices()[0]
  print(f"N x N random unit rows of {args.dim} float32, top {args.k}, own row "
        f"excluded; {os.cpu_count()} CPU cores; ours on {jax.device_count()} "
        f"{device.platform} device(s), blocks {blocks['block_rows']} queries x "
        f"{blocks['index_block_rows']} index rows; faiss "
        f"{faiss.omp_get_max_threads()} threads")
  began = time.perf_counter()
  rows, last = [], None
  with tempfile.TemporaryDirectory() as folder:
    for num in (int(size) for size in args.sizes.split(",")):
      if last is not None:
        predicted = sum(last[1:4]) * (num / last[0]) ** 2
        left = args.budget_seconds - (time.perf_counter() - began)
        if predicted > left:
          print(f"N = {num:,} skipped: about {predicted:.0f} s predicted, "
                f"{left:.0f} s of the budget left")
          break
      vectors = _unit_vectors(num, args.dim, args.seed)
      base = os.path.join(folder, f"rows{num}")
      np.save(base + ".npy", vectors)
      with open(base + ".ids.json", "w") as file:
        json.dump({"item_id": [f"item-{row}" for row in range(num)]}, file)
      mapped = np.load(base + ".npy", mmap_mode="r")
      output = os.path.join(folder, f"neighbours{num}.csv")

      def search_only():
        parts = list(neighbours.neighbour_blocks(mapped, None, args.k, **blocks))
        return (np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

      turns = {"search": search_only,
               "with_csv": lambda: neighbours.neighbours_command(
                   base, output, k=args.k, **blocks),
               "faiss": lambda: _faiss_search(vectors, args.k)}
      seconds, results = {}, {}
      for name, turn in turns.items():   # one turn each, in this order
        # Each of our turns compiles its block shapes, as a fresh run would.
        jax.clear_caches()
        search_lib._compiled_search.cache_clear()
        started = time.perf_counter()
        results[name] = turn()
        seconds[name] = time.perf_counter() - started
      same = (results["search"][1] == results["faiss"][1]).mean()
      gap = np.abs(results["search"][0] - results["faiss"][0]).max()
      csv_bytes = os.path.getsize(output)
      os.remove(output)
      last = (num, seconds["search"], seconds["with_csv"], seconds["faiss"])
      rows.append(last + (same, gap, csv_bytes))
      print(f"N = {num:,}: search {seconds['search']:.1f} s, with CSV "
            f"{seconds['with_csv']:.1f} s ({csv_bytes / 1e6:.1f} MB), faiss "
            f"{seconds['faiss']:.1f} s; identical neighbours {same:.6f}, largest "
            f"score difference {gap:.1e}", flush=True)

  print()
  print("| N | ours: search (s) | ours: search + CSV (s) | faiss IndexFlatIP (s) "
        "| faiss / ours (search) | identical neighbours |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: |")
  for num, search, with_csv, faiss_s, same, _, _ in rows:
    print(f"| {num:,} | {search:.1f} | {with_csv:.1f} | {faiss_s:.1f} | "
          f"{faiss_s / search:.2f} | {same:.6f} |")
  if len(rows) >= 2:
    (n0, s0, *_), (n1, s1, *_) = rows[-2], rows[-1]
    print(f"measured growth of our search from {n0:,} to {n1:,}: "
          f"N^{np.log(s1 / s0) / np.log(n1 / n0):.2f}")
  num, search, with_csv, faiss_s = rows[-1][:4]
  scale = 1_000_000 / num
  csv_part = max(with_csv - search, 0.0)
  ours_1m = search * scale ** 2 + csv_part * scale
  print(f"1M x 1M extrapolated from N = {num:,} (search x {scale:.0f}^2, CSV "
        f"x {scale:.0f}): ours search {search * scale ** 2 / 3600:.2f} h, CSV "
        f"{csv_part * scale / 3600:.3f} h; faiss {faiss_s * scale ** 2 / 3600:.2f} h")
  print(f"neighbours_1m_hours_extrapolated: {ours_1m / 3600:.2f}")


if __name__ == "__main__":
  main()
