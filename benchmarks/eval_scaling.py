"""Evaluation time against split size: the TF-IDF baseline and one dense
embedding view through `item-jax eval`'s metrics, as the catalogue grows.

  python benchmarks/eval_scaling.py [--sizes 12000,25000,50000,100000]
      [--old-code 01cf65a]

Listings are synthetic titles (`item_jax.data.synth`'s products and sellers'
rewordings, default sibling groups), split by product: about 80 % of the
products train (the k-NN index and the probe's training set), the rest are
the test split (same-product retrieval within it; k-NN and probe accuracy).
For each size it times, as `item_jax.eval.evaluate.evaluate` runs them:

  TF-IDF: `tfidf_features` on all titles, `same_product_retrieval`,
    `knn_predict` (k = 10), `linear_probe` (300 iterations at most);
  dense: the same three on 384-d unit rows (a random direction per leaf
    category plus one per product plus noise: random, but with the
    structure that gives the search and the probe realistic work).

With --old-code REF, the TF-IDF rows are also timed with the code of git
commit REF (its `tfidf_features` and `item_jax/eval/metrics.py`, read with
`git show`, nothing installed), on the first size only: the before/after
comparison. The last line is `tfidf_eval_seconds_<largest>: <seconds>`.
"""

import argparse
import ast
import pathlib
import subprocess
import sys
import time
import types

import numpy as np

from item_jax.data import synth
from item_jax.eval import evaluate, metrics

DENSE_DIM = 384
TEST_SHARE = 0.2
KNN_K = 10
PROBE_STEPS = 300


