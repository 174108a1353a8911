"""Evaluation metrics: same-product retrieval (Recall@k, AP@k, per-query mean and
macro average over leaf categories), leaf-category prediction from frozen
features (k nearest neighbours in an index split; a linear probe, i.e.
multinomial logistic regression) and its accuracy and macro-F1.

The metrics are pure numpy on neighbour lists and predictions; retrieval and
k-NN run an exact search: dense rows (the embeddings, the histograms) the
on-device one of `item_jax.eval.search`, scipy sparse rows (the TF-IDF
baseline) `sparse_top_k_search` on the host, which never densifies the
feature matrix. Both rank by inner product, then by the lower candidate index,
so the same rows give the same neighbours either way.
"""

import dataclasses
import logging
import warnings

import numpy as np
import scipy.sparse
import sklearn.exceptions
import sklearn.linear_model
import threadpoolctl

from item_jax.eval.search import NO_NEIGHBOUR, check_search_inputs, top_k_search

RETRIEVAL_KS = (1, 5, 10)


def retrieval_metrics(neighbours: np.ndarray, query_rows: np.ndarray,
                      product_ids, category_ids, ks=RETRIEVAL_KS) -> dict:
  """Recall@k and AP@k of each query's ranked neighbours, averaged two ways.

  Args:
    neighbours: (num_queries, >= max(ks)) row indices into the listings, best
      first; -1 marks an empty slot (fewer candidates than slots).
    query_rows: (num_queries,) the row of each query among the listings.
    product_ids: (num_listings,) product of each listing (any hashable values).
    category_ids: (num_listings,) leaf category of each listing.
    ks: cut-offs.

  The relevant listings of a query are the other listings of its product
  (R of them, R >= 1 for every query). With hit_i = 1 when the neighbour at
  rank i (1-based) is relevant and P@i = (hits among ranks 1..i) / i:

    Recall@k = (sum_{i<=k} hit_i) / R
    AP@k     = (sum_{i<=k} P@i * hit_i) / min(k, R)

  so both are 1 exactly when the top k hold min(k, R) relevant listings
  first. "recall@k"/"map@k" average over queries; "macro_recall@k"/
  "macro_map@k" average each leaf category's query mean, so a small category
  counts as much as a large one.
  """
  neighbours = np.asarray(neighbours)
  query_rows = np.asarray(query_rows)
  if neighbours.shape[1] < max(ks):
    raise ValueError(f"{neighbours.shape[1]} neighbours per query; k up to "
                     f"{max(ks)} needs as many")
  _, products = np.unique(np.asarray(product_ids), return_inverse=True)
  listings_per_product = np.bincount(products)
  relevant = listings_per_product[products[query_rows]] - 1
  if np.any(relevant < 1):
    raise ValueError("every query needs at least one other listing of its product")
  found = neighbours != NO_NEIGHBOUR
  hits = found & (products[np.where(found, neighbours, 0)]
                  == products[query_rows][:, None])
  ranks = np.arange(1, neighbours.shape[1] + 1)
  precision_at_rank = np.cumsum(hits, axis=1) / ranks
  query_categories = np.asarray(category_ids)[query_rows]
  metrics = {"num_queries": int(len(query_rows)),
             "num_query_categories": int(len(np.unique(query_categories)))}
  for k in ks:
    recall = hits[:, :k].sum(axis=1) / relevant
    average_precision = ((precision_at_rank[:, :k] * hits[:, :k]).sum(axis=1)
                         / np.minimum(k, relevant))
    for name, per_query in ((f"recall@{k}", recall), (f"map@{k}", average_precision)):
      metrics[name] = float(per_query.mean()) if len(per_query) else 0.0
      metrics[f"macro_{name}"] = macro_average(per_query, query_categories)
  return metrics


def macro_average(values: np.ndarray, groups: np.ndarray) -> float:
  """The mean over groups of each group's mean value."""
  if not len(values):
    return 0.0
  _, group = np.unique(groups, return_inverse=True)
  sums = np.bincount(group, weights=values)
  return float(np.mean(sums / np.bincount(group)))


