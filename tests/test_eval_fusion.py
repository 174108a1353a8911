"""Hybrid scores: an embedding's cosine fused with TF-IDF's."""

import numpy as np
import pytest
import scipy.sparse

from item_jax.eval.fusion import (FUSION_WEIGHTS, fit_added_weight, fit_weight, fuse,
                                  fuse_blocks)


def _rows(seed, count=12, dim=5, sparse_dim=9):
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(count, dim)).astype(np.float32) * 3.0
  tfidf = np.abs(rng.normal(size=(count, sparse_dim))) * (rng.random((count, sparse_dim)) < 0.4)
  tfidf[0] = 0.0                      # a listing without a title
  norms = np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-12)
  return dense, scipy.sparse.csr_matrix((tfidf / norms).astype(np.float32))


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_fused_inner_products_are_the_weighted_cosines(weight):
  dense, tfidf = _rows(0)
  fused = fuse(dense, tfidf, weight)
  unit = dense / np.linalg.norm(dense, axis=1, keepdims=True)
  expected = weight * unit @ unit.T + (1 - weight) * (tfidf @ tfidf.T).toarray()
  np.testing.assert_allclose((fused @ fused.T).toarray(), expected, atol=1e-5)
  assert scipy.sparse.issparse(fused)


def test_bad_fusion_inputs_are_named():
  dense, tfidf = _rows(0)
  with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
    fuse(dense, tfidf, 1.5)
  with pytest.raises(ValueError, match="12 embedding rows against 11"):
    fuse(dense, tfidf[:11], 0.5)
  with pytest.raises(ValueError, match="nothing to fit"):
    fit_weight(dense, tfidf, np.arange(12).astype(str), np.zeros(12, int))


def test_the_fitted_weight_follows_the_side_that_finds_the_products():
  """Pairs that only the embedding can tell apart pull the weight to it;
  pairs only the words tell apart pull it to TF-IDF."""
  count = 40
  products = np.repeat(np.arange(count // 2), 2).astype(str)
  categories = np.zeros(count, int)
  rng = np.random.default_rng(1)
  signal = rng.normal(size=(count // 2, 16))
  informative = np.repeat(signal, 2, axis=0) + 0.05 * rng.normal(size=(count, 16))
  noise = rng.normal(size=(count, 16))
  as_tfidf = lambda rows: scipy.sparse.csr_matrix(
      np.abs(rows) / np.linalg.norm(np.abs(rows), axis=1, keepdims=True))
  weight, tried = fit_weight(informative, as_tfidf(noise), products, categories)
  assert list(tried) == list(FUSION_WEIGHTS)
  assert tried[weight] == max(tried.values()) > tried[0.0] + 0.3
  weight, tried = fit_weight(noise, as_tfidf(informative), products, categories)
  assert weight < 1.0 and tried[weight] == max(tried.values()) > tried[1.0] + 0.3


def test_several_embeddings_fuse_with_the_words_as_their_weighted_cosines():
  dense, tfidf = _rows(0)
  other, _ = _rows(1)
  weights = (0.2, 0.5, 0.3)
  fused = fuse_blocks([dense, other], tfidf, weights)
  cosines = lambda rows: (rows / np.linalg.norm(rows, axis=1, keepdims=True)) @ (
      rows / np.linalg.norm(rows, axis=1, keepdims=True)).T
  expected = (0.2 * cosines(dense) + 0.5 * cosines(other)
              + 0.3 * (tfidf @ tfidf.T).toarray())
  np.testing.assert_allclose((fused @ fused.T).toarray(), expected, atol=1e-5)
  # One embedding: the two-way fusion.
  np.testing.assert_allclose(fuse_blocks([dense], tfidf, (0.3, 0.7)).toarray(),
                             fuse(dense, tfidf, 0.3).toarray())
  with pytest.raises(ValueError, match="3 fusion weights for 1 embeddings"):
    fuse_blocks([dense], tfidf, weights)
  with pytest.raises(ValueError, match="sum to 1"):
    fuse_blocks([dense, other], tfidf, (0.5, 0.5, 0.5))
  with pytest.raises(ValueError, match="12 embedding rows against 11"):
    fuse_blocks([dense, other], tfidf[:11], weights)


def test_an_embedding_added_to_a_fitted_hybrid_gets_the_share_it_earns():
  count = 40
  products = np.repeat(np.arange(count // 2), 2).astype(str)
  rng = np.random.default_rng(2)
  informative = (np.repeat(rng.normal(size=(count // 2, 16)), 2, axis=0)
                 + 0.05 * rng.normal(size=(count, 16)))
  noise = rng.normal(size=(count, 16))
  words = np.abs(rng.normal(size=(count, 16)))
  words = scipy.sparse.csr_matrix(words / np.linalg.norm(words, axis=1, keepdims=True))
  categories = np.zeros(count, int)
  # Added to a hybrid of noise, the informative embedding takes the most.
  weights, tried = fit_added_weight(informative, noise, 0.6, words, products, categories)
  assert list(tried) == list(FUSION_WEIGHTS)
  assert tried[weights[0]] == max(tried.values()) > tried[0.0] + 0.3
  assert weights[0] >= 0.5 and sum(weights) == pytest.approx(1.0)
  # The hybrid keeps its own ratio of MobileNetV2 to words.
  assert weights[1] == pytest.approx((1 - weights[0]) * 0.6, abs=1e-6)
  # Noise added to an informative hybrid earns nothing: a = 0 is that hybrid.
  weights, tried = fit_added_weight(noise, informative, 1.0, words, products, categories)
  assert weights == (0.0, 1.0, 0.0) and tried[0.0] == max(tried.values())
  with pytest.raises(ValueError, match="nothing to fit"):
    fit_added_weight(noise, noise, 0.5, words, np.arange(count).astype(str), categories)
