"""The TF-IDF and colour-histogram baselines, and the [CLS] attention share."""

import collections
import math

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
from flax import nnx

from helpers import tiny_batch, tiny_model
from item_jax.eval.embed import (image_attention_share, last_layer_cls_attention,
                                 on_images)
from item_jax.eval.evaluate import colour_histograms
from item_jax.eval.fusion import tfidf_features, tfidf_vectorizer


def _char_ngrams(title, sizes=(2, 3, 4)):
  """The convention, spelt out: lower case, single spaces, a space at each end."""
  text = " " + " ".join(title.lower().split()) + " "
  return [text[start:start + size] for size in sizes
          for start in range(len(text) - size + 1)]


def test_ngrams_are_lower_case_cross_words_and_mark_word_ends():
  analyzer = tfidf_vectorizer(ngram_range=(2, 2)).build_analyzer()
  assert analyzer("Ab \t C") == [" a", "ab", "b ", " c", "c "]
  assert tfidf_vectorizer(ngram_range=(3, 3)).build_analyzer()("x") == [" x "]
  assert "b c" in tfidf_vectorizer().build_analyzer()("ab c")
  title = "Kovo  KX-204 RED mug\n"
  assert sorted(tfidf_vectorizer().build_analyzer()(title)) == sorted(_char_ngrams(title))


def _full_tfidf_cosine(titles):
  """TF-IDF cosine over every n-gram, straight from the definitions."""
  counts = [collections.Counter(_char_ngrams(title)) for title in titles]
  document_frequency = collections.Counter(g for c in counts for g in c)
  idf = {g: math.log((1 + len(titles)) / (1 + df)) + 1
         for g, df in document_frequency.items()}
  vectors = [{g: (1 + math.log(n)) * idf[g] for g, n in c.items()} for c in counts]
  norms = [math.sqrt(sum(v * v for v in vector.values())) for vector in vectors]
  return np.array([[sum(a[g] * b.get(g, 0.0) for g in a) / (na * nb)
                    for b, nb in zip(vectors, norms)] for a, na in zip(vectors, norms)])


def test_tfidf_rows_are_sparse_with_exact_cosines_over_shared_ngrams():
  titles = {"train": ["Kovo KX-204 red mug", "kovo kx-208 mug", "Arlen kettle 1.7l"],
            "test": ["KOVO KX-204 MUG", "zzz"]}
  features = tfidf_features(titles)
  for split, rows in features.items():
    assert scipy.sparse.issparse(rows) and rows.format == "csr", split
    assert rows.dtype == np.float32
  assert features["train"].shape[0] == 3 and features["test"].shape[0] == 2
  rows = scipy.sparse.vstack([features["train"], features["test"]]).tocsr()
  # Columns: exactly the n-grams found in two or more titles.
  counts = collections.Counter(g for t in titles["train"] + titles["test"]
                               for g in set(_char_ngrams(t)))
  assert rows.shape[1] == sum(1 for n in counts.values() if n >= 2)
  assert np.all(np.diff(rows.tocsc().indptr) >= 2)
  expected = _full_tfidf_cosine(titles["train"] + titles["test"])
  cosine = (rows @ rows.T).toarray()
  off_diagonal = ~np.eye(5, dtype=bool)
  np.testing.assert_allclose(cosine[off_diagonal], expected[off_diagonal], atol=1e-6)
  # "zzz" shares nothing with the others: its kept columns are all zero.
  assert features["test"][1].nnz == 0
  assert cosine[0, 3] > cosine[0, 1] > cosine[0, 2]
  assert np.all(np.diag(cosine) <= 1 + 1e-6)


def test_tfidf_cosine_of_identical_titles_is_one_of_disjoint_ones_zero():
  titles = {"train": ["abc def", "xyz", "ABC   def", "xyz qq"], "test": ["abc  DEF "]}
  features = tfidf_features(titles)
  rows = scipy.sparse.vstack([features["train"], features["test"]]).tocsr()
  cosine = (rows @ rows.T).toarray()
  # Case and spacing aside the same title: every n-gram shared, nothing dropped.
  for a, b in ((0, 2), (0, 4), (2, 4)):
    assert cosine[a, b] == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(scipy.sparse.linalg.norm(rows[[0, 2, 4]], axis=1), 1.0,
                             rtol=1e-6)
  # No n-gram in common, so not even a space pair: orthogonal.
  assert cosine[0, 1] == 0.0 and cosine[0, 3] == 0.0
  assert 0.0 < cosine[1, 3] < 1.0