def retrieval_queries(product_ids) -> np.ndarray:
  """Rows whose product has at least two listings: the queries."""
  _, products, counts = np.unique(np.asarray(product_ids), return_inverse=True,
                                  return_counts=True)
  return np.flatnonzero(counts[products] >= 2)


def same_product_retrieval(embeddings, product_ids, category_ids,
                           ks=RETRIEVAL_KS, mesh=None, **search_options) -> dict:
  """Every listing with another of its product is a query; the candidates are
  all other listings; ranked by inner product (cosine for unit rows).
  `embeddings` are dense rows or a scipy sparse matrix (see `top_k_neighbours`)."""
  queries = retrieval_queries(product_ids)
  _, neighbours = top_k_neighbours(embeddings[queries], embeddings, max(ks),
                                   exclude=queries, mesh=mesh, **search_options)
  return retrieval_metrics(neighbours, queries, product_ids, category_ids, ks)


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict:
  """Accuracy and macro-F1; F1 is averaged over every class that occurs as a
  label or a prediction (a class never predicted scores 0)."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if not len(labels):
    return {"accuracy": 0.0, "macro_f1": 0.0}
  classes = np.union1d(labels, predictions)
  true_positive = np.array([np.sum((labels == c) & (predictions == c)) for c in classes])
  predicted = np.array([np.sum(predictions == c) for c in classes])
  actual = np.array([np.sum(labels == c) for c in classes])
  f1 = 2 * true_positive / (predicted + actual)
  return {"accuracy": float(np.mean(labels == predictions)),
          "macro_f1": float(np.mean(f1))}


def knn_predict(index_features, index_labels: np.ndarray, query_features,
                k: int = 10, mesh=None, **search_options) -> np.ndarray:
  """The majority label among each query's k most similar index rows.

  A tie in votes goes to the tied label whose best neighbour ranks highest.
  Index rows labelled -1 (no category) take no part. Features are dense rows
  or scipy sparse matrices (see `top_k_neighbours`).
  """
  votes, first_rank = knn_votes(index_features, index_labels, query_features, k,
                                mesh=mesh, **search_options)
  return np.argmax(knn_ranking(votes, first_rank, k), axis=1)


def knn_votes(index_features, index_labels: np.ndarray, query_features,
              k: int = 10, num_classes: int | None = None, mesh=None,
              **search_options) -> tuple[np.ndarray, np.ndarray]:
  """(votes, first_rank), each (num_queries, num_classes) int64: how many of
  each query's k most similar labelled index rows carry each label, and the
  0-based rank of the best of them (k for a label without a vote).
  `num_classes` defaults to the largest index label + 1."""
  labelled = np.flatnonzero(np.asarray(index_labels) >= 0)
  if not len(labelled):
    raise ValueError("the k-NN index has no labelled rows")
  index_labels = np.asarray(index_labels)[labelled]
  _, neighbours = top_k_neighbours(query_features, index_features[labelled], k,
                                   mesh=mesh, **search_options)
  if num_classes is None:
    num_classes = int(index_labels.max()) + 1
  found = neighbours != NO_NEIGHBOUR
  labels = index_labels[np.where(found, neighbours, 0)]
  rows = np.repeat(np.arange(len(neighbours)), k).reshape(labels.shape)
  votes = np.zeros((len(neighbours), num_classes), np.int64)
  np.add.at(votes, (rows[found], labels[found]), 1)
  first_rank = np.full((len(neighbours), num_classes), k, np.int64)
  ranks = np.broadcast_to(np.arange(k), labels.shape)
  np.minimum.at(first_rank, (rows[found], labels[found]), ranks[found])
  return votes, first_rank


def knn_ranking(votes: np.ndarray, first_rank: np.ndarray, k: int) -> np.ndarray:
  """One integer per (query, label) ordering labels as k-NN prefers them:
  votes first; among equal votes the earlier first rank wins."""
  return votes * (k + 1) + (k - first_rank)


def linear_probe(train_features, train_labels: np.ndarray, test_features,
                 num_classes: int, steps: int = 300, weight_decay: float = 1e-4,
                 ) -> np.ndarray:
  """Predicted labels of `test_features` from a softmax regression fitted on
  the labelled training rows: scikit-learn's multinomial `LogisticRegression`
  (L-BFGS, at most `steps` iterations), for dense rows and scipy sparse ones
  alike, so that every entry of a report gets the same probe.

  The objective is the mean cross-entropy + weight_decay / 2 * |W|^2 (the
  intercept is not penalised), i.e. sklearn's C = 1 / (weight_decay * n).
  Features are scaled so that training rows have unit mean squared distance
  to their mean, which lets one weight decay serve embeddings, TF-IDF vectors
  and histograms alike. Dense rows are also centred (sparse ones are not: that
  would densify them); with an unpenalised intercept centring does not move
  the optimum, it only conditions L-BFGS better for rows that all lie close
  to one direction (an untrained model's embeddings). L-BFGS is deterministic.

  Measured against the optax probe it replaced (300 full-batch Adam steps,
  learning rate 0.05, the same objective and scaling), 9,716 training and
  2,284 test listings of benchmarks/eval_scaling.py's synthetic catalogue, 27
  leaf categories, 2 busy CPU cores: on TF-IDF rows (20,768 n-grams) accuracy
  0.9991 in 1.6 s against Adam's 0.9996 in 82 s (Adam needs them dense); on
  dense rows (384- and 32-d truncated SVDs of those rows, without and with
  noise; 384-d random rows; 64-d rows all near one direction) 0.9987 /
  0.9926 / 0.9457 / 0.6835 / 1.0000 / 0.6585 against 0.9991 / 0.9921 /
  0.9466 / 0.6795 / 1.0000 / 0.6589, in 0.1-0.7 s against 0.2-2.8 s. The two
  agree to a few test listings either way, so every entry gets this one. On
  100,000 listings (79,933 training rows): 6 s on TF-IDF rows, 3 s on 384-d.

  Rows may also be a tuple of blocks of the same listings, e.g. (embeddings,
  TF-IDF rows): each block is scaled (dense ones centred) on its own, then
  they are set side by side (`FittedProbe`), so the probe weighs the
  embedding and the words itself.
  """
  probe = fit_probe(train_features, train_labels, num_classes, steps, weight_decay)
  return probe.predict(test_features)


@dataclasses.dataclass(frozen=True)
class FittedProbe:
  """`linear_probe`'s fitted softmax regression: its feature scaling and
  scikit-learn's model over `classes` (the labels that occur in training;
  None when only one does).

  Rows are one block (dense or scipy sparse) or a tuple of blocks of the same
  listings, e.g. (embeddings, TF-IDF rows): `scalings` holds one (mean,
  scale) per block, each block scaled (and, if dense, centred on `mean`;
  sparse blocks have mean None) on its own, so that each block reaches the
  probe at the same spread whatever its width; the blocks are then set side
  by side."""

  model: "sklearn.linear_model.LogisticRegression | None"
  classes: np.ndarray
  num_classes: int
  scalings: tuple   # ((mean | None, scale), ...), one per block
  widths: tuple     # each block's number of columns

  @property
  def mean(self) -> np.ndarray | None:
    """The first block's mean (the only block's, for one-block rows)."""
    return self.scalings[0][0]

  @property
  def scale(self) -> float:
    return self.scalings[0][1]

  def features(self, rows):
    """Rows scaled (and centred) as the training rows were; the blocks of a
    tuple side by side (sparse if any block is)."""
    blocks = _blocks(rows)
    if len(blocks) != len(self.scalings):
      raise ValueError(f"the probe was fitted on {len(self.scalings)} blocks of "
                       f"features; got {len(blocks)}")
    scaled = [_scaled(block, mean, scale)
              for block, (mean, scale) in zip(blocks, self.scalings)]
    if len(scaled) == 1:
      return scaled[0]
    if any(scipy.sparse.issparse(block) for block in scaled):
      return scipy.sparse.hstack(scaled, format="csr")
    return np.concatenate(scaled, axis=1)

  def predict(self, rows) -> np.ndarray:
    if self.model is None:
      return np.full(_num_rows(rows), self.classes[0])
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
      return self.model.predict(self.features(rows))

  def predict_proba(self, rows) -> np.ndarray:
    """(num_rows, num_classes) probabilities; labels never seen in training
    get 0."""
    out = np.zeros((_num_rows(rows), self.num_classes))
    if self.model is None:
      out[:, self.classes[0]] = 1.0
      return out
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
      out[:, self.classes] = self.model.predict_proba(self.features(rows))
    return out

  def logit_weights(self) -> tuple[np.ndarray, np.ndarray]:
    """(weights (len(classes), dim), bias (len(classes),)) such that the
    probabilities over `classes` are softmax(features(rows) @ weights.T +
    bias): sklearn's binary model (one row, a sigmoid) as the equivalent
    two-row softmax with a zero first row. `dim` is the blocks' widths
    summed, in their order."""
    if self.model is None:
      return np.zeros((1, self.dim)), np.zeros(1)
    weights, bias = self.model.coef_, self.model.intercept_
    if len(self.classes) == 2:
      weights = np.concatenate([np.zeros_like(weights), weights])
      bias = np.concatenate([np.zeros_like(bias), bias])
    return weights, bias

  @property
  def dim(self) -> int:
    return sum(self.widths)


def _blocks(rows) -> tuple:
  return tuple(rows) if isinstance(rows, tuple) else (rows,)


def _scaled(block, mean, scale):
  if scipy.sparse.issparse(block):
    if mean is not None:
      raise ValueError("the probe was fitted on dense rows; got sparse ones")
    return scipy.sparse.csr_matrix(block, dtype=np.float64) * scale
  block = np.asarray(block, np.float64)
  return (block - mean) * scale if mean is not None else block * scale


def _num_rows(rows) -> int:
  rows = _blocks(rows)[0]
  return rows.shape[0] if scipy.sparse.issparse(rows) else np.shape(rows)[0]


def _take(rows, positions):
  """The rows at `positions` of one block or of each block of a tuple."""
  blocks = tuple(block if scipy.sparse.issparse(block) else np.asarray(block)
                 for block in _blocks(rows))
  taken = tuple(block[positions] for block in blocks)
  return taken if isinstance(rows, tuple) else taken[0]


def fit_probe(train_features, train_labels: np.ndarray, num_classes: int,
              steps: int = 300, weight_decay: float = 1e-4,
              block_weights=None) -> FittedProbe:
  """`linear_probe`'s fit (see there) on the rows labelled >= 0;
  `train_features` is one block of rows or a tuple of blocks (see
  `FittedProbe`). `block_weights` (one per block, default 1) multiply each
  block's scale after it is brought to unit spread: a block weighted b
  reaches the probe b times as spread, so the L2 penalty weighs its
  coefficients 1 / b^2 as much."""
  labelled = np.flatnonzero(np.asarray(train_labels) >= 0)
  labels = np.asarray(train_labels)[labelled]
  if not len(labels):
    raise ValueError("the linear probe has no labelled training rows")
  if np.max(labels) >= num_classes:
    raise ValueError(f"training label {np.max(labels)} is not below num_classes "
                     f"= {num_classes}")
  if len({_num_rows(block) for block in _blocks(train_features)}) != 1:
    raise ValueError("the blocks of the probe's rows have different numbers of rows")
  classes = np.unique(labels)
  train = _blocks(_take(train_features, labelled))
  weights = (1.0,) * len(train) if block_weights is None else tuple(block_weights)
  if len(weights) != len(train) or min(weights) <= 0:
    raise ValueError(f"block_weights {block_weights}: one positive weight per block")
  scalings = tuple((mean, scale * weight) for (mean, scale), weight in zip(
      (_probe_scaling(block) for block in train), weights))
  widths = tuple(int(block.shape[1]) for block in train)
  if len(classes) == 1:   # LogisticRegression needs two classes
    return FittedProbe(None, classes, num_classes, scalings, widths)
  probe = FittedProbe(sklearn.linear_model.LogisticRegression(
      C=1.0 / (weight_decay * len(labels)), solver="lbfgs", max_iter=steps,
      random_state=0), classes, num_classes, scalings, widths)
  features = probe.features(train if isinstance(train_features, tuple) else train[0])
  # One BLAS thread: the products are small, and OpenBLAS's spinning threads
  # made the fit 3-30x slower on a busy machine (2 cores, load 3-4).
  with threadpoolctl.threadpool_limits(1, user_api="blas"), \
       warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", sklearn.exceptions.ConvergenceWarning)
    probe.model.fit(features, labels)
  if any(issubclass(w.category, sklearn.exceptions.ConvergenceWarning)
         for w in caught):
    logging.warning("linear probe: L-BFGS stopped at its %d iterations before "
                    "converging", steps)
  return probe


# The balances `fit_balanced_probe` tries: the last block's weight against
# the others' 1 (e.g. TF-IDF beside an embedding).
BLOCK_BALANCES = (1.0, 2.0, 4.0, 8.0)


def fit_balanced_probe(train_features: tuple, train_labels: np.ndarray,
                       num_classes: int, validation=None, steps: int = 300,
                       weight_decay: float = 1e-4,
                       balances=BLOCK_BALANCES) -> tuple:
  """(probe, balance, {balance: validation accuracy}): `fit_probe` on a tuple
  of blocks with the last block weighted by each of `balances`, the one
  with the best accuracy on `validation` ((blocks, labels); ties to the
  smaller weight) kept. Without labelled validation rows: balance 1, {}.

  Why: at equal spread a dense block whose signal sits in a few directions
  is cheaper to weigh under the L2 penalty than thousands of sparse n-grams,
  so the probe can lean on a weak embedding and fall below the words alone
  (BENCHMARKS.md, "Categories from the embedding and the words together");
  the balance is fitted where labels allow, as the retrieval fusion's w is."""
  others = (1.0,) * (len(train_features) - 1)
  if validation is not None:
    blocks, labels = validation
    labelled = np.flatnonzero(np.asarray(labels) >= 0)
  if validation is None or not len(labelled):
    return fit_probe(train_features, train_labels, num_classes, steps,
                     weight_decay, others + (1.0,)), 1.0, {}
  rows, labels = _take(tuple(blocks), labelled), np.asarray(labels)[labelled]
  best, tried = None, {}
  for balance in balances:
    probe = fit_probe(train_features, train_labels, num_classes, steps,
                      weight_decay, others + (float(balance),))
    tried[float(balance)] = float(np.mean(probe.predict(rows) == labels))
    if best is None or tried[float(balance)] > tried[best[1]]:
      best = (probe, float(balance))
  return best[0], best[1], tried


