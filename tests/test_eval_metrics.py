"""Retrieval and classification metrics, k-NN and the linear probe:
hand-computed cases and a brute-force numpy reference."""

import numpy as np
import pytest

from item_jax.eval.metrics import (classification_metrics, knn_predict,
                                   linear_probe, macro_average, retrieval_metrics,
                                   retrieval_queries, same_product_retrieval)


def _padded(rows, width=10):
  return np.array([row + [-1] * (width - len(row)) for row in rows])


def test_one_relevant_listing_versus_many():
  # Listings: product A at rows 0 and 1; product B at rows 2, 3, 4, 5; C at 6.
  products = ["A", "A", "B", "B", "B", "B", "C"]
  categories = [0, 0, 1, 1, 1, 1, 1]
  neighbours = _padded([
      [6, 1, 2, 3, 4, 5],     # query 0 (R=1): the hit at rank 2
      [2, 0, 3, 4, 5, 6],     # query 1 (R=1): hit at rank 2
      [3, 0, 4, 1, 5, 6],     # query 2 (R=3): hits at ranks 1, 3, 5
  ])
  metrics = retrieval_metrics(neighbours, np.array([0, 1, 2]), products, categories)
  recall_1 = [0, 0, 1 / 3]
  recall_5 = [1, 1, 1]
  ap_1 = [0, 0, 1]
  ap_5 = [0.5, 0.5, (1 / 1 + 2 / 3 + 3 / 5) / 3]
  assert metrics["recall@1"] == pytest.approx(np.mean(recall_1))
  assert metrics["recall@5"] == pytest.approx(np.mean(recall_5))
  assert metrics["map@1"] == pytest.approx(np.mean(ap_1))
  assert metrics["map@5"] == pytest.approx(np.mean(ap_5))
  # Category 0 holds queries 0 and 1, category 1 only query 2: macro weighs
  # that single query as much as the other two together.
  assert metrics["macro_map@5"] == pytest.approx((0.5 + ap_5[2]) / 2)
  assert metrics["macro_recall@1"] == pytest.approx((0 + 1 / 3) / 2)
  assert metrics["num_queries"] == 3 and metrics["num_query_categories"] == 2


def test_k_larger_than_the_candidates():
  # Three listings: each query has two candidates, ten slots.
  products, categories = ["A", "A", "B"], [0, 0, 0]
  neighbours = _padded([[2, 1], [0, 2]])
  metrics = retrieval_metrics(neighbours, np.array([0, 1]), products, categories)
  assert metrics["recall@10"] == 1.0 and metrics["recall@1"] == 0.5
  # AP@10 divides by min(10, R) = 1: query 0 finds its one hit at rank 2.
  assert metrics["map@10"] == pytest.approx((0.5 + 1.0) / 2)
  assert metrics["map@5"] == metrics["map@10"]


def test_ties_go_to_the_lower_index():
  # Every listing has the same embedding, so every candidate ties.
  products, categories = ["A", "B", "A"], [0, 0, 0]
  embeddings = np.ones((3, 4), np.float32) / 2
  metrics = same_product_retrieval(embeddings, products, categories)
  # Query 0 ranks row 1 (B) before row 2 (A): hit at rank 2; query 2 ranks
  # row 0 (A) first.
  assert metrics["recall@1"] == pytest.approx(0.5)
  assert metrics["map@10"] == pytest.approx((0.5 + 1.0) / 2)
  assert metrics["num_queries"] == 2


def test_queries_are_listings_with_another_of_their_product():
  assert list(retrieval_queries(["A", "B", "A", "C", "C", "C"])) == [0, 2, 3, 4, 5]
  with pytest.raises(ValueError, match="at least one other listing"):
    retrieval_metrics(_padded([[0]]), np.array([1]), ["A", "B"], [0, 0])


