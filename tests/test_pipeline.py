"""The tf.data pipeline: round trip from catalogue to batches, fixed shapes, process
shards, resize modes, and corrupt shards that are counted instead of hanging."""

import csv
import io
import pathlib
import shutil
import struct
import threading

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from item_jax.data import pipeline
from item_jax.data import prepare
from item_jax.data import tokenizer as tokenizer_lib

NUM_LISTINGS = 40
SOURCE_SIDE = 32
TITLE_LEN = 16
WORDS = "red blue cotton steel mug shirt lamp kettle large small set of two".split()


def _listing_image(rng: np.random.Generator) -> np.ndarray:
  pixels = np.empty((SOURCE_SIDE, SOURCE_SIDE, 3), np.uint8)
  pixels[:16], pixels[16:] = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
  return pixels


def _jpeg(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
  return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A prepared catalogue of 40 listings (2 per product) in 4 shards per split."""
  root = tmp_path_factory.mktemp("pipeline")
  (root / "images").mkdir()
  rng = np.random.default_rng(0)
  sources = {}
  with open(root / "catalogue.csv", "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["item_id", "title", "image", "product_id", "category"])
    for item in range(NUM_LISTINGS):
      jpeg = _jpeg(_listing_image(rng))
      (root / "images" / f"{item}.jpg").write_bytes(jpeg)
      title = " ".join(rng.choice(WORDS, rng.integers(2, 12)))
      writer.writerow([f"item{item}", title, f"{item}.jpg", f"p{item // 2}", f"Shop > {item % 3}"])
      sources[f"item{item}"] = (title, jpeg)
  data_dir = root / "data"
  prepare.prepare(str(root / "catalogue.csv"), str(root / "images"), str(data_dir),
                  num_shards=4, vocab_size=100, split_fractions=(0.6, 0.2, 0.2), num_workers=0)
  return str(data_dir), sources


def _eval_dataset(data_dir, split, batch_size, **options):
  options = {"process_index": 0, "process_count": 1, **options}
  return pipeline.make_dataset(data_dir, split, batch_size, SOURCE_SIDE, TITLE_LEN,
                               training=False, **options)


def _valid_examples(batches):
  """Unbatches the valid examples of eval batches: item_id → example."""
  examples = {}
  for batch in batches:
    for row in np.flatnonzero(batch["valid"]):
      examples[batch["item_id"][row].decode()] = {name: value[row] for name, value in batch.items()}
  return examples


def test_every_record_reads_back_with_its_title_and_image(dataset):
  data_dir, sources = dataset
  tokenizer = tokenizer_lib.Tokenizer(str(pathlib.Path(data_dir) / "tokenizer.model"))
  seen = set()
  for split in prepare.SPLITS:
    examples = _valid_examples(_eval_dataset(data_dir, split, 8).as_numpy_iterator())
    assert len(examples) == pipeline.load_dataset_info(data_dir)["splits"][split]["count"]
    for item_id, example in examples.items():
      title, jpeg = sources[item_id]
      np.testing.assert_array_equal(example["title_ids"],
                                    tokenizer.encode_batch([title], TITLE_LEN)[0])
      pixels = (example["image"] * 0.5 + 0.5) * 255
      source = np.asarray(Image.open(io.BytesIO(jpeg)), np.float32)
      np.testing.assert_allclose(pixels, source, atol=3)
      assert example["product_id"].decode() == f"p{int(item_id[4:]) // 2}"
    seen |= set(examples)
  assert seen == set(sources)


def test_training_batches_have_fixed_shapes(dataset):
  data_dir, _ = dataset
  batches = pipeline.make_dataset(data_dir, "train", 4, 24, TITLE_LEN, training=True,
                                  process_index=0, process_count=1, shuffle_buffer=16)
  for batch in batches.take(12).as_numpy_iterator():  # More than one epoch.
    assert {name: (value.shape, value.dtype) for name, value in batch.items()} == {
        "title_ids": ((4, TITLE_LEN), np.int32),
        "image": ((4, 24, 24, 3), np.float32),
        "index": ((4,), np.int64),
        "category_id": ((4,), np.int32),
        "valid": ((4,), np.bool_),
        "has_title": ((4,), np.bool_),
        "has_image": ((4,), np.bool_),
    }
    assert batch["valid"].all() and (batch["category_id"] >= 0).all()


def test_training_order_follows_the_seed(dataset):
  data_dir, _ = dataset

  def first_indices(seed):
    batches = pipeline.make_dataset(data_dir, "train", 4, 16, TITLE_LEN, training=True,
                                    seed=seed, process_index=0, process_count=1,
                                    shuffle_buffer=16)
    return [batch["index"].tolist() for batch in batches.take(6).as_numpy_iterator()]

  assert first_indices(1) == first_indices(1)
  assert first_indices(1) != first_indices(2)


def test_eval_pads_the_last_batch_with_invalid_examples(dataset):
  data_dir, _ = dataset
  count = pipeline.load_dataset_info(data_dir)["splits"]["train"]["count"]
  batches = list(_eval_dataset(data_dir, "train", 7).as_numpy_iterator())
  assert len(batches) == -(-count // 7) and count % 7
  assert all(batch["image"].shape == (7, SOURCE_SIDE, SOURCE_SIDE, 3) for batch in batches)
  assert all(batch["title_ids"].shape == (7, TITLE_LEN) for batch in batches)
  assert sum(int(batch["valid"].sum()) for batch in batches) == count
  padding = ~batches[-1]["valid"]
  assert padding.any() and not batches[-1]["image"][padding].any()
  assert set(batches[-1]["item_id"][padding]) == {b""}


def test_each_process_reads_its_own_files(dataset):
  data_dir, _ = dataset
  first, second = (pipeline.process_shards(data_dir, "train", p, 2) for p in (0, 1))
  all_files = pipeline.process_shards(data_dir, "train", 0, 1)
  assert len(first) == len(second) == 2
  assert not set(first) & set(second) and set(first) | set(second) == set(all_files)
  per_process = [list(_eval_dataset(data_dir, "train", 4, process_index=p, process_count=2)
                      .as_numpy_iterator()) for p in (0, 1)]
  assert len(per_process[0]) == len(per_process[1])  # Uneven hosts would hang collectives.
  indices = [{int(i) for b in batches for i in b["index"][b["valid"]]} for batches in per_process]
  assert not indices[0] & indices[1]
  count = pipeline.load_dataset_info(data_dir)["splits"]["train"]["count"]
  assert indices[0] | indices[1] == set(range(count))


def test_more_processes_than_files_is_an_error_naming_the_directory(dataset):
  data_dir, _ = dataset
  with pytest.raises(ValueError, match=f"{data_dir} has 4 train files but there are 5"):
    _eval_dataset(data_dir, "train", 4, process_index=0, process_count=5)


def test_resize_pads_or_crops_around_the_centre():
  pixels = np.zeros((32, 64, 3), np.uint8)
  pixels[:, :32], pixels[:, 32:] = (20, 20, 230), (230, 20, 20)  # Blue left, red right.
  jpeg = tf.constant(_jpeg(pixels))
  blue, red = np.array([20, 20, 230]) / 127.5 - 1, np.array([230, 20, 20]) / 127.5 - 1
  padded = pipeline.preprocess_image(jpeg, 32, "pad", (0.5,) * 3, (0.5,) * 3).numpy()
  assert padded.shape == (32, 32, 3)
  assert not padded[:8].any() and not padded[24:].any()  # 32x16 of content, centred.
  np.testing.assert_allclose(padded[16, 4], blue, atol=0.06)
  np.testing.assert_allclose(padded[16, 28], red, atol=0.06)
  cropped = pipeline.preprocess_image(jpeg, 32, "crop", (0.5,) * 3, (0.5,) * 3).numpy()
  np.testing.assert_allclose(cropped[2, 4], blue, atol=0.06)  # Columns 16..47 of the source.
  np.testing.assert_allclose(cropped[29, 28], red, atol=0.06)


def test_large_images_decoded_at_reduced_scale_match_a_full_decode():
  ramp = np.linspace(0, 255, 256, dtype=np.float32)
  pixels = np.stack([ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :],
                     np.full((256, 256), 128, np.float32)], -1).astype(np.uint8)
  jpeg = _jpeg(pixels)
  reduced = pipeline.preprocess_image(tf.constant(jpeg), 32, "pad", (0.,) * 3, (1.,) * 3)
  reference = tf.image.resize(pixels, [32, 32], antialias=True) / 255
  np.testing.assert_allclose(reduced.numpy(), reference.numpy(), atol=0.03)


def _record_offsets(data: bytes) -> list[int]:
  """Where each record of a TFRecord file starts: 8-byte length, 4 CRC, data, 4 CRC."""
  offsets, position = [], 0
  while position < len(data):
    offsets.append(position)
    position += 16 + struct.unpack("<Q", data[position:position + 8])[0]
  return offsets


def _corrupt_copy(data_dir: str, destination: pathlib.Path) -> int:
  """Truncates train shard 0 inside a record and gives one record of shard 1 a
  non-JPEG image; returns how many records are lost."""
  shutil.copytree(data_dir, destination)
  shard_0 = destination / "train-00000-of-00004.tfrecord"
  data = shard_0.read_bytes()
  offsets = _record_offsets(data)
  shard_0.write_bytes(data[:offsets[2] + 20])  # Records 0 and 1 stay whole.
  shard_1 = destination / "train-00001-of-00004.tfrecord"
  records = list(tf.data.TFRecordDataset(str(shard_1)).as_numpy_iterator())
  broken = tf.train.Example.FromString(records[1])
  broken.features.feature["image"].bytes_list.value[0] = b"not a jpeg at all"
  records[1] = broken.SerializeToString()
  with tf.io.TFRecordWriter(str(shard_1)) as writer:
    for record in records:
      writer.write(record)
  return len(offsets) - 2 + 1


def _run_with_deadline(function, seconds: float):
  """Runs `function` in a thread; fails the test if it has not returned in time."""
  outcome = {}
  thread = threading.Thread(target=lambda: outcome.update(value=function()), daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), f"the pipeline did not finish within {seconds}s"
  return outcome["value"]


def test_corrupt_records_are_skipped_and_counted(dataset, tmp_path):
  data_dir, _ = dataset
  num_lost = _corrupt_copy(data_dir, tmp_path / "data")
  count = pipeline.load_dataset_info(data_dir)["splits"]["train"]["count"]
  skipped = tf.Variable(0, dtype=tf.int64)
  batches = _eval_dataset(str(tmp_path / "data"), "train", 8, skipped_records=skipped)
  examples = _run_with_deadline(lambda: _valid_examples(batches.as_numpy_iterator()), 60)
  assert len(examples) == count - num_lost
  assert int(skipped.numpy()) == num_lost


def test_training_on_corrupt_shards_neither_hangs_nor_stops(dataset, tmp_path):
  data_dir, _ = dataset
  _corrupt_copy(data_dir, tmp_path / "data")
  skipped = tf.Variable(0, dtype=tf.int64)
  batches = pipeline.make_dataset(str(tmp_path / "data"), "train", 4, 16, TITLE_LEN,
                                  training=True, process_index=0, process_count=1,
                                  shuffle_buffer=8, skipped_records=skipped)
  taken = _run_with_deadline(lambda: len(list(batches.take(30))), 60)  # Several epochs.
  assert taken == 30 and int(skipped.numpy()) > 0


def test_training_on_only_corrupt_shards_ends_instead_of_spinning(dataset, tmp_path):
  data_dir, _ = dataset
  shutil.copytree(data_dir, tmp_path / "data")
  for shard in (tmp_path / "data").glob("train-*"):
    shard.write_bytes(shard.read_bytes()[:5])
  batches = pipeline.make_dataset(str(tmp_path / "data"), "train", 4, 16, TITLE_LEN,
                                  training=True, process_index=0, process_count=1)
  assert _run_with_deadline(lambda: len(list(batches.take(5))), 60) == 0