def _probe_scaling(train) -> tuple[np.ndarray | None, float]:
  """(mean, scale): scale is 1 / the training rows' root mean squared
  distance to their mean; dense rows are centred on `mean` too, sparse ones
  are not (mean None)."""
  if scipy.sparse.issparse(train):
    train = scipy.sparse.csr_matrix(train, dtype=np.float64)
    mean = np.asarray(train.mean(axis=0)).ravel()
    spread = train.multiply(train).sum() / train.shape[0] - mean @ mean
    return None, 1.0 / (np.sqrt(max(spread, 0.0)) or 1.0)
  train = np.asarray(train, np.float64)
  mean = train.mean(axis=0)
  scale = 1.0 / (np.sqrt(np.mean(np.sum(np.square(train - mean), axis=1))) or 1.0)
  return mean, float(scale)


def top_k_neighbours(queries, candidates, k: int, *, exclude=None, mesh=None,
                     **search_options):
  """`top_k_search` for dense rows, `sparse_top_k_search` when either side is
  a scipy sparse matrix (which takes only `query_block` of the options)."""
  if scipy.sparse.issparse(queries) or scipy.sparse.issparse(candidates):
    options = {name: search_options[name] for name in ("query_block",)
               if name in search_options}
    return sparse_top_k_search(queries, candidates, k, exclude=exclude, **options)
  return top_k_search(queries, candidates, k, exclude=exclude, mesh=mesh,
                      **search_options)


