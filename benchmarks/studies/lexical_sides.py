"""Which lexical side finds the same product: TF-IDF against BM25, over each
side's character n-grams, on a prepared catalogue's validation and test splits.

  python benchmarks/studies/lexical_sides.py --data runs/demo/prepared \
      --lexical char:2-4,char_wb:3-3,char_wb:3-4

Same-product retrieval as `item-jax eval` scores its TF-IDF baseline: every
listing with another of its product queries all the other listings of its
split; the n-grams' statistics come from the training titles and the split's
(no labels read). TF-IDF is `item_jax.eval.fusion.tfidf_features` (the
lexical side `eval --lexical` and `neighbours --lexical` take). BM25 is the
Okapi score over the same n-grams: the query's n-grams (each once) weighted
by idf = log(1 + (N - df + 0.5) / (df + 0.5)), against the candidate's
counts saturated as tf (k1 + 1) / (tf + k1 (1 - b + b len / mean len)),
len counted in n-grams; each (k1, b) of --bm25 is tried (1.2, 0.75 is the
common default). The last line is
`bm25_minus_tfidf_validation_macro_map@10: <best BM25 minus best TF-IDF>`
over every side and setting, on the validation split, where a catalogue
would make the choice.
"""

import argparse
import collections
import pathlib
import sys

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # benchmarks/studies/
import baseline_fusion
from item_jax.eval.embed import own_products
from item_jax.eval.fusion import _padded_title, lexical_name, lexical_side, tfidf_features
from item_jax.eval.metrics import (retrieval_metrics, retrieval_queries,
                                   same_product_retrieval, sparse_top_k_search)

METRICS = ("macro_recall@10", "macro_map@10", "recall@1", "map@10")


def read(data_dir: str, split: str) -> dict:
  """Titles, product (own ones where empty) and category ids of a split."""
  rows = baseline_fusion.read(data_dir, split, image_size=32)
  return {"titles": rows["title"],
          "products": own_products(rows["product_id"], rows["item_id"]),
          "categories": rows["category_id"].astype(np.int64)}


def bm25_rows(titles: list[str], side: str, k1: float, b: float):
  """(query rows, candidate rows) of BM25 over `side`'s n-grams of `titles`."""
  analyzer, ngram_range = lexical_side(side)
  counts = CountVectorizer(analyzer=analyzer, preprocessor=_padded_title,
                           ngram_range=ngram_range, dtype=np.float32
                           ).fit_transform(titles).tocsr()
  num = counts.shape[0]
  document_frequency = np.bincount(counts.indices, minlength=counts.shape[1])
  idf = np.log1p((num - document_frequency + 0.5) / (document_frequency + 0.5))
  lengths = np.asarray(counts.sum(axis=1)).ravel()
  row = np.repeat(np.arange(num), np.diff(counts.indptr))
  candidates = counts.copy()
  candidates.data = (counts.data * (k1 + 1) / (
      counts.data + k1 * (1 - b + b * lengths[row] / lengths.mean()))).astype(np.float32)
  queries = counts.copy()
  queries.data = idf[counts.indices].astype(np.float32)
  return queries, candidates


def bm25_retrieval(queries, candidates, split: dict) -> dict:
  """`same_product_retrieval` for an asymmetric score (query rows against
  candidate rows), exact (`sparse_top_k_search`)."""
  rows = retrieval_queries(split["products"])
  _, neighbours = sparse_top_k_search(queries[rows], candidates, 10, exclude=rows)
  return retrieval_metrics(neighbours, rows, split["products"], split["categories"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="a `prepare` output folder")
  parser.add_argument("--lexical", default="char:2-4,char_wb:3-3,char_wb:3-4")
  parser.add_argument("--bm25", default="1.2:0.75,2.0:0.75,0.9:0.4,1.2:0",
                      help="comma-separated K1:B settings")
  args = parser.parse_args()
  sides = [lexical_name(side) for side in args.lexical.split(",")]
  settings = [tuple(float(v) for v in s.split(":")) for s in args.bm25.split(",")]
  train = read(args.data, "train")
  best = collections.defaultdict(lambda: -1.0)
  print("| split | lexical side | score | " + " | ".join(METRICS) + " |")
  print("| --- | --- | --- |" + " --- |" * len(METRICS))
  for split_name in ("validation", "test"):
    split = read(args.data, split_name)
    if not len(retrieval_queries(split["products"])):
      continue
    for side in sides:
      rows = tfidf_features({"train": train["titles"], "split": split["titles"]},
                            lexical=side)["split"]
      entries = [("TF-IDF", same_product_retrieval(rows, split["products"],
                                                   split["categories"]))]
      for k1, b in settings:
        queries, candidates = bm25_rows(train["titles"] + split["titles"], side, k1, b)
        first = len(train["titles"])
        entries.append((f"BM25 k1 {k1:g} b {b:g}", bm25_retrieval(
            queries[first:], candidates[first:], split)))
      for score, found in entries:
        print(f"| {split_name} | {side} | {score} | "
              + " | ".join(f"{found[m]:.3f}" for m in METRICS) + " |")
        kind = "tfidf" if score == "TF-IDF" else "bm25"
        best[(split_name, kind)] = max(best[(split_name, kind)], found["macro_map@10"])
  print("(macro: the mean over leaf categories of each one's query mean; "
        "recall@1 and map@10: the mean over queries)")
  print(f"bm25_minus_tfidf_validation_macro_map@10: "
        f"{best[('validation', 'bm25')] - best[('validation', 'tfidf')]:.4f}")


if __name__ == "__main__":
  main()
