"""Can an exact lexical search skip the common n-grams? A study of the
bound-and-prune idea for `item-jax neighbours --rank-by lexical|hybrid`.

  python benchmarks/studies/hybrid_pruning.py --size 30000 --groups 16,64

For each query: its exact score over the rare n-gram columns (set in at most
--rare-share of the titles) is a lower bound of its TF-IDF cosine with a
candidate; adding, over the common columns split into G groups, the
Cauchy-Schwarz bound sum_g |q_g| |d_g| gives an upper bound. A candidate
whose upper bound is below the query's k-th best lower bound cannot be in
its top k, so only the survivors would need their common n-grams scored.
The titles are `hybrid_neighbours.py`'s. Prints the mean share of candidates
that survive (1.0: nothing pruned) for each G; the last line is
`survivors_share_<N>: <share>` for the largest G.
"""

import argparse
import pathlib
import sys

import numpy as np
import scipy.sparse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/
from hybrid_neighbours import listings
from item_jax.eval.fusion import tfidf_features


def survivors(tfidf, rare_share: float, groups: int, k: int, queries: int):
  """Each of the first `queries` rows' number of surviving candidates."""
  num = tfidf.shape[0]
  frequency = np.diff(tfidf.tocsc().indptr)
  rare = np.flatnonzero(frequency <= rare_share * num)
  common = np.flatnonzero(frequency > rare_share * num)
  rare_rows, common_rows = tfidf[:, rare].tocsr(), tfidf[:, common].tocsr()
  # Columns dealt round-robin by frequency, so each group mixes them.
  group = np.empty(len(common), np.int64)
  group[np.argsort(-frequency[common], kind="stable")] = np.arange(len(common)) % groups
  to_groups = scipy.sparse.csr_matrix(
      (np.ones(len(common)), (np.arange(len(common)), group)),
      shape=(len(common), groups))
  norms = np.sqrt((common_rows.multiply(common_rows) @ to_groups).toarray())
  counts = []
  for start in range(0, queries, 1024):
    stop = min(start + 1024, queries)
    lower = (rare_rows[start:stop] @ rare_rows.T).toarray()
    upper = lower + norms[start:stop] @ norms.T
    lower[np.arange(stop - start), np.arange(start, stop)] = -np.inf
    kth = -np.partition(-lower, k - 1, axis=1)[:, k - 1]
    counts.append((upper >= kth[:, None] - 1e-6).sum(axis=1) - 1)
  return np.concatenate(counts), len(rare), len(common)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=30000)
  parser.add_argument("--groups", default="16,64")
  parser.add_argument("--rare-share", type=float, default=0.01)
  parser.add_argument("--k", type=int, default=10)
  parser.add_argument("--queries", type=int, default=3072)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  _, titles = listings(args.size, 384, args.seed)   # the same titles as there
  tfidf = tfidf_features({"all": titles})["all"]
  share = None
  for groups in (int(text) for text in args.groups.split(",")):
    counts, rare, common = survivors(tfidf, args.rare_share, groups, args.k,
                                     min(args.queries, args.size))
    share = float(counts.mean() / (args.size - 1))
    print(f"N={args.size:,}, {rare:,} rare and {common:,} common n-grams, "
          f"{groups} groups: {counts.mean():,.0f} of {args.size - 1:,} candidates "
          f"survive a query on average (median {np.median(counts):,.0f})")
  print(f"survivors_share_{args.size}: {share:.3f}")


if __name__ == "__main__":
  main()
