"""Nearest listings from `item-jax embed` output: exact top k by cosine score,
streamed from disk in blocks and written as a resumable CSV (or Parquet).

Input: an embeddings file pair as `write_embeddings` writes it, OUTPUT.npy
(float rows, L2-normalised, so the inner product is the cosine score) and
OUTPUT.ids.json (`item_id`: one id per row; `title`, for the lexical side),
and OUTPUT.mobilenet.npy where `embed --with-mobilenet` wrote it (a photo
model's rows, for the three-way hybrid). The queries are one such file;
the index is the same file (each listing's own row is then excluded, by
global row id) or another one.

Search: `item_jax.eval.search`'s compiled shard_map search, on every device
of the mesh. The query file is read a block of `block_rows` rows at a time
(`np.load(mmap_mode="r")`), and each query block meets the index a block of
`index_block_rows` rows at a time; each index block's top k is merged into
the block's running top k on the host, in index order, with a stable sort by
score, so ties go to the lower index row exactly as one search over the whole
index would break them. (Scores are float32 products computed on the
devices: where products round, a different tiling may move a score by an
ulp; exact products, as in the tests, give identical files.) Memory is one
query block, two index blocks and the (block x k) results, whatever the
catalogue's size. An index of a single block stays on the devices for all
query blocks.

Output: CSV with the header `query_item_id,rank,item_id,score` (written by a
thread while the next block is searched), the query blocks in file order,
each query's neighbours best first (rank from 1), scores with 6 decimals. A
query has fewer than k rows when the index holds fewer than k other
listings, or when `min_score` drops its weaker pairs. Item ids are quoted as
RFC 4180 says when they hold a comma, a quote or a line break. An OUTPUT
ending in `.parquet` (pyarrow needed) gets the same table (query_item_id
string, rank int32, item_id string, score float32), converted from the
finished CSV. An existing OUTPUT is replaced when the run completes.

Resume: the CSV is written to OUTPUT.partial; after each complete query block
its rows are appended and flushed, then OUTPUT.progress.json (written to a
temporary file and renamed) records the query rows done and the CSV's byte
length at that point, with a fingerprint of the inputs and arguments. A
rerun with the same inputs, k and min_score truncates OUTPUT.partial to the
recorded length and continues at the next query row (the block size may
differ), so an interrupted run ends with the same bytes as an uninterrupted
one. When done, OUTPUT.partial becomes OUTPUT and the progress file is
removed. A progress file whose fingerprint differs is ignored with a warning
and the run starts afresh.

Several processes (`jax.distributed`, as `item-jax embed`): every process
reads the same input files and runs every block together with the others,
each block's query rows split over the devices of all processes (the mesh
spans them all); results are gathered to every process, and only process 0
writes the output and the progress file, and tells the others where to start
on a resume. The file is therefore the one a single process writes, and only
process 0 needs to see the output folder. Files are local paths (np.load's
memory map needs one).
"""

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from item_jax.errors import MissingDependencyError, MissingInputError, UserError
from item_jax.eval import search as search_lib
from item_jax.eval.fusion import (LEXICAL, RRF_CONSTANT, RRF_DEPTH, hybrid_blocks,
                                  lexical_name, rrf_blocks)
from item_jax.eval.outputs import photos_path
from item_jax.eval.search import NO_NEIGHBOUR

CSV_HEADER = "query_item_id,rank,item_id,score\n"
SCORE_DIGITS = 6
DEFAULT_BLOCK_ROWS = 16_384
DEFAULT_INDEX_BLOCK_ROWS = 131_072
_PROGRESS_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class EmbeddingsFile:
  """An `item-jax embed` output pair, its rows memory-mapped."""
  array_path: str
  ids_path: str
  vectors: np.ndarray          # (rows, dim), memory-mapped, any float dtype
  item_ids: list[str]
  titles: list[str] | None = None   # each row's title, where the file has them
  meta: dict | None = None          # the ids file's other fields (workdir, modality, ...)
  # OUTPUT.mobilenet.npy, memory-mapped, where `embed --with-mobilenet` wrote it:
  # ImageNet MobileNetV2's photo features of the same rows.
  photos: np.ndarray | None = None
  photos_file: str | None = None

  @property
  def rows(self) -> int:
    return self.vectors.shape[0]

  @property
  def dim(self) -> int:
    return self.vectors.shape[1]


