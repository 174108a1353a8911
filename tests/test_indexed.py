"""Training input by global example index: order, process slices, corrupt shards."""

import json
import shutil

import numpy as np
import pytest

from item_jax.data.indexed import IndexedSource, scan_offsets


@pytest.fixture(scope="module")
def data_dir(prepared_catalogue):
  return str(prepared_catalogue[1])


def _source(data_dir, **overrides):
  settings = dict(global_batch_size=8, seed=0, image_size=32, max_title_len=16)
  return IndexedSource(data_dir, "train", **{**settings, **overrides})


def _take(source, start_step, count):
  batches = source.batches(start_step)
  return [next(batches) for _ in range(count)]


def test_each_epoch_visits_every_record_once_in_a_seeded_order(data_dir):
  source = _source(data_dir)
  first_epoch = source.record_ids(np.arange(source.num_records))
  assert sorted(first_epoch) == list(range(source.num_records))
  second_epoch = source.record_ids(np.arange(source.num_records, 2 * source.num_records))
  assert sorted(second_epoch) == list(range(source.num_records))
  assert (first_epoch != second_epoch).any()
  other_seed = _source(data_dir, seed=1).record_ids(np.arange(source.num_records))
  assert (first_epoch != other_seed).any()


def test_a_resumed_source_continues_exactly_where_the_run_was(data_dir):
  source = _source(data_dir)
  from_start = _take(source, 0, 4)
  resumed = _take(source, 2, 2)
  for expected, actual in zip(from_start[2:], resumed):
    for name in ("title_ids", "image", "index", "valid"):
      np.testing.assert_array_equal(expected[name], actual[name])
  np.testing.assert_array_equal(from_start[3]["index"], np.arange(24, 32))


def test_two_processes_together_read_what_one_process_reads(data_dir):
  single = _take(_source(data_dir), 3, 1)[0]
  halves = [_take(_source(data_dir, process_index=p, process_count=2), 3, 1)[0]
            for p in range(2)]
  for name in ("title_ids", "image", "index", "valid"):
    np.testing.assert_array_equal(
        single[name], np.concatenate([half[name] for half in halves]))
  assert single["title_ids"].shape == (8, 16) and single["title_ids"].dtype == np.int32
  assert single["image"].shape == (8, 32, 32, 3) and single["image"].dtype == np.float32


def test_a_truncated_shard_is_counted_and_never_hangs(data_dir, tmp_path):
  copy = tmp_path / "prepared"
  shutil.copytree(data_dir, copy)
  shard = sorted(copy.glob("train-*.tfrecord"))[0]
  whole = len(scan_offsets(str(shard)))
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  lost = whole - len(scan_offsets(str(shard)))
  assert lost > 0
  source = _source(str(copy))
  num_records = source.num_records
  steps = num_records // 8  # whole steps within the first epoch
  batches = _take(source, 0, steps)
  invalid = sum(int((~batch["valid"]).sum()) for batch in batches)
  unread = set(range(num_records)) - set(
      source.record_ids(np.arange(steps * 8)).tolist())
  first_shard = json.loads((copy / "dataset.json").read_text())[
      "splits"]["train"]["shard_counts"][0]
  first_shard_lost = set(range(first_shard - lost, first_shard))
  assert invalid == lost - len(unread & first_shard_lost)
  # The counter also sees batches read ahead of the consumer.
  assert 0 < invalid <= source.skipped_records()
  for batch in batches:
    assert np.isfinite(batch["image"]).all()
    assert (batch["image"][~batch["valid"]] == 0).all()


def test_prepare_writes_each_shards_record_index_beside_it(data_dir):
  from item_jax.data import indexed
  info = json.loads(open(f"{data_dir}/dataset.json").read())
  for split in info["splits"].values():
    assert len(split["offsets_files"]) == len(split["files"])
    for shard, index, count in zip(split["files"], split["offsets_files"],
                                   split["shard_counts"]):
      written = np.load(f"{data_dir}/{index}", allow_pickle=False)
      np.testing.assert_array_equal(written, scan_offsets(f"{data_dir}/{shard}"))
      assert written.shape == (count, 2)
      assert indexed.read_offsets(f"{data_dir}/{shard}", f"{data_dir}/{index}") is not None


