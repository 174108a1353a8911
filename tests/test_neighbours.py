"""`item_jax.eval.neighbours`: the CSV against a brute-force numpy search (ties
included), resuming, two processes, Parquet, the error cases."""

import csv
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from item_jax.eval.neighbours import (merge_top_k, neighbour_blocks,
                                      neighbours_command, open_embeddings,
                                      progress_line)

DIM = 16


def _points(rows: int, seed: int) -> np.ndarray:
  """Unit rows of four entries +-1/2: every inner product is a multiple of
  1/4, exact in float32, so ties abound; rows 1-4 repeat row 0 exactly."""
  rng = np.random.default_rng(seed)
  points = np.zeros((rows, DIM), np.float32)
  for row in range(rows):
    points[row, rng.choice(DIM, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
  points[1:5] = points[0]
  return points


def _write(path, points, ids=None) -> str:
  ids = [f"item-{row}" for row in range(len(points))] if ids is None else ids
  np.save(str(path) + ".npy", points)
  (path.parent / (path.name + ".ids.json")).write_text(json.dumps({"item_id": ids}))
  return str(path)


def _ids(count):
  # Ids a CSV must quote, beside plain ones.
  return [f'item,{row}' if row % 10 == 3 else f'say "{row}"' if row % 10 == 7
          else f"item-{row}" for row in range(count)]


def _reference_csv(queries, query_ids, index, index_ids, k, self_search,
                   min_score=None) -> str:
  """Stable argsort of -scores (float64): higher score first, then lower index."""
  scores = queries.astype(np.float64) @ index.astype(np.float64).T
  if self_search:
    np.fill_diagonal(scores, -np.inf)
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(["query_item_id", "rank", "item_id", "score"])
  for row, neighbours in enumerate(order):
    for rank, item in enumerate(neighbours, 1):
      score = scores[row, item]
      if np.isneginf(score) or (min_score is not None and score < min_score):
        continue
      writer.writerow([query_ids[row], rank, index_ids[item], f"{score:.6f}"])
  return text.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("neighbours")
  queries, index = _points(101, 0), _points(45, 1)
  return {"root": root, "queries": queries, "index": index,
          "query_path": _write(root / "queries", queries, _ids(101)),
          "index_path": _write(root / "index", index, [f"other-{r}" for r in range(45)])}


def test_self_search_matches_numpy_with_ties_on_8_devices(files, tmp_path):
  assert jax.device_count() == 8
  output = tmp_path / "out.csv"
  summary = neighbours_command(files["query_path"], str(output), k=6, block_rows=7,
                               index_block_rows=13)
  expected = _reference_csv(files["queries"], _ids(101), files["queries"], _ids(101),
                            6, self_search=True)
  assert output.read_text() == expected
  assert summary["complete"] and summary["pairs"] == 101 * 6
  assert not os.path.exists(str(output) + ".progress.json")
  assert not os.path.exists(str(output) + ".partial")
  # The duplicates of row 0 find each other first, at score 1, lower rows first.
  rows = list(csv.DictReader(io.StringIO(expected)))
  assert [(row["item_id"], row["score"]) for row in rows[:4]] == [
      (_ids(101)[r], "1.000000") for r in (1, 2, 3, 4)]
  # Naming the queries' own file as the index is the same self search.
  again = tmp_path / "again.csv"
  neighbours_command(files["query_path"] + ".npy", str(again),
                     index=files["query_path"], k=6, block_rows=50)
  assert again.read_text() == expected


def test_separate_index_min_score_and_another_mesh(files, tmp_path):
  output = tmp_path / "out.csv"
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ("a", "b"))
  summary = neighbours_command(files["query_path"], str(output),
                               index=files["index_path"], k=4, min_score=0.5,
                               block_rows=13, index_block_rows=7, mesh=mesh)
  index_ids = [f"other-{r}" for r in range(45)]
  expected = _reference_csv(files["queries"], _ids(101), files["index"], index_ids,
                            4, self_search=False, min_score=0.5)
  assert output.read_text() == expected
  assert summary["pairs"] == expected.count("\n") - 1 < 101 * 4
  # k beyond the index: every candidate once, none twice, no empty slots.
  neighbours_command(files["query_path"], str(output), index=files["index_path"],
                     k=60, block_rows=40)
  assert output.read_text() == _reference_csv(
      files["queries"], _ids(101), files["index"], index_ids, 60, self_search=False)


def test_an_interrupted_run_resumes_to_the_same_bytes(files, tmp_path):
  whole = tmp_path / "whole.csv"
  neighbours_command(files["query_path"], str(whole), k=5, block_rows=7,
                     index_block_rows=13)
  output = tmp_path / "resumed.csv"
  first = neighbours_command(files["query_path"], str(output), k=5, block_rows=7,
                             index_block_rows=13, max_blocks=2)
  assert not first["complete"] and not output.exists()
  progress = json.loads((tmp_path / "resumed.csv.progress.json").read_text())
  assert progress["rows_done"] == 14 and progress["pairs"] == 70
  partial = tmp_path / "resumed.csv.partial"
  assert partial.stat().st_size == progress["bytes"]
  # A crash after appending a block but before recording it leaves extra bytes.
  with open(partial, "ab") as file:
    file.write(b"item-14,1,item-0,0.5")
  second = neighbours_command(files["query_path"], str(output), k=5, block_rows=11,
                              index_block_rows=13, max_blocks=3)
  assert second["resumed_at"] == 14 and not second["complete"]
  third = neighbours_command(files["query_path"], str(output), k=5, block_rows=7,
                             index_block_rows=13)
  assert third["resumed_at"] == 14 + 3 * 11 and third["complete"]
  assert third["pairs"] == 101 * 5
  assert output.read_bytes() == whole.read_bytes()
  assert not (tmp_path / "resumed.csv.progress.json").exists()


def test_progress_for_other_arguments_starts_afresh(files, tmp_path):
  output = tmp_path / "out.csv"
  neighbours_command(files["query_path"], str(output), k=5, block_rows=7, max_blocks=1)
  summary = neighbours_command(files["query_path"], str(output), k=3, block_rows=50)
  assert summary["resumed_at"] == 0
  assert output.read_text() == _reference_csv(
      files["queries"], _ids(101), files["queries"], _ids(101), 3, self_search=True)


def test_parquet_holds_the_csv_table(files, tmp_path):
  parquet = pytest.importorskip("pyarrow.parquet")
  neighbours_command(files["query_path"], str(tmp_path / "out.csv"), k=3,
                     block_rows=50)
  neighbours_command(files["query_path"], str(tmp_path / "out.parquet"), k=3,
                     block_rows=50)
  table = parquet.read_table(tmp_path / "out.parquet")
  rows = list(csv.DictReader(open(tmp_path / "out.csv", newline="")))
  assert table.column_names == ["query_item_id", "rank", "item_id", "score"]
  assert table.column("query_item_id").to_pylist() == [r["query_item_id"] for r in rows]
  assert table.column("item_id").to_pylist() == [r["item_id"] for r in rows]
  assert table.column("rank").to_pylist() == [int(r["rank"]) for r in rows]
  np.testing.assert_allclose(table.column("score").to_numpy(),
                             [float(r["score"]) for r in rows])
  assert not list(tmp_path.glob("out.parquet.*"))


def test_blocks_on_random_rows_match_numpy():
  rng = np.random.default_rng(2)
  points = rng.standard_normal((60, 8)).astype(np.float32)
  points /= np.linalg.norm(points, axis=1, keepdims=True)
  parts = list(neighbour_blocks(points, None, 5, block_rows=13, index_block_rows=7))
  assert [first for first, _, _ in parts] == [0, 13, 26, 39, 52]
  scores = np.concatenate([part[1] for part in parts])
  indices = np.concatenate([part[2] for part in parts])
  reference = points.astype(np.float64) @ points.astype(np.float64).T
  np.fill_diagonal(reference, -np.inf)
  order = np.argsort(-reference, axis=1, kind="stable")[:, :5]
  np.testing.assert_array_equal(indices, order)
  np.testing.assert_allclose(scores, np.take_along_axis(reference, order, axis=1),
                             atol=1e-6)


def test_merge_keeps_ties_on_the_lower_index():
  first = (np.array([[1.0, 0.5, -np.inf]]), np.array([[3, 1, -1]]))
  second = (np.array([[0.5, 1.0, 0.25]]), np.array([[4, 7, 9]]))
  scores, indices = merge_top_k(first, second, 4)
  assert indices.tolist() == [[3, 7, 1, 4]]
  assert scores.tolist() == [[1.0, 1.0, 0.5, 0.5]]


def test_progress_line():
  assert progress_line(25_000, 100_000, 0, 60.0) == (
      "neighbours: 25,000 / 100,000 queries (25 %), ETA 3m00s")
  assert progress_line(12_288, 100_000, 2_288, 10.0) == (
      "neighbours: 12,288 / 100,000 queries (12 %), ETA 1m28s")
  assert progress_line(100, 100, 0, 4000.0) == (
      "neighbours: 100 / 100 queries (100 %), done in 1h06m")


def test_errors_name_the_file(files, tmp_path):
  output = str(tmp_path / "out.csv")
  with pytest.raises(ValueError, match=r"no embeddings file .*missing\.npy"):
    neighbours_command(str(tmp_path / "missing"), output)
  np.save(tmp_path / "lonely.npy", np.zeros((3, DIM), np.float32))
  with pytest.raises(ValueError, match=r"no embeddings file .*lonely\.ids\.json"):
    neighbours_command(str(tmp_path / "lonely"), output)
  short = _write(tmp_path / "short", files["queries"][:10], ["a", "b"])
  with pytest.raises(ValueError, match=r"short\.ids\.json lists 2 item ids but "
                     r".*short\.npy holds 10 rows"):
    open_embeddings(short)
  (tmp_path / "noids.ids.json").write_text(json.dumps({"product_id": []}))
  np.save(tmp_path / "noids.npy", np.zeros((0, DIM), np.float32))
  with pytest.raises(ValueError, match=r"noids\.ids\.json has no `item_id` list"):
    open_embeddings(str(tmp_path / "noids"))
  wide = _write(tmp_path / "wide", np.zeros((3, DIM + 1), np.float32), ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"16 dimensions but the index .*wide\.npy "
                     r"has 17"):
    neighbours_command(files["query_path"], output, index=wide)
  with pytest.raises(ValueError, match="k must be at least 1, got 0"):
    neighbours_command(files["query_path"], output, k=0)
  with pytest.raises(ValueError, match="block sizes must be at least 1"):
    neighbours_command(files["query_path"], output, block_rows=0)
  assert not os.path.exists(output + ".partial")


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from item_jax.eval.neighbours import neighbours_command
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    arguments = dict(k=5, block_rows=7, index_block_rows=13)
    summary = neighbours_command(sys.argv[3], sys.argv[4], max_blocks=3, **arguments)
    assert not summary["complete"]
    neighbours_command(sys.argv[3], sys.argv[4], **arguments)
    """)


@pytest.mark.timeout(300)
def test_two_processes_write_what_one_writes(files, tmp_path):
  """jax.distributed over localhost, 2 processes x 4 simulated CPU devices,
  interrupted once and resumed: the file one process writes."""
  one = tmp_path / "one.csv"
  neighbours_command(files["query_path"], str(one), k=5, block_rows=7,
                     index_block_rows=13)
  two = tmp_path / "two.csv"
  environment = dict(os.environ)
  environment["XLA_FLAGS"] = environment["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8",
      "--xla_force_host_platform_device_count=4")
  port = 20000 + (os.getpid() + 7919) % 20000
  processes = [subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESS_SCRIPT, f"localhost:{port}", str(index),
       files["query_path"], str(two)],
      env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for index in range(2)]
  errors = [process.communicate(timeout=280)[1] for process in processes]
  for process, error in zip(processes, errors):
    assert process.returncode == 0, error[-3000:]
  assert two.read_bytes() == one.read_bytes()
