"""Exact top-k search by inner product on device: blocked matmul + `lax.top_k`.

Queries are split over every device of a mesh; each device walks its queries a
block at a time and streams the candidates past them a block at a time, merging
each block's scores into a running top k. Every device holds all candidates
and its share of the queries; beyond that, memory is bounded by one (query
block x candidate block) score tile: the (queries x candidates) matrix is never
materialised.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

NO_NEIGHBOUR = -1
# Scores per group in a tile's two-stage top k (see _top_k_by_groups).
_GROUP = 16


def default_mesh() -> Mesh:
  """All devices in one axis."""
  return Mesh(np.asarray(jax.devices()), ("devices",))


def progress_line(what: str, unit: str, done: int, total: int, started_at: int,
                  elapsed: float) -> str:
  """"WHAT: 12,288 / 100,000 UNIT (12 %), ETA 3m10s": the ETA from this
  run's pace (items since `started_at` over `elapsed` seconds)."""
  percent = 100 * done // max(total, 1)
  line = f"{what}: {done:,} / {total:,} {unit} ({percent} %)"
  if done > started_at and done < total:
    line += f", ETA {_duration(elapsed / (done - started_at) * (total - done))}"
  elif done >= total:
    line += f", done in {_duration(elapsed)}"
  return line


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def check_search_inputs(query_shape, candidate_shape, k: int) -> None:
  """Both sides (rows, dim) with the same dim, and k >= 1."""
  if candidate_shape[1] != query_shape[1]:
    raise ValueError(f"queries have {query_shape[1]} dimensions, candidates "
                     f"{candidate_shape[1]}")
  if k < 1:
    raise ValueError(f"k must be at least 1, got {k}")


def top_k_search(queries, candidates, k: int, *, exclude=None,
                 mesh: Mesh | None = None, query_block: int = 1024,
                 candidate_block: int = 4096,
                 precision=jax.lax.Precision.HIGHEST):
  """The k candidates with the largest inner product for each query.

  Args:
    queries: (num_queries, dim) float array (host numpy or jax).
    candidates: (num_candidates, dim) float array; L2-normalised rows make
      the inner product the cosine similarity.
    k: neighbours per query; may exceed the number of candidates.
    exclude: optional (num_queries,) int, one candidate index per query that
      must not be returned (the query itself when searching a set against
      itself), or -1 for none.
    mesh: queries are split over all of its devices (default: every device).
    query_block, candidate_block: tile sizes; smaller ones bound memory, larger
      ones make bigger matmuls. Both are capped by the data's size.
    precision: matmul precision; HIGHEST keeps TPUs and GPUs at float32.

  Returns:
    (scores, indices) as numpy arrays of shape (num_queries, k), best first.
    Ties are broken by the lower candidate index, as a stable
    `argsort(-scores)` would. Slots beyond the available candidates hold
    index -1 (`NO_NEIGHBOUR`) and score -inf.
  """
  queries = np.asarray(queries, np.float32)
  candidates = np.asarray(candidates, np.float32)
  num_queries, dim = queries.shape
  num_candidates = candidates.shape[0]
  check_search_inputs(queries.shape, candidates.shape, k)
  exclude = (np.full(num_queries, NO_NEIGHBOUR, np.int32) if exclude is None
             else np.asarray(exclude, np.int32))
  if num_candidates == 0:
    return (np.full((num_queries, k), -np.inf, np.float32),
            np.full((num_queries, k), NO_NEIGHBOUR, np.int32))
  mesh = mesh or default_mesh()
  num_devices = mesh.devices.size

  query_block = _round_up(min(query_block, math.ceil(num_queries / num_devices)), 8)
  padded_queries = _round_up(num_queries, num_devices * query_block)
  split = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  search = _compiled_search(mesh, k, query_block,
                            min(candidate_block, num_candidates), precision)
  scores, indices = search(
      put_global(_pad_rows(queries, padded_queries), split),
      put_global(_pad_rows(exclude, padded_queries, NO_NEIGHBOUR), split),
      put_global(candidates, NamedSharding(mesh, PartitionSpec())))
  return fetch_global(scores)[:num_queries], fetch_global(indices)[:num_queries]


