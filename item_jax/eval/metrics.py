"""Evaluation metrics: same-product retrieval (Recall@k, AP@k, per-query mean and
macro average over leaf categories), leaf-category prediction from frozen
features (k nearest neighbours in an index split; a linear probe, i.e.
multinomial logistic regression with optax) and its accuracy and macro-F1.

The metrics are pure numpy on neighbour lists and predictions; retrieval and
k-NN run the exact search.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from item_jax.eval.search import NO_NEIGHBOUR, top_k_search

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


def same_product_retrieval(embeddings: np.ndarray, product_ids, category_ids,
                           ks=RETRIEVAL_KS, mesh=None, **search_options) -> dict:
  """Every listing with another of its product is a query; the candidates are
  all other listings; ranked by inner product (cosine for unit rows)."""
  queries = retrieval_queries(product_ids)
  _, neighbours = top_k_search(embeddings[queries], embeddings, max(ks),
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


def knn_predict(index_features: np.ndarray, index_labels: np.ndarray,
                query_features: np.ndarray, k: int = 10, mesh=None,
                **search_options) -> np.ndarray:
  """The majority label among each query's k most similar index rows.

  A tie in votes goes to the tied label whose best neighbour ranks highest.
  Index rows labelled -1 (no category) take no part.
  """
  labelled = np.flatnonzero(np.asarray(index_labels) >= 0)
  if not len(labelled):
    raise ValueError("the k-NN index has no labelled rows")
  index_labels = np.asarray(index_labels)[labelled]
  _, neighbours = top_k_search(query_features, index_features[labelled], k,
                               mesh=mesh, **search_options)
  num_classes = int(index_labels.max()) + 1
  found = neighbours != NO_NEIGHBOUR
  labels = index_labels[np.where(found, neighbours, 0)]
  rows = np.repeat(np.arange(len(neighbours)), k).reshape(labels.shape)
  votes = np.zeros((len(neighbours), num_classes), np.int64)
  np.add.at(votes, (rows[found], labels[found]), 1)
  first_rank = np.full((len(neighbours), num_classes), k, np.int64)
  ranks = np.broadcast_to(np.arange(k), labels.shape)
  np.minimum.at(first_rank, (rows[found], labels[found]), ranks[found])
  # Votes first; among equal votes the earlier first rank wins.
  return np.argmax(votes * (k + 1) + (k - first_rank), axis=1)


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, num_classes: int, steps: int = 300,
                 learning_rate: float = 0.05, weight_decay: float = 1e-4,
                 ) -> np.ndarray:
  """Predicted labels of `test_features` from a softmax regression trained
  full-batch with Adam on the labelled training rows.

  Features are centred on the training mean and scaled so that training rows
  have unit mean squared norm, which lets one learning rate serve embeddings,
  TF-IDF vectors and histograms alike.
  """
  labelled = np.asarray(train_labels) >= 0
  features = np.asarray(train_features, np.float32)[labelled]
  labels = np.asarray(train_labels)[labelled]
  if not len(labels):
    raise ValueError("the linear probe has no labelled training rows")
  mean = features.mean(axis=0)
  scale = np.sqrt(np.mean(np.sum(np.square(features - mean), axis=1))) or 1.0
  weights, bias = _fit(jnp.asarray((features - mean) / scale), jnp.asarray(labels),
                       num_classes, steps, learning_rate, weight_decay)
  logits = ((np.asarray(test_features, np.float32) - mean) / scale) @ np.asarray(weights)
  return np.argmax(logits + np.asarray(bias), axis=1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fit(features, labels, num_classes, steps, learning_rate, weight_decay):
  params = (jnp.zeros((features.shape[1], num_classes)), jnp.zeros((num_classes,)))
  optimizer = optax.adam(learning_rate)

  def loss(params):
    weights, bias = params
    logits = features @ weights + bias
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return cross_entropy.mean() + 0.5 * weight_decay * jnp.sum(jnp.square(weights))

  def step(carry, _):
    params, state = carry
    updates, state = optimizer.update(jax.grad(loss)(params), state)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None,
                                length=steps)
  return params
