"""Retrieval and classification metrics, k-NN and the linear probe:
hand-computed cases, a brute-force numpy reference, and the sparse search
against the dense one on the same rows."""

import warnings

import numpy as np
import pytest
import scipy.sparse

from item_jax.eval import metrics as metrics_lib
from item_jax.eval.metrics import (classification_metrics, knn_predict,
                                   linear_probe, macro_average, retrieval_metrics,
                                   retrieval_queries, same_product_retrieval,
                                   sparse_top_k_search)
from item_jax.eval.search import top_k_search


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
  # Deterministic, and the same for rows that all lie near one direction
  # (centring and scaling make the offset and the spread irrelevant).
  np.testing.assert_array_equal(
      predictions, linear_probe(features, train_labels, features, 4, steps=200))
  shifted = 100.0 + 0.01 * features
  assert np.mean(linear_probe(shifted, train_labels, shifted, 4, steps=200)
                 == labels) > 0.95


def test_linear_probe_on_sparse_rows_never_makes_them_dense(monkeypatch):
  # Each class owns 50 of 10,000 columns; a row sets 5 of its class's.
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(5), 40)
  columns = labels[:, None] * 50 + rng.integers(0, 50, (200, 5))
  rows = scipy.sparse.csr_matrix(
      (np.ones(1000, np.float32), (np.repeat(np.arange(200), 5), columns.ravel())),
      shape=(200, 10_000))
  train, test = np.arange(200) % 4 != 0, np.arange(200) % 4 == 0
  def no_densifying(*args, **kwargs):
    raise AssertionError("sparse rows made dense")
  for cls in (scipy.sparse.csr_matrix, scipy.sparse.csc_matrix):
    monkeypatch.setattr(cls, "toarray", no_densifying)
    monkeypatch.setattr(cls, "todense", no_densifying)
  predictions = linear_probe(rows[train], labels[train], rows[test], 5)
  np.testing.assert_array_equal(predictions, labels[test])