@functools.lru_cache(maxsize=32)
def _compiled_search(mesh: Mesh, k: int, query_block: int, candidate_block: int,
                     precision):
  """The jitted search; candidate tiles are read in place, without padding.

  Tiles start at multiples of `candidate_block`, except the last, which ends
  at the last candidate and so may overlap the one before it; what it holds
  below its nominal start was seen already and is dropped. Each tile keeps
  only its best min(k + 1, candidate_block) before merging: a candidate below
  those has k + 1 others ahead of it in the (score, then index) order, at
  most one of them excluded, so it cannot make the top k.
  """
  axes = PartitionSpec(mesh.axis_names)
  tile_k = min(k + 1, candidate_block)

  def one_query_block(query_and_exclude, candidates):
    query, exclude = query_and_exclude
    num_candidates = candidates.shape[0]

    def merge(best, first_new):
      start = jnp.minimum(first_new, num_candidates - candidate_block)
      tile = jax.lax.dynamic_slice_in_dim(candidates, start, candidate_block)
      scores = jnp.dot(query, tile.T, precision=precision,
                       preferred_element_type=jnp.float32)
      tile_scores, positions = _top_k_by_groups(scores, tile_k)
      tile_index = start + positions
      drop = (tile_index < first_new) | (tile_index == exclude[:, None])
      # The running best come first and hold only lower indices than this
      # tile's, so top_k's lower-position-first tie rule is the lower-index rule.
      merged_scores = jnp.concatenate(
          [best[0], jnp.where(drop, -jnp.inf, tile_scores)], axis=1)
      merged_index = jnp.concatenate([best[1], tile_index], axis=1)
      top_scores, top = jax.lax.top_k(merged_scores, k)
      return (top_scores, jnp.take_along_axis(merged_index, top, axis=1)), None

    firsts = jnp.arange(0, num_candidates, candidate_block, dtype=jnp.int32)
    # The carry varies per device, as the query block it is merged with does.
    empty = jax.lax.pcast(
        (jnp.full((query.shape[0], k), -jnp.inf, jnp.float32),
         jnp.full((query.shape[0], k), NO_NEIGHBOUR, jnp.int32)),
        mesh.axis_names, to="varying")
    (scores, index), _ = jax.lax.scan(merge, empty, firsts)
    return scores, jnp.where(jnp.isneginf(scores), NO_NEIGHBOUR, index)

  def local_search(queries, exclude, candidates):
    blocks = queries.reshape(-1, query_block, queries.shape[-1])
    scores, index = jax.lax.map(
        lambda block: one_query_block(block, candidates),
        (blocks, exclude.reshape(-1, query_block)))
    return scores.reshape(-1, k), index.reshape(-1, k)

  return jax.jit(jax.shard_map(
      local_search, mesh=mesh, in_specs=(axes, axes, PartitionSpec()),
      out_specs=(axes, axes)))


def _top_k_by_groups(scores: jax.Array, k: int):
  """`lax.top_k` of each row, through groups of _GROUP neighbouring scores.

  The best k scores lie in the k groups with the best maxima (a score outside
  them has k group maxima ahead of it in the (score, then index) order), so
  top_k runs over the group maxima and then over those k groups only, kept in
  index order so that ties still go to the lower index. On CPU this halves
  the cost of one top_k over the whole row.
  """
  rows, width = scores.shape
  if width % _GROUP or width // _GROUP <= k:
    return jax.lax.top_k(scores, k)
  groups = scores.reshape(rows, width // _GROUP, _GROUP)
  _, best_groups = jax.lax.top_k(groups.max(axis=-1), k)
  best_groups = jnp.sort(best_groups, axis=-1)
  candidates = jnp.take_along_axis(groups, best_groups[..., None], axis=1)
  values, positions = jax.lax.top_k(candidates.reshape(rows, k * _GROUP), k)
  group = jnp.take_along_axis(best_groups, positions // _GROUP, axis=1)
  return values, group * _GROUP + positions % _GROUP


def _round_up(value: int, multiple: int) -> int:
  return max(math.ceil(value / multiple), 1) * multiple


def _pad_rows(array: np.ndarray, rows: int, value=0) -> np.ndarray:
  padding = [(0, rows - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
  return np.pad(array, padding, constant_values=value)


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])


def fetch_global(array: jax.Array) -> np.ndarray:
  """The whole of a global array on this host (every process gets it all)."""
  if array.is_fully_addressable:
    return np.asarray(array)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