def _reference_metrics(embeddings, products, categories, k):
  """The definitions, query by query, over a full similarity matrix."""
  similarity = embeddings @ embeddings.T
  recalls, precisions, query_categories = [], [], []
  for query in range(len(products)):
    relevant = {row for row in range(len(products))
                if row != query and products[row] == products[query]}
    if not relevant:
      continue
    order = [row for row in np.argsort(-similarity[query], kind="stable")
             if row != query][:k]
    hits, precision_sum = 0, 0.0
    for rank, row in enumerate(order, start=1):
      if row in relevant:
        hits += 1
        precision_sum += hits / rank
    recalls.append(hits / len(relevant))
    precisions.append(precision_sum / min(k, len(relevant)))
    query_categories.append(categories[query])
  by_category = lambda values: np.mean([
      np.mean([v for v, c in zip(values, query_categories) if c == category])
      for category in sorted(set(query_categories))])
  return {f"recall@{k}": np.mean(recalls), f"map@{k}": np.mean(precisions),
          f"macro_recall@{k}": by_category(recalls),
          f"macro_map@{k}": by_category(precisions)}


def test_matches_a_brute_force_reference_on_random_data():
  rng = np.random.default_rng(0)
  num_listings = 300
  products = rng.integers(0, 120, num_listings).astype(str)
  categories = rng.integers(0, 7, num_listings)
  # Listings of a product share a direction, with noise: some hits, some misses.
  directions = rng.standard_normal((120, 16))
  embeddings = directions[products.astype(int)] + 1.5 * rng.standard_normal((num_listings, 16))
  embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
  metrics = same_product_retrieval(embeddings, products, categories,
                                   query_block=16, candidate_block=64)
  for k in (1, 5, 10):
    reference = _reference_metrics(embeddings.astype(np.float64), products, categories, k)
    for name, value in reference.items():
      assert metrics[name] == pytest.approx(value, abs=1e-9), name
  assert 0.05 < metrics["recall@10"] < 0.95


def test_macro_average():
  assert macro_average(np.array([1.0, 0.0, 0.0, 0.5]), np.array([3, 1, 1, 7])) == \
      pytest.approx((1.0 + 0.0 + 0.5) / 3)


def test_classification_metrics_by_hand():
  labels = np.array([0, 0, 1, 1, 2])
  predictions = np.array([0, 1, 1, 1, 3])
  metrics = classification_metrics(labels, predictions)
  assert metrics["accuracy"] == pytest.approx(3 / 5)
  # F1 per class: 0 -> 2/3, 1 -> 4/5, 2 -> 0 (never predicted), 3 -> 0 (never true).
  assert metrics["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 4)


def test_knn_votes_then_nearest_breaks_ties():
  index = np.eye(4, dtype=np.float32)
  index_labels = np.array([5, 3, 3, -1])
  # Query 0 is nearest row 0 (label 5), then rows 1 and 2 (label 3) tie.
  queries = np.array([[0.9, 0.3, 0.3, 0.0], [0.1, 0.2, 0.9, 0.9]], np.float32)
  assert list(knn_predict(index, index_labels, queries, k=1)) == [5, 3]
  assert list(knn_predict(index, index_labels, queries, k=3)) == [3, 3]
  # Two votes each for label 5 (ranks 1, 4) and label 3 (ranks 2, 3): 5 ranks first.
  index_labels = np.array([5, 3, 3, 5])
  query = np.array([[0.9, 0.5, 0.4, 0.1]], np.float32)
  assert list(knn_predict(index, index_labels, query, k=4)) == [5]


def test_linear_probe_separates_clusters():
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((4, 8)) * 3
  labels = np.repeat(np.arange(4), 30)
  features = centres[labels] + rng.standard_normal((120, 8))
  train_labels = np.where(np.arange(120) % 10 == 0, -1, labels)  # some unlabelled
  predictions = linear_probe(features, train_labels, features, 4, steps=200)
  assert np.mean(predictions == labels) > 0.95