# sparse_top_k_search: candidate columns (n-grams) set in at least this share of
# the candidates are multiplied densely, at most _MAX_DENSE_COLUMNS of them and
# at most _DENSE_BYTES of them dense; a query block's scores take at most
# _BLOCK_BYTES (fewer queries per block when the candidates are many).
_DENSE_COLUMN_SHARE = 0.05
_MAX_DENSE_COLUMNS = 1024
_DENSE_BYTES = _BLOCK_BYTES = 2 ** 29
# Scores per group in the two-stage selection (as in item_jax.eval.search);
# a row with more than _TIED_GROUPS x k groups reaching its floor (ties) is
# selected on its own (`_top_k_tied_row`).
_GROUP = 16
_TIED_GROUPS = 4


def sparse_top_k_search(queries, candidates, k: int, *, exclude=None,
                        query_block: int = 1024):
  """The k candidates with the largest inner product for each query, for
  scipy sparse rows (e.g. TF-IDF), on the host.

  Same arguments and results as `item_jax.eval.search.top_k_search`: (scores,
  indices) of shape (num_queries, k), float32 and int32, best first, ties to
  the lower candidate index, `exclude` (one candidate per query, or -1)
  never returned, slots beyond the candidates -1 with score -inf. See
  `SparseCandidates`, which keeps the candidates' preparation for several
  searches.
  """
  return SparseCandidates(candidates).search(queries, k, exclude=exclude,
                                             query_block=query_block)