def test_a_source_reads_the_index_and_scans_only_without_a_fitting_one(
    data_dir, tmp_path, monkeypatch, caplog):
  from item_jax.data import indexed
  expected = _take(_source(data_dir), 0, 3)
  scanned = []
  real_scan = indexed.scan_offsets
  monkeypatch.setattr(indexed, "scan_offsets",
                      lambda path: scanned.append(path) or real_scan(path))
  # With the index files no shard is scanned.
  batches = _take(_source(data_dir), 0, 3)
  assert scanned == []
  # An older dataset (no index in dataset.json) and a wrong index (another
  # shard's) are scanned, with the same batches.
  older, wrong = tmp_path / "older", tmp_path / "wrong"
  for copy in (older, wrong):
    shutil.copytree(data_dir, copy)
  info = json.loads((older / "dataset.json").read_text())
  for split in info["splits"].values():
    del split["offsets_files"]
  (older / "dataset.json").write_text(json.dumps(info))
  indexes = sorted(wrong.glob("train-*.offsets.npy"))
  shutil.copy(indexes[1], indexes[0])
  for copy, scans in ((older, 8), (wrong, 1)):
    scanned.clear()
    batches = _take(_source(str(copy)), 0, 3)
    assert len(scanned) == scans, copy
    for reference, batch in zip(expected, batches):
      for name in ("title_ids", "image", "index", "valid"):
        np.testing.assert_array_equal(reference[name], batch[name])
  assert "does not match" in caplog.text


@pytest.fixture(scope="module")
def with_text(prepared_catalogue, tmp_path_factory):
  """(data dir, dataset.json, {item_id: description}) of the synthetic
  catalogue with a description on two rows of three, prepared with it."""
  import csv
  from item_jax.data.prepare import prepare
  catalogue, tmp_path = prepared_catalogue[0], tmp_path_factory.mktemp("with_text")
  with open(catalogue / "catalogue.csv", newline="") as file:
    rows = list(csv.DictReader(file))
  for position, row in enumerate(rows):
    row["description"] = "" if position % 3 == 0 else f"made of steel {position}\nsize L"
  path = tmp_path / "catalogue.csv"
  with open(path, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  data = tmp_path / "prepared"
  info = prepare(str(path), str(catalogue / "images"), str(data), num_shards=2,
                 vocab_size=300, num_workers=0, text_columns=("description",))
  return data, info, {row["item_id"]: row["description"] for row in rows}


def test_the_text_view_reads_each_records_other_text_columns(with_text):
  from item_jax.data.tokenizer import load_tokenizer
  data, info, texts = with_text
  source = _source(str(data), max_text_len=12)
  batch = _take(source, 0, 1)[0]
  assert batch["text_ids"].shape == (8, 12) and batch["has_text"].dtype == bool
  import tensorflow as tf
  from item_jax.data import pipeline
  in_order = [record["item_id"].decode()   # record id: position in shard order
              for name in info["splits"]["train"]["files"]
              for record in tf.data.TFRecordDataset(str(data / name)).map(
                  pipeline.parse_record).as_numpy_iterator()]
  tokenizer = load_tokenizer(str(data / info["tokenizer"]))
  for row, record_id in enumerate(source.record_ids(batch["index"].astype(np.int64))):
    text = texts[in_order[record_id]]
    assert bool(batch["has_text"][row]) == bool(text)
    np.testing.assert_array_equal(batch["text_ids"][row],
                                  tokenizer.encode_batch([text.replace("\n", " ")], 12)[0])
  # Without a text view the batch is as before.
  assert "text_ids" not in _take(_source(str(data)), 0, 1)[0]


def test_a_run_with_the_text_view_trains_on_it(with_text, tmp_path):
  from train_helpers import tiny_settings
  from item_jax.train.loop import train
  data = with_text[0]
  settings = tiny_settings(str(data), "--config.total_steps=3",
                           "--config.objectives.itc_weight=1",
                           "--config.objectives.itc_pairs='title:text,joint:title'",
                           "--config.data.max_text_len=12")
  assert settings.text_len == 12
  history = train(settings, str(tmp_path / "run"))
  assert [row["step"] for row in history][-1] == 3
  assert all(np.isfinite(row["itc"]) and row["itc"] > 0 for row in history)