def synthetic_listings(num_listings: int, seed: int = 0) -> dict:
  """Titles, product ids, leaf ids and the test mask of `num_listings`
  synthetic listings (products in `synth`'s order, cut at that count)."""
  products = synth.build_products(num_listings // 3 + 10, seed)
  leaves = {leaf.path: index for index, leaf in enumerate(synth.LEAVES)}
  in_test = np.random.default_rng([seed, 7]).random(len(products)) < TEST_SHARE
  titles, product_ids, categories, test = [], [], [], []
  for product in products:
    rng = np.random.default_rng([seed, 2, product.index])
    for _ in range(min(product.num_listings, num_listings - len(titles))):
      titles.append(synth.reword_title(product, rng))
      product_ids.append(product.index)
      categories.append(leaves[product.leaf.path])
      test.append(in_test[product.index])
    if len(titles) == num_listings:
      break
  return {"title": titles, "product": np.asarray(product_ids),
          "category": np.asarray(categories), "test": np.asarray(test)}


def dense_rows(listings: dict, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng([seed, 8])
  category = rng.standard_normal((len(synth.LEAVES), DENSE_DIM), dtype=np.float32)
  product = rng.standard_normal((listings["product"].max() + 1, DENSE_DIM),
                                dtype=np.float32)
  rows = (category[listings["category"]] + product[listings["product"]]
          + 3 * rng.standard_normal((len(listings["product"]), DENSE_DIM),
                                    dtype=np.float32))
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def time_metrics(train, test, split: dict, metrics_module, num_classes: int) -> dict:
  """Seconds and results of retrieval, k-NN and the probe, as evaluate runs them."""
  out = {}
  started = time.perf_counter()
  retrieval = metrics_module.same_product_retrieval(test, split["test_product"],
                                                    split["test_category"])
  out["retrieval_s"] = time.perf_counter() - started
  started = time.perf_counter()
  knn = metrics_module.knn_predict(train, split["train_category"], test, KNN_K)
  out["knn_s"] = time.perf_counter() - started
  started = time.perf_counter()
  probe = metrics_module.linear_probe(train, split["train_category"], test,
                                      num_classes, steps=PROBE_STEPS)
  out["probe_s"] = time.perf_counter() - started
  out["macro_recall@10"] = retrieval["macro_recall@10"]
  out["knn_accuracy"] = float(np.mean(knn == split["test_category"]))
  out["probe_accuracy"] = float(np.mean(probe == split["test_category"]))
  return out


def old_code(ref: str):
  """(tfidf_features, metrics module) of git commit `ref`, from `git show`."""
  repository = pathlib.Path(__file__).resolve().parents[1]
  show = lambda path: subprocess.run(["git", "show", f"{ref}:{path}"], check=True,
                                     capture_output=True, text=True,
                                     cwd=repository).stdout
  old_metrics = types.ModuleType("old_metrics")
  exec(compile(show("item_jax/eval/metrics.py"), f"{ref}:metrics.py", "exec"),
       old_metrics.__dict__)
  source = show("item_jax/eval/evaluate.py")
  wanted = [node for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef)
            and node.name in ("char_ngrams", "tfidf_features")]
  namespace = {}
  exec("import collections, re\nimport numpy as np\nimport scipy.sparse\n"
       "NGRAM_SIZES = (2, 3, 4)\n", namespace)
  exec(compile(ast.Module(body=wanted, type_ignores=[]), f"{ref}:evaluate.py",
               "exec"), namespace)
  return namespace["tfidf_features"], old_metrics


def run_size(num_listings: int, old=None) -> dict:
  listings = synthetic_listings(num_listings)
  test = listings["test"]
  split = {"train_category": listings["category"][~test],
           "test_category": listings["category"][test],
           "test_product": listings["product"][test]}
  titles = {"train": [t for t, x in zip(listings["title"], test) if not x],
            "test": [t for t, x in zip(listings["title"], test) if x]}
  num_classes = len(synth.LEAVES)
  row = {"listings": num_listings, "train": int((~test).sum()), "test": int(test.sum())}
  tfidf_features, metrics_module = old or (evaluate.tfidf_features, metrics)
  started = time.perf_counter()
  features = tfidf_features(titles)
  row["tfidf_dim"] = features["train"].shape[1]
  row["tfidf"] = {"features_s": time.perf_counter() - started,
                  **time_metrics(features["train"], features["test"], split,
                                 metrics_module, num_classes)}
  if old is None:
    rows = dense_rows(listings)
    row["dense"] = time_metrics(rows[~test], rows[test], split, metrics, num_classes)
  return row


def total(part: dict) -> float:
  return sum(value for name, value in part.items() if name.endswith("_s"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="12000,25000,50000,100000")
  parser.add_argument("--old-code", default=None, metavar="REF",
                      help="also time the TF-IDF rows with this commit's code "
                      "(first size only)")
  args = parser.parse_args()
  sizes = [int(size) for size in args.sizes.split(",")]
  rows = []
  if args.old_code:
    old = run_size(sizes[0], old_code(args.old_code))
    part = old["tfidf"]
    print(f"code of {args.old_code}, {old['listings']} listings ({old['train']} train, "
          f"{old['test']} test), TF-IDF {old['tfidf_dim']} columns: features "
          f"{part['features_s']:.1f} s, retrieval {part['retrieval_s']:.1f} s, k-NN "
          f"{part['knn_s']:.1f} s, probe {part['probe_s']:.1f} s, total "
          f"{total(part):.1f} s; macro R@10 {part['macro_recall@10']:.4f}, k-NN "
          f"{part['knn_accuracy']:.4f}, probe {part['probe_accuracy']:.4f}", flush=True)
  header = ("| listings | train / test | TF-IDF columns | TF-IDF features | retrieval "
            "| k-NN | probe | TF-IDF total | dense retrieval | k-NN | probe | dense total |")
  for num_listings in sizes:
    row = run_size(num_listings)
    rows.append(row)
    tfidf, dense = row["tfidf"], row["dense"]
    print(f"{num_listings} listings: TF-IDF macro R@10 {tfidf['macro_recall@10']:.4f}, "
          f"k-NN {tfidf['knn_accuracy']:.4f}, probe {tfidf['probe_accuracy']:.4f}; "
          f"dense macro R@10 {dense['macro_recall@10']:.4f}, k-NN "
          f"{dense['knn_accuracy']:.4f}, probe {dense['probe_accuracy']:.4f}", flush=True)
  print(header)
  print("| " + " | ".join(["---"] * (header.count("|") - 1)) + " |")
  for row in rows:
    tfidf, dense = row["tfidf"], row["dense"]
    print(f"| {row['listings']:,} | {row['train']:,} / {row['test']:,} | "
          f"{row['tfidf_dim']:,} | {tfidf['features_s']:.1f} s | "
          f"{tfidf['retrieval_s']:.1f} s | {tfidf['knn_s']:.1f} s | "
          f"{tfidf['probe_s']:.1f} s | **{total(tfidf):.1f} s** | "
          f"{dense['retrieval_s']:.1f} s | {dense['knn_s']:.1f} s | "
          f"{dense['probe_s']:.1f} s | {total(dense):.1f} s |")
  largest = rows[-1]
  label = (f"{largest['listings'] // 1000}k" if largest["listings"] % 1000 == 0
           else str(largest["listings"]))
  print(f"tfidf_eval_seconds_{label}: {total(largest['tfidf']):.1f}")


if __name__ == "__main__":
  sys.exit(main())
