"""Exact top-k retrieval speed: item_jax.eval.search.top_k_search against
faiss-cpu's IndexFlatIP on the same random unit vectors (all of them queries,
all of them candidates), results checked to agree.

  pip install -e '.[bench]'
  python benchmarks/retrieval.py --num 100000 --dim 768 --k 10

The last line is `retrieval_speed_vs_faiss: <faiss seconds / our seconds>`
(above 1: faster than faiss), from the best of `--repeats` turns each.
"""

import argparse
import os
import time

import numpy as np


def _unit_vectors(num: int, dim: int, seed: int) -> np.ndarray:
  vectors = np.random.default_rng(seed).standard_normal((num, dim), dtype=np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors


def _searchers(vectors, k, query_block, candidate_block):
  """{name: search()} for both methods, each warmed up once."""
  import faiss
  import jax
  from item_jax.eval.search import top_k_search
  index = faiss.IndexFlatIP(vectors.shape[1])
  index.add(vectors)
  index.search(vectors[:256], k)
  ours = lambda queries: top_k_search(queries, vectors, k, query_block=query_block,
                                      candidate_block=candidate_block)
  # A small query set compiles and warms the thread pools; the full one
  # compiles again for its own shapes (under a second, inside its timing).
  ours(vectors[:256])
  device = jax.devices()[0]
  return {
      f"faiss IndexFlatIP ({faiss.omp_get_max_threads()} threads)":
          lambda: index.search(vectors, k),
      f"top_k_search ({jax.device_count()} {device.platform} device(s), "
      f"blocks {query_block} x {candidate_block})": lambda: ours(vectors),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num", type=int, default=100_000)
  parser.add_argument("--dim", type=int, default=768)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--query-block", type=int, default=1024)
  parser.add_argument("--candidate-block", type=int, default=4096)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--repeats", type=int, default=1,
                      help="time each method this many times, in turns; "
                      "the best of each counts")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  vectors = _unit_vectors(args.num, args.dim, args.seed)
  print(f"{args.num} x {args.num} unit vectors of {args.dim} float32, top {args.k}; "
        f"{os.cpu_count()} CPU cores")
  searchers = _searchers(vectors, args.k, args.query_block, args.candidate_block)
  seconds, results = {name: [] for name in searchers}, {}
  # Taking turns spreads a shared machine's changing load over both.
  for _ in range(args.repeats):
    for name, search in searchers.items():
      started = time.perf_counter()
      results[name] = search()
      seconds[name].append(time.perf_counter() - started)
  for name, times in seconds.items():
    print(f"{name}: best {min(times):.1f} s of {', '.join(f'{t:.1f}' for t in times)}")
  faiss_seconds, ours_seconds = (min(times) for times in seconds.values())
  (faiss_scores, faiss_indices), (scores, indices) = results.values()

  same = indices == faiss_indices
  score_gap = np.abs(scores - faiss_scores).max()
  print(f"identical neighbours: {same.mean():.6f}; largest score difference "
        f"{score_gap:.2e}")
  # Neighbours may differ only where scores tie to float32 rounding, so the
  # ranked scores must agree.
  if score_gap > 1e-4:
    raise SystemExit("scores disagree with faiss beyond float32 rounding")
  print(f"retrieval_speed_vs_faiss: {faiss_seconds / ours_seconds:.3f}")


if __name__ == "__main__":
  main()
