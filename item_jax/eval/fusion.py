"""Hybrid scores: an embedding's cosine and the titles' TF-IDF cosine, fused.

score(a, b) = w cos(embedding_a, embedding_b) + (1 - w) cos(tfidf_a, tfidf_b)

`fuse` writes it as rows (sqrt(w) x the unit embedding beside sqrt(1 - w) x
the unit TF-IDF row), so the exact searches and every metric take fused
rows as they take any other: an inner product of two fused rows is the
fused score. `fit_weight` picks w on a labelled split (same-product ids) by
its macro Recall@10 (macro MAP@10 breaks ties, then the smaller weight:
the words, which need no model, win a draw); the weight is then applied, as
it is, to another split.
"""

import numpy as np
import scipy.sparse

from item_jax.eval.metrics import retrieval_queries, same_product_retrieval

# w = 0 is TF-IDF alone, w = 1 the embedding alone.
FUSION_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
FIT_METRICS = ("macro_recall@10", "macro_map@10")


def unit_rows(dense: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length; all-zero rows stay zero."""
  dense = np.asarray(dense, np.float32)
  norms = np.linalg.norm(dense, axis=1, keepdims=True)
  return dense / np.maximum(norms, 1e-12)


def fuse(dense: np.ndarray, sparse, weight: float) -> scipy.sparse.csr_matrix:
  """Rows whose inner products are `weight` x the cosine of `dense`'s rows
  plus (1 - `weight`) x the inner product of `sparse`'s (unit) rows."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"fusion weight {weight} is not in [0, 1]")
  if dense.shape[0] != sparse.shape[0]:
    raise ValueError(f"{dense.shape[0]} embedding rows against {sparse.shape[0]} "
                     "TF-IDF rows")
  return scipy.sparse.hstack(
      [scipy.sparse.csr_matrix(unit_rows(dense) * np.float32(np.sqrt(weight))),
       scipy.sparse.csr_matrix(sparse, dtype=np.float32)
       * np.float32(np.sqrt(1.0 - weight))], format="csr")


def fit_weight(dense: np.ndarray, sparse, product_ids: np.ndarray,
               category_ids: np.ndarray, weights=FUSION_WEIGHTS,
               mesh=None) -> tuple[float, dict]:
  """(the best weight, {weight: macro Recall@10}) for same-product
  retrieval on these labelled listings."""
  if not len(retrieval_queries(product_ids)):
    raise ValueError("no listing shares its product with another: nothing to "
                     "fit a fusion weight on")
  scores, best, best_key = {}, None, None
  for weight in weights:
    result = same_product_retrieval(fuse(dense, sparse, weight), product_ids,
                                    category_ids, mesh=mesh)
    key = tuple(result[name] for name in FIT_METRICS)
    scores[weight] = key[0]
    if best_key is None or key > best_key:
      best, best_key = weight, key
  return best, scores
