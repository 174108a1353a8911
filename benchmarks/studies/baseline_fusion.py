"""How much can photos add to titles on a catalogue? Baselines and their fusion.

  python benchmarks/studies/baseline_fusion.py --data runs/demo/prepared \
      [--split test] [--synth-products 1250 --synth-seed 0 --synth-group-sizes 2-3]

Same-product retrieval on one split with `item-jax eval`'s two baselines: TF-IDF
over the titles' character n-grams and the colour histogram of the photos. Then
both together: each listing's TF-IDF row times cos(a * pi / 2) beside its
histogram times sin(a * pi / 2), for a from 0 (titles only) to 1 (photos only),
so the cosine of two listings is a weighted sum of the two similarities. No
training and no model: the best fused score shows how far title matching
leaves room for a cross-modal embedding on this catalogue, and the titles-only
end is the bar `item-jax eval` holds ITEm to. With --synth-products,
--synth-seed and --synth-group-sizes (those the catalogue was made with by
`item-jax synth`), Recall@10 is also given per sibling-group kind. The last
line is `best_fusion_over_tfidf_macro_recall@10: <best fused macro R@10 /
TF-IDF's>`.
"""

import argparse
import collections

import numpy as np

from item_jax.data import pipeline
from item_jax.eval import evaluate, metrics
from item_jax.eval.search import top_k_search

WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def read(data_dir: str, split: str, image_size: int) -> dict:
  """Titles, images, product, item and category ids of a split's valid listings."""
  dataset = pipeline.make_dataset(data_dir, split, 256, image_size, 8,
                                  training=False, process_index=0,
                                  process_count=1, keep_titles=True)
  parts = collections.defaultdict(list)
  for batch in dataset.as_numpy_iterator():
    for name in ("title", "image", "product_id", "item_id", "category_id"):
      parts[name].append(batch[name][batch["valid"]])
  rows = {name: np.concatenate(values) for name, values in parts.items()}
  rows["title"] = [title.decode("utf-8") for title in rows["title"]]
  for name in ("product_id", "item_id"):
    rows[name] = np.asarray([value.decode("utf-8") for value in rows[name]])
  return rows


def fuse(titles: np.ndarray, photos: np.ndarray, weight: float) -> np.ndarray:
  """Unit rows whose inner products are cos^2 * title sim + sin^2 * photo sim."""
  angle = weight * np.pi / 2
  return np.concatenate([titles * np.cos(angle), photos * np.sin(angle)], axis=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="a `prepare` output folder")
  parser.add_argument("--split", default="test")
  parser.add_argument("--index-split", default="train",
                      help="its titles join the TF-IDF document frequencies, as in "
                      "`item-jax eval`")
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--synth-products", type=int, default=None)
  parser.add_argument("--synth-seed", type=int, default=0)
  parser.add_argument("--synth-group-sizes", default="2-3",
                      help="as given to `item-jax synth --group-sizes`")
  args = parser.parse_args()

  split = read(args.data, args.split, args.image_size)
  index_titles = read(args.data, args.index_split, args.image_size)["title"]
  # Dense here: fusion concatenates them with the histograms (one split only).
  titles = evaluate.tfidf_features({"index": index_titles,
                                    "split": split["title"]})["split"].toarray()
  photos = evaluate.colour_histograms(split["image"])
  products, categories = split["product_id"], split["category_id"]
  queries = metrics.retrieval_queries(products)
  print(f"{args.split}: {len(products)} listings, {len(queries)} queries, "
        f"TF-IDF {titles.shape[1]} n-grams, histogram {photos.shape[1]} bins")

  scores = {}
  for weight in WEIGHTS:
    result = metrics.same_product_retrieval(fuse(titles, photos, weight),
                                            products, categories)
    scores[weight] = result["macro_recall@10"]
    label = {0.0: " (TF-IDF)", 1.0: " (colour histogram)"}.get(weight, "")
    print(f"a = {weight:4.2f}{label}: macro R@10 {result['macro_recall@10']:.3f}, "
          f"MAP@10 {result['macro_map@10']:.3f}")

  if args.synth_products:
    from item_jax.data import synth
    kinds = {product.product_id: product.group_kind
             for product in synth.build_products(
                 args.synth_products, args.synth_seed,
                 synth.parse_group_sizes(args.synth_group_sizes))}
    query_kinds = np.asarray([kinds[products[row]] for row in queries])
    best = max(scores, key=scores.get)
    for weight in sorted({0.0, best, 1.0}):
      features = fuse(titles, photos, weight)
      _, neighbours = top_k_search(features[queries], features, 10, exclude=queries)
      neighbours = np.asarray(neighbours)
      for kind in (synth.SINGLE, synth.IMAGE_DECISIVE, synth.TITLE_DECISIVE):
        chosen = query_kinds == kind
        if chosen.any():
          result = metrics.retrieval_metrics(neighbours[chosen], queries[chosen],
                                             products, categories, ks=(10,))
          print(f"a = {weight:4.2f}, {kind} queries ({int(chosen.sum())}): "
                f"R@10 {result['recall@10']:.3f}, MAP@10 {result['map@10']:.3f}")

  best = max(scores.values())
  print(f"best_fusion_over_tfidf_macro_recall@10: {best / scores[0.0]:.4f}")


if __name__ == "__main__":
  main()
