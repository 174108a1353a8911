"""Exact top-k search on device against numpy's stable argsort."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from item_jax.eval.search import NO_NEIGHBOUR, top_k_search


def _reference(queries, candidates, k, exclude=None):
  """Stable argsort of -scores: higher score first, then the lower index."""
  scores = queries.astype(np.float64) @ candidates.astype(np.float64).T
  if exclude is not None:
    rows = np.flatnonzero(exclude >= 0)
    scores[rows, exclude[rows]] = -np.inf
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  top = np.take_along_axis(scores, order, axis=1)
  order = np.where(np.isneginf(top), NO_NEIGHBOUR, order)
  width = k - order.shape[1]
  return (np.pad(top, ((0, 0), (0, width)), constant_values=-np.inf),
          np.pad(order, ((0, 0), (0, width)), constant_values=NO_NEIGHBOUR))


# Over 203 candidates, (8, 192) takes the two-stage tile top k (12 groups of 16)
# and a last tile shifted back to overlap the first; the others a plain top_k.
@pytest.mark.parametrize("query_block,candidate_block",
                         [(8, 8), (8, 13), (16, 64), (8, 192), (1024, 4096), (8, 1)])
def test_ties_and_self_exclusion_match_numpy_on_8_devices(query_block, candidate_block):
  assert jax.device_count() == 8
  rng = np.random.default_rng(0)
  # Small integers: every product is exact in float32 and ties abound.
  points = rng.integers(-2, 3, (203, 16)).astype(np.float32)
  exclude = np.arange(203)
  scores, indices = top_k_search(points, points, 10, exclude=exclude,
                                 query_block=query_block,
                                 candidate_block=candidate_block)
  reference_scores, reference_indices = _reference(points, points, 10, exclude)
  np.testing.assert_array_equal(indices, reference_indices)
  np.testing.assert_array_equal(scores, reference_scores)


@pytest.mark.parametrize("mesh_shape,candidate_block", [((1,), 64), ((2, 4), 256)])
def test_random_data_on_other_meshes(mesh_shape, candidate_block):
  rng = np.random.default_rng(1)
  queries = rng.standard_normal((77, 32)).astype(np.float32)
  candidates = rng.standard_normal((300, 32)).astype(np.float32)
  devices = np.asarray(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
  mesh = Mesh(devices, ("a", "b")[:len(mesh_shape)])
  scores, indices = top_k_search(queries, candidates, 7, mesh=mesh,
                                 query_block=8, candidate_block=candidate_block)
  reference_scores, reference_indices = _reference(queries, candidates, 7)
  np.testing.assert_array_equal(indices, reference_indices)
  np.testing.assert_allclose(scores, reference_scores, rtol=1e-5)


def test_k_larger_than_the_candidates_pads_with_no_neighbour():
  points = np.eye(3, dtype=np.float32)
  scores, indices = top_k_search(points, points, 5, exclude=np.array([0, -1, 2]))
  assert indices.tolist() == [[1, 2, -1, -1, -1], [1, 0, 2, -1, -1],
                              [0, 1, -1, -1, -1]]
  assert scores[1].tolist() == [1.0, 0.0, 0.0, -np.inf, -np.inf]
  scores, indices = top_k_search(points, np.zeros((0, 3), np.float32), 2)
  assert (indices == NO_NEIGHBOUR).all() and np.isneginf(scores).all()