def embeddings_paths(path: str) -> tuple[str, str]:
  """(OUTPUT.npy, OUTPUT.ids.json) for OUTPUT or OUTPUT.npy."""
  base = os.fspath(path).removesuffix(".npy")
  return base + ".npy", base + ".ids.json"


def open_embeddings(path: str) -> EmbeddingsFile:
  """The embeddings at OUTPUT[.npy] and their ids, checked; raises a
  ValueError (`UserError`) naming the file for a missing or malformed one."""
  array_path, ids_path = embeddings_paths(path)
  hint = "(`item-jax embed --output OUTPUT` writes OUTPUT.npy and OUTPUT.ids.json)"
  for file in (array_path, ids_path):
    if not os.path.isfile(file):
      raise MissingInputError(f"no embeddings file {file} {hint}")
  try:
    vectors = np.load(array_path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as error:
    raise UserError(f"{array_path} is not a readable .npy array: {error}") from None
  if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
    raise UserError(f"{array_path} holds a {vectors.dtype} array of shape "
                    f"{vectors.shape}; embeddings are 2-D float rows")
  try:
    with open(ids_path, encoding="utf-8") as file:
      ids = json.load(file)
  except (ValueError, OSError) as error:
    raise UserError(f"{ids_path} is not readable JSON: {error}") from None
  item_ids = ids.get("item_id") if isinstance(ids, dict) else None
  if not isinstance(item_ids, list):
    raise UserError(f"{ids_path} has no `item_id` list {hint}")
  if len(item_ids) != vectors.shape[0]:
    raise UserError(f"{ids_path} lists {len(item_ids)} item ids but "
                    f"{array_path} holds {vectors.shape[0]} rows: they must "
                    "come from the same `item-jax embed` run")
  titles = ids.get("title")
  if titles is not None and (not isinstance(titles, list)
                             or len(titles) != len(item_ids)):
    raise UserError(f"{ids_path}: `title` must list one title per row")
  meta = {key: value for key, value in ids.items() if not isinstance(value, list)}
  photos, photos_file = None, photos_path(array_path)
  # Only where the ids file says they were written with these rows.
  if "mobilenet_image_size" in meta:
    if not os.path.isfile(photos_file):
      raise UserError(f"{ids_path} names MobileNetV2's photo features, but "
                      f"{photos_file} is missing: embed again")
    try:
      photos = np.load(photos_file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
      raise UserError(f"{photos_file} is not a readable .npy array: {error}") from None
    if photos.ndim != 2 or photos.shape[0] != vectors.shape[0] or not np.issubdtype(
        photos.dtype, np.floating):
      raise UserError(f"{photos_file} holds a {photos.dtype} array of shape "
                      f"{photos.shape}; expected {vectors.shape[0]} float rows, one "
                      f"per row of {array_path}")
  return EmbeddingsFile(array_path, ids_path, vectors,
                        [str(item) for item in item_ids],
                        None if titles is None else [str(t) for t in titles], meta,
                        photos, photos_file if photos is not None else None)


def merge_top_k(first: tuple[np.ndarray, np.ndarray],
                second: tuple[np.ndarray, np.ndarray], k: int):
  """The best k of two (scores, indices) results of the same queries, every
  index of `first` below every index of `second` (NO_NEIGHBOUR slots score
  -inf): a stable sort by score keeps ties on the lower index."""
  scores = np.concatenate([first[0], second[0]], axis=1)
  indices = np.concatenate([first[1], second[1]], axis=1)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return (np.take_along_axis(scores, order, axis=1),
          np.take_along_axis(indices, order, axis=1))


class _Index:
  """The index rows, put on the devices a block at a time (replicated)."""

  def __init__(self, vectors: np.ndarray, block_rows: int, mesh: Mesh):
    self.vectors = vectors
    self.starts = list(range(0, vectors.shape[0], block_rows))
    self.block_rows = block_rows
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self._resident = None

  def blocks(self) -> Iterator[tuple[int, jax.Array]]:
    for start in self.starts:
      if self._resident is not None:
        yield start, self._resident
        continue
      rows = np.ascontiguousarray(
          self.vectors[start:start + self.block_rows], np.float32)
      block = search_lib.put_global(rows, self.replicated)
      if len(self.starts) == 1:
        self._resident = block
      yield start, block


def _search_block(queries: np.ndarray, first_row: int | None, index: _Index,
                  k: int, mesh: Mesh, query_block: int, candidate_block: int,
                  precision) -> tuple[np.ndarray, np.ndarray]:
  """Top k of the index for one block of queries, merged over index blocks;
  `first_row` (the block's first row in the index) excludes each query's own
  row, None excludes nothing."""
  num_queries = queries.shape[0]
  num_devices = mesh.devices.size
  # As top_k_search does: the rows split over every device, in tiles.
  tile = search_lib._round_up(min(query_block, math.ceil(num_queries / num_devices)), 8)
  padded = search_lib._round_up(num_queries, num_devices * tile)
  split = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
  placed = search_lib.put_global(search_lib._pad_rows(queries, padded), split)
  rows = None if first_row is None else first_row + np.arange(num_queries)
  best, pending = None, []

  def collect():
    nonlocal best
    start, (scores, indices) = pending.pop(0)
    scores = search_lib.fetch_global(scores)[:num_queries] + np.float32(0)  # no -0.0
    indices = search_lib.fetch_global(indices)[:num_queries]
    indices = np.where(indices == NO_NEIGHBOUR, NO_NEIGHBOUR, indices + start)
    best = (scores, indices) if best is None else merge_top_k(best, (scores, indices), k)

  for start, candidates in index.blocks():
    count = candidates.shape[0]
    exclude = np.full(num_queries, NO_NEIGHBOUR, np.int32)
    if rows is not None:
      local = rows - start
      inside = (local >= 0) & (local < count)
      exclude[inside] = local[inside]
    search = search_lib._compiled_search(mesh, k, tile, min(candidate_block, count),
                                         precision)
    pending.append((start, search(
        placed,
        search_lib.put_global(search_lib._pad_rows(exclude, padded, NO_NEIGHBOUR),
                              split),
        candidates)))
    # One index block in flight while the one before it is fetched and merged.
    if len(pending) > 1:
      collect()
  while pending:
    collect()
  if best is None:  # an empty index
    best = (np.full((num_queries, k), -np.inf, np.float32),
            np.full((num_queries, k), NO_NEIGHBOUR, np.int32))
  return best


def neighbour_blocks(queries: np.ndarray, index: np.ndarray | None, k: int, *,
                     block_rows: int = DEFAULT_BLOCK_ROWS,
                     index_block_rows: int = DEFAULT_INDEX_BLOCK_ROWS,
                     start_row: int = 0, mesh: Mesh | None = None,
                     query_block: int = 1024, candidate_block: int = 4096,
                     precision=jax.lax.Precision.HIGHEST
                     ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(first query row, scores, indices) for each block of `block_rows` query
  rows from `start_row` on, in order; the arrays as `top_k_search` returns
  them ((rows, k), best first, ties to the lower index row, NO_NEIGHBOUR and
  -inf past the available candidates). `index=None` searches the queries
  against themselves, each row's own excluded. Both arrays may be
  memory-mapped: only one block of each is read at a time."""
  if k < 1:
    raise UserError(f"k must be at least 1, got {k}")
  if block_rows < 1 or index_block_rows < 1:
    raise UserError(f"block sizes must be at least 1, got {block_rows} and "
                    f"{index_block_rows}")
  candidates = queries if index is None else index
  if candidates.shape[1] != queries.shape[1]:
    raise UserError(f"queries have {queries.shape[1]} dimensions, the index "
                    f"{candidates.shape[1]}")
  mesh = mesh or search_lib.default_mesh()
  placed = _Index(candidates, index_block_rows, mesh)
  for first in range(start_row, queries.shape[0], block_rows):
    block = np.ascontiguousarray(queries[first:first + block_rows], np.float32)
    scores, indices = _search_block(
        block, first if index is None else None, placed, k, mesh, query_block,
        candidate_block, precision)
    yield first, scores, indices


def _csv_field(value: str) -> str:
  if any(character in value for character in ',"\r\n'):
    return '"' + value.replace('"', '""') + '"'
  return value


def csv_rows(query_ids: list[str], scores: np.ndarray, indices: np.ndarray,
             index_ids: list[str], min_score: float | None = None) -> str:
  """CSV lines (no header) for a block: query_ids[i]'s neighbours
  index_ids[indices[i]], best first; NO_NEIGHBOUR slots and scores below
  `min_score` left out. Ids must already be CSV fields (`_csv_field`)."""
  keep = indices != NO_NEIGHBOUR
  if min_score is not None:
    keep &= scores >= min_score
  query_rows, ranks = np.nonzero(keep)
  form = f"{{}},{{}},{{}},{{:.{SCORE_DIGITS}f}}\n"
  return "".join([
      form.format(query_ids[row], rank, index_ids[item], score)
      for row, rank, item, score in zip(
          query_rows.tolist(), (ranks + 1).tolist(), indices[keep].tolist(),
          scores[keep].tolist())])


def _fingerprint(queries: EmbeddingsFile, index: EmbeddingsFile | None, k: int,
                 min_score: float | None, rank_by: str = "embedding",
                 weight: float | None = None, lexical: str = LEXICAL,
                 weights: tuple | None = None) -> dict:
  """What a resumed run must share with the interrupted one."""
  def identity(file: EmbeddingsFile) -> dict:
    paths = (file.array_path, file.ids_path) + (
        (file.photos_file,) if weights is not None else ())
    stats = [os.stat(path) for path in paths]
    return {"path": os.path.realpath(file.array_path), "rows": file.rows,
            "dim": file.dim,
            "files": [[stat.st_size, stat.st_mtime_ns] for stat in stats]}
  return {"format": _PROGRESS_FORMAT, "queries": identity(queries),
          "index": None if index is None else identity(index), "k": k,
          "min_score": min_score, "score_digits": SCORE_DIGITS,
          **({} if rank_by == "embedding" else
             {"rank_by": rank_by, "fusion_weight": weight}),
          **({} if rank_by == "embedding" or lexical == LEXICAL else
             {"lexical": lexical}),
          **({"rrf": [RRF_DEPTH, RRF_CONSTANT]} if rank_by == "rrf" else {}),
          **({} if weights is None else {"fusion_weights": list(weights)})}


def _write_json_atomically(path: str, value: dict) -> None:
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as file:
    json.dump(value, file)
    file.flush()
    os.fsync(file.fileno())
  os.replace(temporary, path)


def _read_progress(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as file:
      return json.load(file)
  except FileNotFoundError:
    return None
  except (ValueError, OSError):
    logging.warning("neighbours: ignoring the unreadable progress file %s", path)
    return None


def progress_line(done: int, total: int, started_at: int, elapsed: float) -> str:
  """"neighbours: 12,288 / 100,000 queries (12 %), ETA 3m10s"."""
  return search_lib.progress_line("neighbours", "queries", done, total, started_at,
                                  elapsed)


def _to_parquet(csv_path: str, output: str) -> None:
  import pyarrow as pa
  from pyarrow import csv as pa_csv
  from pyarrow import parquet
  types = {"query_item_id": pa.string(), "rank": pa.int32(),
           "item_id": pa.string(), "score": pa.float32()}
  reader = pa_csv.open_csv(
      csv_path, parse_options=pa_csv.ParseOptions(newlines_in_values=True),
      convert_options=pa_csv.ConvertOptions(column_types=types,
                                            strings_can_be_null=False))
  temporary = output + ".tmp"
  with parquet.ParquetWriter(temporary, reader.schema) as writer:
    for batch in reader:
      writer.write_batch(batch)
  os.replace(temporary, output)


def neighbours_command(queries: str, output: str, index: str | None = None,
                       k: int = 10, min_score: float | None = None,
                       block_rows: int = DEFAULT_BLOCK_ROWS,
                       index_block_rows: int = DEFAULT_INDEX_BLOCK_ROWS,
                       mesh: Mesh | None = None, max_blocks: int | None = None,
                       log_every_blocks: int = 8, rank_by: str = "embedding",
                       fusion_weight: float | None = None,
                       lexical: str = LEXICAL,
                       fusion_weights: tuple | None = None) -> dict:
  """`item-jax neighbours`: the k nearest index listings of every query
  listing, as a CSV (or Parquet) at `output`; see the module docstring for
  the files, resuming and several processes.

  Args:
    queries: an `item-jax embed` OUTPUT (or OUTPUT.npy; OUTPUT.ids.json beside it).
    output: the table to write; `.parquet` for Parquet, anything else is CSV.
    index: another embeddings file to search; by default (or the queries'
      own file) the queries themselves, each listing's own row excluded.
    k: neighbours per query (at least 1).
    min_score: leave out pairs scoring below it.
    block_rows: query rows read and searched at a time (and the resume step).
    index_block_rows: index rows on the devices at a time.
    mesh: the devices to search on (default: all, of every process).
    max_blocks: stop after this many query blocks, resumable (for jobs with a
      time limit, and tests); None runs to the end.
    log_every_blocks: a progress line every so many blocks.
    rank_by: "embedding" (the cosine of the rows), "lexical" (TF-IDF over
      the titles' character n-grams, as `item-jax eval`'s baseline) or
      "hybrid" (`fusion_weight` x the cosine + (1 - fusion_weight) x
      TF-IDF's) or "rrf" (reciprocal rank fusion of the two rankings, no
      weight: for catalogues without same-product labels to fit one on);
      the last three need the files' titles (`item-jax embed` writes them)
      and search on the host (`item_jax.eval.fusion.hybrid_blocks`,
      `rrf_blocks`).
    fusion_weight: the hybrid's weight in [0, 1] (see `fitted_fusion_weight`).
    lexical: the lexical side's n-grams, "ANALYZER:LOW-HIGH"
      (`item_jax.eval.fusion.lexical_side`; the one the weight was fitted
      with, see `fitted_lexical`).
    fusion_weights: with rank_by "hybrid", instead of `fusion_weight`: the
      weights of the embedding, of MobileNetV2's photo features and of
      TF-IDF (>= 0, summing to 1; see `fitted_fusion_weights`), for files
      that hold the photo features (`embed --with-mobilenet`).

  Returns:
    a summary: query and index rows, dim, k, pairs written (counted on
    process 0 only), where this run started (`resumed_at`), whether the
    output is complete, its path (OUTPUT.partial while incomplete), seconds.
  """
  if k < 1:
    raise UserError(f"k must be at least 1, got {k}")
  if block_rows < 1 or index_block_rows < 1:
    raise UserError(f"block sizes must be at least 1, got {block_rows} and "
                    f"{index_block_rows}")
  query_file = open_embeddings(queries)
  index_file = None if index is None else open_embeddings(index)
  if index_file is not None and (
      os.path.realpath(index_file.array_path) == os.path.realpath(query_file.array_path)):
    index_file = None
  if index_file is not None and index_file.dim != query_file.dim:
    raise UserError(f"{query_file.array_path} has {query_file.dim} dimensions "
                    f"but the index {index_file.array_path} has {index_file.dim}")
  weight = _check_ranking(rank_by, fusion_weight, query_file, index_file,
                          three=fusion_weights is not None)
  weights = _check_three_weights(rank_by, fusion_weight, fusion_weights,
                                 query_file, index_file)
  try:
    lexical = lexical_name(lexical)
  except ValueError as error:
    raise UserError(str(error)) from None
  parquet = os.fspath(output).endswith(".parquet")
  if parquet:
    try:
      import pyarrow  # noqa: F401
    except ImportError:
      raise MissingDependencyError(
          f"writing {output} as Parquet needs pyarrow (pip install pyarrow); "
          "or give a .csv output") from None
  index_rows = (query_file if index_file is None else index_file).rows
  # More than the other listings there are would only add empty slots.
  search_k = max(1, min(k, index_rows - (index_file is None)))

  output = os.fspath(output)
  partial, progress_path = output + ".partial", output + ".progress.json"
  fingerprint = _fingerprint(query_file, index_file, k, min_score, rank_by, weight,
                             lexical, weights)
  writer = jax.process_index() == 0
  start, length, pairs, file = 0, 0, 0, None
  if writer:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    progress = _read_progress(progress_path)
    if (progress and progress.get("fingerprint") == fingerprint
        and all(isinstance(progress.get(key), int)
                for key in ("rows_done", "bytes", "pairs"))
        and os.path.exists(partial) and os.path.getsize(partial) >= progress["bytes"]):
      start, length, pairs = progress["rows_done"], progress["bytes"], progress["pairs"]
      file = open(partial, "r+b")
      file.truncate(length)
      file.seek(length)
      logging.info("neighbours: resuming %s at query row %s", output, f"{start:,}")
    else:
      if progress:
        logging.warning("neighbours: %s was written for other inputs or "
                        "arguments (or its partial file is gone); starting afresh",
                        progress_path)
      file = open(partial, "wb")
      file.write(CSV_HEADER.encode())
      file.flush()
      length = file.tell()
      _write_json_atomically(progress_path, {
          "fingerprint": fingerprint, "rows_done": 0, "bytes": length, "pairs": 0})
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    start = int(multihost_utils.broadcast_one_to_all(np.int64(start)))

  query_ids = [_csv_field(item) for item in query_file.item_ids] if writer else None
  index_ids = (query_ids if index_file is None else
               [_csv_field(item) for item in index_file.item_ids] if writer else None)
  total = query_file.rows
  written = {"bytes": length, "pairs": pairs}

  def write(first: int, done: int, scores: np.ndarray, indices: np.ndarray) -> None:
    """Append one block's rows, then record them as done."""
    text = csv_rows(query_ids[first:done], scores, indices, index_ids, min_score)
    data = text.encode()
    file.write(data)
    file.flush()
    os.fsync(file.fileno())
    written["bytes"] += len(data)
    written["pairs"] += text.count("\n")
    _write_json_atomically(progress_path, {
        "fingerprint": fingerprint, "rows_done": done, **written})

  # Process 0 formats and writes block i in a thread while block i + 1 is
  # searched (the search waits on the devices without the GIL); one block
  # waits to be written at most.
  executor = ThreadPoolExecutor(1) if writer else None
  writing = None
  began, blocks, done = time.perf_counter(), 0, start
  if rank_by == "rrf":
    searched = rrf_blocks(
        query_file.vectors, query_file.titles,
        None if index_file is None else index_file.vectors,
        None if index_file is None else index_file.titles, search_k,
        block_rows=block_rows, start_row=start, lexical=lexical)
  elif rank_by == "embedding":
    searched = neighbour_blocks(
        query_file.vectors, None if index_file is None else index_file.vectors,
        search_k, block_rows=block_rows, index_block_rows=index_block_rows,
        start_row=start, mesh=mesh)
  else:
    # Every process computes every block (on the host); process 0 writes.
    searched = hybrid_blocks(
        query_file.vectors, query_file.titles,
        None if index_file is None else index_file.vectors,
        None if index_file is None else index_file.titles, search_k, weight,
        block_rows=block_rows, start_row=start, lexical=lexical,
        query_photos=None if weights is None else query_file.photos,
        index_photos=None if weights is None or index_file is None else index_file.photos,
        weights=weights)
  try:
    for first, scores, indices in searched:
      done = first + scores.shape[0]
      if writer:
        if writing is not None:
          writing.result()
        writing = executor.submit(write, first, done, scores, indices)
      blocks += 1
      if writer and (blocks % log_every_blocks == 0 or done == total):
        logging.info(progress_line(done, total, start, time.perf_counter() - began))
      if max_blocks is not None and blocks >= max_blocks and done < total:
        break
  finally:
    try:
      if writing is not None:
        writing.result()
    finally:
      if executor is not None:
        executor.shutdown()
      if file is not None:
        file.close()
  pairs = written["pairs"]
  complete = done >= total
  if writer and complete:
    if parquet:
      _to_parquet(partial, output)
      os.remove(partial)
    else:
      os.replace(partial, output)
    os.remove(progress_path)
  return {"queries": total, "index_rows": index_rows, "dim": query_file.dim,
          "k": k, "rank_by": rank_by, "fusion_weight": weight,
          "fusion_weights": weights,
          "lexical": None if rank_by == "embedding" else lexical, "pairs": pairs,
          "resumed_at": start, "complete": complete,
          "path": output if complete else partial,
          "seconds": time.perf_counter() - began}


RANK_BY = ("embedding", "lexical", "hybrid", "rrf")


def _check_ranking(rank_by: str, fusion_weight: float | None,
                   query_file: EmbeddingsFile,
                   index_file: EmbeddingsFile | None,
                   three: bool = False) -> float | None:
  """The fusion weight the ranking uses (None: the embedding alone; 0.0:
  TF-IDF alone); a bad choice or a file without titles is a UserError."""
  if rank_by not in RANK_BY:
    raise UserError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
  if rank_by != "hybrid" and fusion_weight is not None:
    raise UserError("a fusion weight needs --rank-by hybrid")
  if rank_by == "embedding":
    return None
  for file in (query_file, index_file):
    if file is not None and file.titles is None:
      raise UserError(f"{file.ids_path} has no `title` list: ranking by "
                      f"{rank_by} reads the listings' titles (embed again: "
                      "`item-jax embed` writes them)")
  if rank_by == "lexical":
    return 0.0
  if rank_by == "rrf" or (three and fusion_weight is None):
    return None   # rrf has none; three weights are checked by _check_three_weights
  if fusion_weight is None:
    raise UserError("--rank-by hybrid needs a fusion weight: --fusion-weight W, "
                    "or `item-jax eval` of the run (it fits one on the "
                    "validation split) before; without same-product labels "
                    "to fit one, --rank-by rrf fuses the two rankings instead")
  if not 0.0 <= fusion_weight <= 1.0:
    raise UserError(f"--fusion-weight {fusion_weight}: must be in [0, 1]")
  return float(fusion_weight)


def eval_report(workdir: str) -> dict | None:
  """WORKDIR/eval/report.json, the report `item-jax eval` wrote for the run,
  or None where there is none (or it is no JSON object)."""
  path = os.path.join(os.fspath(workdir), "eval", "report.json")
  try:
    with open(path, encoding="utf-8") as file:
      report = json.load(file)
  except (OSError, ValueError):
    return None
  return report if isinstance(report, dict) else None


def fitted_lexical(workdir: str) -> str | None:
  """The lexical side `item-jax eval` of the run fitted its weights with
  (`eval_report`; reports before the choice used LEXICAL), or None without
  a report."""
  report = eval_report(workdir)
  if report is None:
    return None
  meta = report.get("meta", {})
  side = str(meta.get("lexical", LEXICAL)) if isinstance(meta, dict) else LEXICAL
  try:
    return lexical_name(side)
  except ValueError:
    return side   # named by the search that reads it


def fitted_fusion_weight(workdir: str, view: str) -> float | None:
  """The weight `item-jax eval` fitted for `view` fused with TF-IDF on the
  validation split (`eval_report`), or None."""
  entry = (eval_report(workdir) or {}).get(f"{view}+tfidf", {})
  weight = entry.get("fusion_weight") if isinstance(entry, dict) else None
  return None if weight is None else float(weight)


def fitted_fusion_weights(workdir: str, view: str) -> tuple[tuple, int] | None:
  """((embedding, MobileNetV2, TF-IDF) weights, MobileNetV2's image size)
  that `item-jax eval` fitted for `view` + MobileNetV2 + TF-IDF on the
  validation split (`eval_report`), or None."""
  report = eval_report(workdir) or {}
  try:
    weights = report[f"{view}+mobilenet+tfidf"]["fusion_weights"]
    size = int(report["meta"]["mobilenet_image_size"])
    return tuple(float(weights[name]) for name in ("item", "mobilenet", "tfidf")), size
  except (KeyError, TypeError, ValueError):
    return None


def _check_three_weights(rank_by: str, fusion_weight: float | None, fusion_weights,
                         query_file: EmbeddingsFile,
                         index_file: EmbeddingsFile | None) -> tuple | None:
  """The (embedding, photos, words) weights of a three-way hybrid, checked
  with the files' photo features (None: not asked for)."""
  if fusion_weights is None:
    return None
  if rank_by != "hybrid":
    raise UserError("the three fusion weights (the embedding, MobileNetV2's "
                    "photo features, the words) need --rank-by hybrid")
  if fusion_weight is not None:
    raise UserError("give one fusion weight (the embedding and the words) or "
                    "the three (with MobileNetV2's photo features), not both")
  weights = tuple(float(w) for w in fusion_weights)
  if len(weights) != 3 or min(weights) < 0.0 or abs(sum(weights) - 1.0) > 1e-6:
    raise UserError(f"fusion weights {weights}: expected three weights >= 0 "
                    "(the embedding, the photos, the words) summing to 1")
  sizes = set()
  for file in (query_file, index_file):
    if file is None:
      continue
    if file.photos is None:
      raise UserError(f"{file.array_path} has no MobileNetV2 photo features "
                      f"beside it ({photos_path(file.array_path)}): embed with "
                      "--with-mobilenet")
    sizes.add((file.meta or {}).get("mobilenet_image_size"))
  if len(sizes) > 1:
    raise UserError(f"the queries' and the index's photo features were computed "
                    f"at different sizes ({sorted(map(str, sizes))}): embed both "
                    "at one --mobilenet-image-size")
  return weights