class SparseCandidates:
  """Sparse candidate rows prepared once for exact top-k searches.

  Queries go `query_block` at a time; neither side is ever made dense as a
  whole. A block's (query_block x candidates) scores are one dense float32
  array, summed from two products: the columns that many candidates use (the
  common n-grams, which make the scores dense anyway) as a dense BLAS matmul,
  the others as a sparse product, whose far sparser result is added in. The top k
  are then picked exactly (`_top_k_rows`): each row's k-th largest maximum
  over groups of candidates bounds its k-th best score from below, and only
  the candidates at or above it are ordered.
  """

  def __init__(self, candidates):
    candidates = scipy.sparse.csr_matrix(candidates, dtype=np.float32)
    self.num_candidates, self.dim = candidates.shape
    # Empty rows pad the candidates to whole groups; they score -inf.
    self.width = width = -(-self.num_candidates // _GROUP) * _GROUP
    candidates = scipy.sparse.vstack(
        [candidates, scipy.sparse.csr_matrix((width - self.num_candidates, self.dim),
                                             dtype=np.float32)], format="csr")
    uses = np.bincount(candidates.indices, minlength=self.dim)
    dense = np.flatnonzero(uses >= _DENSE_COLUMN_SHARE * max(self.num_candidates, 1))
    max_dense = min(_MAX_DENSE_COLUMNS, _DENSE_BYTES // (4 * max(width, 1)))
    if len(dense) > max_dense:
      dense = np.sort(np.argsort(-uses, kind="stable")[:max_dense])
    self.dense_columns = dense
    self.sparse_columns = np.setdiff1d(np.arange(self.dim), dense)
    self.dense = np.ascontiguousarray(candidates[:, dense].toarray().T)
    self.sparse = candidates[:, self.sparse_columns].T.tocsr()

  def search(self, queries, k: int, *, exclude=None, query_block: int = 1024):
    """(scores, indices) of `queries`' best k candidates (see
    `sparse_top_k_search`)."""
    queries = scipy.sparse.csr_matrix(queries, dtype=np.float32)
    num_queries = queries.shape[0]
    check_search_inputs(queries.shape, (self.num_candidates, self.dim), k)
    exclude = (np.full(num_queries, NO_NEIGHBOUR, np.int64) if exclude is None
               else np.asarray(exclude, np.int64))
    scores = np.full((num_queries, k), -np.inf, np.float32)
    indices = np.full((num_queries, k), NO_NEIGHBOUR, np.int32)
    if self.num_candidates == 0 or num_queries == 0:
      return scores, indices
    dense_queries = queries[:, self.dense_columns]
    sparse_queries = queries[:, self.sparse_columns].tocsr()
    query_block = max(1, min(query_block, _BLOCK_BYTES // (4 * self.width)))
    for start in range(0, num_queries, query_block):
      stop = min(start + query_block, num_queries)
      block = dense_queries[start:stop].toarray() @ self.dense
      block += (sparse_queries[start:stop] @ self.sparse).toarray()
      block[:, self.num_candidates:] = -np.inf
      excluded = np.flatnonzero(exclude[start:stop] >= 0)
      block[excluded, exclude[start:stop][excluded]] = -np.inf
      top_scores, top_indices = _top_k_rows(block, min(k, self.width))
      scores[start:stop, :top_scores.shape[1]] = top_scores
      indices[start:stop, :top_scores.shape[1]] = np.where(
          np.isneginf(top_scores), NO_NEIGHBOUR, top_indices)
    return scores, indices


def _top_k_rows(scores: np.ndarray, k: int):
  """(values, positions) of each row's k largest scores, by (score desc, then
  position asc); the row length is a multiple of _GROUP.

  Each row's positions fall into groups (group j: j, j + G, j + 2G, ..., G =
  length / _GROUP), whose maxima are an elementwise maximum of _GROUP
  contiguous slices of the row (vectorised: an order of magnitude faster
  than the maxima of contiguous runs). The k groups with the largest maxima
  each hold a score at least the k-th largest maximum, so the row's k best
  scores are all at least it: only the positions at or above it, in the
  groups that reach it (about k of them), are ordered. A row where many
  groups tie at it (e.g. a title that shares no n-gram with any candidate:
  all zeros) is selected by `_top_k_tied_row` instead."""
  rows, width = scores.shape
  if width // _GROUP <= k:
    positions = _top_k_positions(scores, k)
    return np.take_along_axis(scores, positions, axis=1), positions
  num_groups = width // _GROUP
  maxima = scores.reshape(rows, _GROUP, num_groups).max(axis=1)
  floor = -np.partition(-maxima, k - 1, axis=1)[:, k - 1]
  reached = maxima >= floor[:, None]
  tied_rows = np.flatnonzero(reached.sum(axis=1) > _TIED_GROUPS * k)
  values = np.empty((rows, k), scores.dtype)
  positions = np.empty((rows, k), np.int64)
  for tied in tied_rows:
    values[tied], positions[tied] = _top_k_tied_row(scores[tied], maxima[tied],
                                                    floor[tied], k)
  reached[tied_rows] = False
  # The groups whose maximum reaches the floor, then their members that do.
  group_row, group = np.nonzero(reached)
  members = group[:, None] + num_groups * np.arange(_GROUP)
  member_values = scores[group_row[:, None], members]
  kept = member_values >= floor[group_row, None]
  row = np.broadcast_to(group_row[:, None], members.shape)[kept]
  position, value = members[kept], member_values[kept]
  order = np.lexsort((position, -value, row))   # by row, score desc, position
  others = np.setdiff1d(np.arange(rows), tied_rows)
  first = np.searchsorted(row[order], others)
  best = order[first[:, None] + np.arange(k)]   # every row has k at least
  values[others], positions[others] = value[best], position[best]
  return values, positions


def _top_k_tied_row(row: np.ndarray, maxima: np.ndarray, floor, k: int):
  """`_top_k_rows` for one row where many groups' maxima tie at its floor:
  the scores above the floor (in the fewer than k groups whose maximum is
  above it), best first, then the lowest positions that equal the floor,
  found in a prefix of the row where there are enough of them (all of the
  row otherwise), never ordering the whole row."""
  num_groups = len(maxima)
  above = (np.flatnonzero(maxima > floor)[:, None]
           + num_groups * np.arange(_GROUP)).ravel()
  above = above[row[above] > floor]
  above = above[np.lexsort((above, -row[above]))][:k]
  needed = k - len(above)
  prefix = min(len(row), max(1024, 64 * needed))
  ties = np.flatnonzero(row[:prefix] == floor)
  if len(ties) < needed:
    ties = np.flatnonzero(row == floor)
  positions = np.concatenate([above, ties[:needed]])
  return row[positions], positions


def _top_k_positions(values: np.ndarray, k: int) -> np.ndarray:
  """(rows, min(k, n)) positions of each row's best values, by (value desc,
  then position asc), as a stable argsort of -values would give them."""
  rows, width = values.shape
  if k >= width:
    return np.argsort(-values, axis=1, kind="stable")
  kth = -np.partition(-values, k - 1, axis=1)[:, k - 1:k]   # each row's k-th best
  above, tied = values > kth, values == kth
  room = k - above.sum(axis=1, keepdims=True)   # tied slots, the lowest positions
  chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
  positions = np.nonzero(chosen)[1].reshape(rows, k)
  order = np.argsort(-np.take_along_axis(values, positions, axis=1), axis=1,
                     kind="stable")
  return np.take_along_axis(positions, order, axis=1)