def test_colour_histogram_of_a_two_colour_image():
  image = np.zeros((1, 4, 4, 3), np.float32)         # normalised 0 -> grey 0.5
  image[0, :, :1] = [1.0, -1.0, -1.0]                # a red column: 1/4 of pixels
  histogram = colour_histograms(image)
  assert histogram.shape == (1, 512)
  red, grey = (7 * 8 + 0) * 8 + 0, (4 * 8 + 4) * 8 + 4
  assert np.flatnonzero(histogram[0]).tolist() == sorted([red, grey])
  assert histogram[0, grey] / histogram[0, red] == pytest.approx(math.sqrt(3))
  assert np.linalg.norm(histogram[0]) == pytest.approx(1.0)


def test_image_features_of_batches_with_and_without_photos_have_one_width():
  """Zero rows for listings without a photo, and for a whole batch of them:
  the batches' features stack into one array."""
  features = on_images(colour_histograms, 8 ** 3)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  valid = np.array([True, True, True, False])
  some = features({"image": images, "valid": valid,
                   "has_image": np.array([True, False, True, True])})
  none = features({"image": images, "valid": valid, "has_image": np.zeros(4, bool)})
  assert some.shape == none.shape == (3, 512)
  np.testing.assert_allclose(some[[0, 2]], colour_histograms(images[[0, 2]]), atol=1e-6)
  assert not some[1].any() and not none.any()
  assert np.concatenate([some, none]).shape == (6, 512)


def test_recomputed_cls_attention_reproduces_the_fused_attention():
  model = tiny_model()
  batch = tiny_batch()
  title_ids, image = batch["title_ids"], batch["image"]
  title_mask = title_ids != 0
  probabilities = last_layer_cls_attention(model, title_ids, image)
  assert probabilities.shape == (4, 4, 1 + 10 + 16)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.max(probabilities[:, :, 1:11] * ~title_mask[:, None])) == 0.0
  # Weighting the last block's values by these probabilities (then its output
  # projection) gives what the block's own fused attention gives for [CLS].
  before = model.encode(title_ids, image, num_layers=1)
  inputs = jnp.concatenate([before.cls[:, None], before.title_states,
                            before.patch_states], axis=1)
  attention = model.layers[-1].attention
  values = attention.value(inputs).reshape(4, 27, 4, 16)
  mixed = jnp.einsum("bhk,bkhd->bhd", probabilities, values).reshape(4, 64)
  token_mask = jnp.concatenate([jnp.ones((4, 1), bool), title_mask,
                                jnp.ones((4, 16), bool)], axis=1)
  np.testing.assert_allclose(attention.output(mixed), attention(inputs, token_mask)[:, 0],
                             atol=1e-5)
  # And the last block's input is what the full encoder's last block reads.
  full = model.encode(title_ids, image)
  last = model.layers[-1](inputs, token_mask)
  np.testing.assert_allclose(last[:, 0], full.cls, atol=1e-5)

  share, uniform = nnx.jit(image_attention_share)(model, title_ids, image)
  np.testing.assert_allclose(share, probabilities[..., 11:].sum(-1).mean(-1), rtol=1e-6)
  np.testing.assert_allclose(uniform, 16 / (1 + title_mask.sum(-1) + 16), rtol=1e-6)


def test_listings_without_a_product_id_are_products_of_their_own():
  from item_jax.eval.embed import own_products
  from item_jax.eval.metrics import retrieval_queries
  products = own_products(np.asarray(["p1", "", "p1", ""]),
                          np.asarray(["a", "b", "c", "d"]))
  assert list(products) == ["p1", "item:b", "p1", "item:d"]
  np.testing.assert_array_equal(retrieval_queries(products), [0, 2])
  # A catalogue without product ids has nothing to retrieve.
  assert not len(retrieval_queries(own_products(np.asarray(["", ""]),
                                                np.asarray(["a", "b"]))))