def test_a_probe_on_blocks_scales_each_block_on_its_own():
  # A dense block (half the classes tell apart) beside a sparse one (the
  # other half): the probe on both beats either alone.
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 60)
  dense = rng.standard_normal((240, 6)) + 3.0 * (labels // 2)[:, None]
  columns = (labels % 2)[:, None] * 20 + rng.integers(0, 20, (240, 4))
  sparse = scipy.sparse.csr_matrix(
      (np.ones(960, np.float32), (np.repeat(np.arange(240), 4), columns.ravel())),
      shape=(240, 40))
  train, test = np.arange(240) % 3 != 0, np.arange(240) % 3 == 0
  def accuracy(train_rows, test_rows):
    return np.mean(linear_probe(train_rows, labels[train], test_rows, 4) == labels[test])
  both = accuracy((dense[train], sparse[train]), (dense[test], sparse[test]))
  assert both > 0.95
  assert both > accuracy(dense[train], dense[test]) + 0.3
  assert both > accuracy(sparse[train], sparse[test]) + 0.3
  # Each block's scale is its own: a block multiplied by 100 changes nothing.
  probe = metrics_lib.fit_probe((dense[train], sparse[train]), labels[train], 4)
  scaled = metrics_lib.fit_probe((dense[train], 100 * sparse[train]), labels[train], 4)
  np.testing.assert_allclose(probe.predict_proba((dense[test], sparse[test])),
                             scaled.predict_proba((dense[test], 100 * sparse[test])),
                             atol=1e-6)
  # The blocks side by side, each centred (dense) and scaled by hand.
  mean, scale = dense[train].mean(0), probe.scalings[0][1]
  manual = scipy.sparse.hstack([(dense[test] - mean) * scale,
                                sparse[test] * probe.scalings[1][1]]).toarray()
  weights, bias = probe.logit_weights()
  np.testing.assert_array_equal(probe.predict((dense[test], sparse[test])),
                                probe.classes[np.argmax(manual @ weights.T + bias, 1)])
  with pytest.raises(ValueError, match="fitted on 2 blocks"):
    probe.predict(dense[test])


def test_the_balanced_probe_keeps_a_noise_block_from_drowning_the_words():
  # Words tell the class (one of six groups of n-grams per row, beside five
  # noise n-grams); the dense block is 600 dims of noise the probe can
  # overfit 300 rows with. At equal spread it leans on the noise.
  rng = np.random.default_rng(0)
  def listings(count):
    labels = rng.integers(0, 6, count)
    columns = np.concatenate([labels[:, None] * 10 + rng.integers(0, 10, (count, 1)),
                              60 + rng.integers(0, 1000, (count, 5))], axis=1)
    words = scipy.sparse.csr_matrix(
        (np.ones(count * 6, np.float32), (np.repeat(np.arange(count), 6),
                                          columns.ravel())), shape=(count, 1060))
    return (rng.standard_normal((count, 600)).astype(np.float32), words), labels
  train, validation, test = listings(300), listings(200), listings(400)
  accuracy = lambda probe: np.mean(probe.predict(test[0]) == test[1])
  equal = metrics_lib.fit_probe(*train, 6)
  words_alone = np.mean(linear_probe(train[0][1], train[1], test[0][1], 6) == test[1])
  assert accuracy(equal) < words_alone - 0.1
  probe, balance, tried = metrics_lib.fit_balanced_probe(*train, 6, validation)
  assert sorted(tried) == [1.0, 2.0, 4.0, 8.0]
  assert balance > 1.0 and tried[balance] == max(tried.values())
  assert balance == min(w for w, a in tried.items() if a == tried[balance])  # ties: smaller
  assert accuracy(probe) > accuracy(equal) + 0.1
  assert accuracy(probe) >= words_alone - 0.01
  # The chosen weight is the words block's scale times the balance.
  np.testing.assert_allclose(probe.scalings[1][1], balance * equal.scalings[1][1])
  # Without labelled validation rows: equal spread, nothing tried.
  unlabelled = (validation[0], np.full(200, -1))
  for held_out in (None, unlabelled):
    probe, balance, tried = metrics_lib.fit_balanced_probe(*train, 6, held_out)
    assert balance == 1.0 and tried == {}
    np.testing.assert_array_equal(probe.predict(test[0]), equal.predict(test[0]))


def test_linear_probe_edge_cases():
  features = np.eye(4, dtype=np.float32)
  # One class to learn: predicted everywhere.
  assert list(linear_probe(features, np.array([2, 2, -1, 2]), features, 3)) == [2] * 4
  with pytest.raises(ValueError, match="no labelled"):
    linear_probe(features, np.full(4, -1), features, 3)
  # Too few iterations to converge: logged, not raised or warned.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    predictions = linear_probe(features, np.array([0, 1, 2, 0]), features, 3, steps=1)
  assert predictions.shape == (4,)


def _integer_points(rng, num, dim, density):
  """Small integers, many zeros: every product exact in float32, ties abound."""
  points = rng.integers(-2, 3, (num, dim)) * (rng.random((num, dim)) < density)
  return points.astype(np.float32)


# The share sets which columns go through the dense matmul: every one that is
# used at all (0), the common ones (0.3), none (2: all sparse).
@pytest.mark.parametrize("dense_share", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("query_block", [7, 1024])
def test_sparse_search_gives_the_dense_search_neighbours(monkeypatch, dense_share,
                                                         query_block):
  monkeypatch.setattr(metrics_lib, "_DENSE_COLUMN_SHARE", dense_share)
  rng = np.random.default_rng(0)
  # 203 candidates: 13 groups of 16 (the two-stage selection), padded.
  points = _integer_points(rng, 203, 40, 0.3)
  points[50] = points[10]            # identical rows: exact ties
  points[60] = 0                     # a row with no n-gram: ties with everyone
  exclude = np.arange(203)
  exclude[::5] = -1
  sparse = scipy.sparse.csr_matrix(points)
  scores, indices = sparse_top_k_search(sparse, sparse, 10, exclude=exclude,
                                        query_block=query_block)
  dense_scores, dense_indices = top_k_search(points, points, 10, exclude=exclude)
  assert scores.dtype == np.float32 and indices.dtype == np.int32
  np.testing.assert_array_equal(indices, dense_indices)
  np.testing.assert_array_equal(scores, dense_scores)
  # Fewer candidates than slots: -1 and -inf beyond them, as in the dense path.
  scores, indices = sparse_top_k_search(sparse[:30], sparse[:12], 20,
                                        exclude=np.arange(30) % 12,
                                        query_block=query_block)
  dense_scores, dense_indices = top_k_search(points[:30], points[:12], 20,
                                             exclude=np.arange(30) % 12)
  np.testing.assert_array_equal(indices, dense_indices)
  np.testing.assert_array_equal(scores, dense_scores)
  assert np.all(indices[:, 11:] == -1) and np.all(np.isneginf(scores[:, 11:]))


def test_sparse_search_within_small_memory_budgets(monkeypatch):
  # 208 padded candidates: 3 queries per block, 5 dense columns at most.
  monkeypatch.setattr(metrics_lib, "_DENSE_COLUMN_SHARE", 0.0)
  monkeypatch.setattr(metrics_lib, "_BLOCK_BYTES", 4 * 208 * 3)
  monkeypatch.setattr(metrics_lib, "_DENSE_BYTES", 4 * 208 * 5)
  points = _integer_points(np.random.default_rng(2), 203, 40, 0.3)
  sparse = scipy.sparse.csr_matrix(points)
  np.testing.assert_array_equal(
      sparse_top_k_search(sparse, sparse, 10, exclude=np.arange(203))[1],
      top_k_search(points, points, 10, exclude=np.arange(203))[1])


def test_sparse_rows_give_the_dense_rows_metrics():
  rng = np.random.default_rng(1)
  num_listings = 400
  products = rng.integers(0, 150, num_listings)
  categories = products % 6
  # Listings of a product share some columns, plus their own: TF-IDF-like rows.
  shared = rng.random((150, 300)) < 0.03
  rows = (shared[products] & (rng.random((num_listings, 300)) < 0.7)) | (
      rng.random((num_listings, 300)) < 0.02)
  rows = rows * rng.random((num_listings, 300))
  rows = (rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
          ).astype(np.float32)
  sparse = scipy.sparse.csr_matrix(rows)
  dense_metrics = same_product_retrieval(rows, products, categories)
  sparse_metrics = same_product_retrieval(sparse, products, categories, query_block=64)
  assert sparse_metrics == pytest.approx(dense_metrics, abs=1e-12)
  assert 0.05 < sparse_metrics["recall@10"] < 0.95
  labels = np.where(np.arange(num_listings) % 7 == 0, -1, categories)
  np.testing.assert_array_equal(
      knn_predict(sparse[:300], labels[:300], sparse[300:], k=5),
      knn_predict(rows[:300], labels[:300], rows[300:], k=5))


def test_top_k_rows_orders_ties_by_position_across_groups():
  # Scores of few distinct values: most of a row ties with its k-th best,
  # across the strided groups; a row of one value, a row of -inf but three.
  rng = np.random.default_rng(3)
  scores = rng.integers(0, 4, size=(9, 16 * 40)).astype(np.float32)
  scores[1] = 2.0
  scores[2] = -np.inf
  scores[2, [600, 7, 300]] = [1.0, 1.0, 5.0]
  for k in (1, 5, 39):
    values, positions = metrics_lib._top_k_rows(scores, k)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(scores, expected, 1))
  assert positions[2, :3].tolist() == [300, 7, 600]


def test_top_k_rows_of_mostly_tied_rows_against_a_stable_argsort():
  # Rows of mostly one value (a title sharing no n-gram with most
  # candidates), where many groups tie at the floor and a row is selected
  # without ordering all of it; a few values above it, several in one group.
  rng = np.random.default_rng(4)
  for _ in range(200):
    rows, width = int(rng.integers(1, 5)), 16 * int(rng.integers(2, 120))
    k = int(rng.integers(1, 30))
    scores = np.where(rng.random((rows, width)) < 0.9, 0.0,
                      rng.integers(0, 4, (rows, width))).astype(np.float32)
    scores[0, 5::width // 16] = 7.0   # one group's members all above the rest
    if rng.random() < 0.3:
      scores[-1] = -np.inf
    values, positions = metrics_lib._top_k_rows(scores, k)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(positions, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(scores, expected, 1))
