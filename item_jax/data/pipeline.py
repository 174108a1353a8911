"""tf.data input: a prepared split → fixed-shape numpy batches for one JAX process.

Owns which shards each process reads, skipping (and counting) corrupt
records, image decode/resize/normalise, batch tokenisation and the tf.data
options a TPU host needs. Iterate the result with `ds.as_numpy_iterator()`.
"""

import json
import logging
import math
import os

from etils import epath
import tensorflow as tf

from item_jax.data import prepare as prepare_lib
from item_jax.data import tokenizer as tokenizer_lib
from item_jax.errors import MissingInputError, UserError, no_prepared_data

_log = logging.getLogger(__name__)

RESIZE_MODES = ("pad", "crop")
# Pixel normalisation, (x/255 - mean)/std, of every reader.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
_JPEG_RATIOS = (1, 2, 4, 8)  # the scales libjpeg can decode at directly.
_MAX_FILES_READ_AT_ONCE = 16
_READ_BUFFER_BYTES = 1 << 20  # Fewer, larger reads: what cloud storage wants.
_PARSE_BATCH_SIZE = 64  # records parsed and checked together in a shard.


def _configure_tensorflow_for_input():
  # Both take effect only if TensorFlow has not run an op yet in this process.
  # Batches of float images exceed malloc's mmap threshold, so with the
  # default allocator every batch page-faults fresh memory; a pooling
  # allocator nearly doubles throughput.
  os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
  # tf.data must never claim GPU/TPU memory that JAX needs.
  for device_type in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], device_type)
    except (RuntimeError, ValueError) as error:  # already initialised, or unknown type
      _log.warning("could not hide %s devices from TensorFlow: %s", device_type, error)


_configure_tensorflow_for_input()


def load_dataset_info(data_dir: str) -> dict:
  """The dataset.json that `prepare` wrote into `data_dir`."""
  path = epath.Path(data_dir) / prepare_lib.DATASET_INFO_FILE
  if not path.exists():
    raise MissingInputError(no_prepared_data(data_dir))
  return json.loads(path.read_text())


def process_shards(
    data_dir: str,
    split: str,
    process_index: int | None = None,
    process_count: int | None = None,
) -> list[tuple[str, int]]:
  """`(path, record_count)` of the shards this process reads: every process_count-th."""
  files, counts = _split_shards(load_dataset_info(data_dir), data_dir, split)
  process_index, process_count = _process_position(process_index, process_count)
  _check_file_count(data_dir, split, len(files), process_count)
  return list(zip(files, counts))[process_index::process_count]


def parse_record(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """One serialized tf.train.Example → its raw features (see prepare.RECORD_FEATURES)."""
  return tf.io.parse_single_example(serialized, prepare_lib.RECORD_FEATURES)


def preprocess_image(
    jpeg: tf.Tensor,
    image_size: int,
    resize: str,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
) -> tf.Tensor:
  """JPEG bytes → float32 (image_size, image_size, 3), normalised (x/255 - mean)/std.

  "pad" fits the whole image (larger side = image_size) and centres it on
  zeros, the mean colour after normalising; "crop" fills the square (smaller
  side = image_size) and keeps the centre.
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  image = _decode_jpeg_covering(jpeg, image_size, resize)
  height, width = tf.unstack(tf.shape(image)[:2])
  if resize == "crop":
    side = tf.minimum(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = tf.image.resize(image[top:top + side, left:left + side], [image_size, image_size])
  else:
    fit = image_size / tf.cast(tf.maximum(height, width), tf.float32)
    fitted_shape = tf.round(tf.cast(tf.stack([height, width]), tf.float32) * fit)
    image = tf.image.resize(image, tf.maximum(tf.cast(fitted_shape, tf.int32), 1))
  image = _normalise(image, image_mean, image_std)
  if resize == "pad":
    fitted_height, fitted_width = tf.unstack(tf.shape(image)[:2])
    image = tf.image.pad_to_bounding_box(
        image, (image_size - fitted_height) // 2, (image_size - fitted_width) // 2,
        image_size, image_size,
    )
  return tf.ensure_shape(image, [image_size, image_size, 3])


def _normalise(image: tf.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> tf.Tensor:
  # Per-channel constants tiled along the width make the broadcast run over
  # rows only, which vectorises; broadcasting a (3,) vector is several times slower.
  width = tf.shape(image)[1]
  scale = tf.constant([[1 / (255 * channel_std) for channel_std in std]])
  offset = tf.constant([[m / s for m, s in zip(mean, std)]])
  return image * tf.tile(scale, [width, 1]) - tf.tile(offset, [width, 1])


def _decode_jpeg_covering(jpeg: tf.Tensor, image_size: int, resize: str) -> tf.Tensor:
  # libjpeg decodes at 1/2, 1/4 or 1/8 scale for a fraction of the cost; take
  # the smallest scale that still covers the target, which also keeps the
  # bilinear resize from shrinking by 2x or more (where it would alias).
  source_shape = tf.image.extract_jpeg_shape(jpeg)[:2]
  covering_side = tf.reduce_max(source_shape) if resize == "pad" else tf.reduce_min(source_shape)
  ratio_index = tf.add_n([
      tf.cast(covering_side >= image_size * ratio, tf.int32) for ratio in _JPEG_RATIOS[1:]
  ])
  return tf.switch_case(ratio_index, [
      lambda ratio=ratio: tf.io.decode_jpeg(jpeg, channels=3, ratio=ratio)
      for ratio in _JPEG_RATIOS
  ])


def make_dataset(
    data_dir: str,
    split: str,
    batch_size: int,
    image_size: int,
    max_title_len: int,
    *,
    training: bool,
    seed: int | None = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    resize: str = "pad",
    image_mean: tuple[float, float, float] = IMAGE_MEAN,
    image_std: tuple[float, float, float] = IMAGE_STD,
    shuffle_buffer: int = 10_000,
    skipped_records: tf.Variable | None = None,
    num_threads: int | None = None,
    ram_budget_bytes: int | None = None,
    keep_titles: bool = False,
) -> tf.data.Dataset:
  """Batches of this process's shards of `split`; `batch_size` is per process.

  Each batch is a dict of fixed shapes: title_ids int32 (b, max_title_len),
  image float32 (b, image_size, image_size, 3) (see `preprocess_image`;
  zeros for a listing without one), index int64 (b,), category_id int32
  (b,), and bool (b,) valid, has_title and has_image. Training
  repeats forever, shuffled from `seed` (None: faster, not reproducible),
  and every example is valid. Evaluation makes one pass and adds item_id and
  product_id (bytes); the last batches are padded with invalid zero examples
  up to the batch count of the busiest process, so every process yields the
  same number of batches. `keep_titles` keeps the raw title (bytes) beside
  its token ids (the TF-IDF baseline reads it).

  Corrupt records (bad framing/CRC, unparsable, not a JPEG) are skipped and
  added to `skipped_records` (an int64 tf.Variable) when their shard has been
  read to its end. A record whose JPEG passes those checks but still fails
  to decode is skipped with a logged warning, uncounted: `prepare` writes
  only images that decoded in full, so that needs a record from elsewhere.
  """
  info = load_dataset_info(data_dir)
  process_index, process_count = _process_position(process_index, process_count)
  files, counts = _split_shards(info, data_dir, split)
  _check_file_count(data_dir, split, len(files), process_count)
  my_files = files[process_index::process_count]
  my_counts = counts[process_index::process_count]
  if training and not sum(my_counts):
    raise UserError(f"{data_dir}: process {process_index} has no {split} records to train on")
  if skipped_records is None:
    skipped_records = tf.Variable(0, dtype=tf.int64, trainable=False)
  tokenizer = tokenizer_lib.load_tokenizer(str(epath.Path(data_dir) / info["tokenizer"]))
  deterministic = seed is not None or not training

  shards = tf.data.Dataset.from_tensor_slices((my_files, tf.constant(my_counts, tf.int64)))
  if training:
    shard_seed = None if seed is None else seed + process_index
    shards = shards.shuffle(len(my_files), seed=shard_seed, reshuffle_each_iteration=True)
  records = shards.interleave(
      lambda path, count: _read_shard(path, count, skipped_records),
      cycle_length=min(len(my_files), _MAX_FILES_READ_AT_ONCE),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=deterministic,
  )
  if training:
    # Repeating after the interleave ends (rather than spins) if every record is corrupt.
    records = records.repeat().shuffle(shuffle_buffer, seed=shard_seed)

  def to_example(record):
    has_image = record["has_image"] > 0
    example = {
        "title": record["title"],
        "image": tf.cond(
            has_image,
            lambda: preprocess_image(record["image"], image_size, resize, image_mean,
                                     image_std),
            lambda: tf.zeros([image_size, image_size, 3], tf.float32)),
        "index": record["index"],
        "category_id": tf.cast(record["category_id"], tf.int32),
        "valid": tf.constant(True),
        "has_title": record["has_title"] > 0,
        "has_image": has_image,
    }
    if not training:
      example.update(item_id=record["item_id"], product_id=record["product_id"],
                     text=record["text"])
    return example

  examples = records.map(
      to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
  ).ignore_errors(log_warning=True)
  if training:
    batches = examples.batch(batch_size, drop_remainder=True)
  else:
    busiest = max(sum(counts[p::process_count]) for p in range(process_count))
    padding = tf.data.Dataset.from_tensors(
        tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), examples.element_spec)
    )
    batches = examples.concatenate(padding.repeat()).batch(batch_size, drop_remainder=True)
    batches = batches.take(math.ceil(busiest / batch_size))

  def tokenise(batch):
    batch = dict(batch)
    title_ids = tf.numpy_function(
        lambda titles: tokenizer.encode_batch(list(titles), max_title_len),
        [batch["title"] if keep_titles else batch.pop("title")], tf.int32,
        stateful=False,
    )
    batch["title_ids"] = tf.ensure_shape(title_ids, [batch_size, max_title_len])
    return batch

  batches = batches.map(tokenise, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  batches = batches.prefetch(tf.data.AUTOTUNE)
  return batches.with_options(_host_options(deterministic, num_threads, ram_budget_bytes))


def _read_shard(path: tf.Tensor, expected_count: tf.Tensor, skipped_records: tf.Variable):
  """One shard's parsed JPEG records; what went missing is added to `skipped_records`.

  A framing or CRC error ends the shard (TensorFlow moves on to the next
  file), a record that is not a JPEG is dropped, and an unparsable record
  costs its parse batch. Records are parsed and checked a batch at a time,
  which is several times cheaper than per record; the survivors are counted
  and, at an empty end marker, compared with the count in dataset.json.
  """
  end_marker = {
      name: tf.zeros([0], spec.dtype) for name, spec in prepare_lib.RECORD_FEATURES.items()
  }
  batches = (
      tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES)
      .ignore_errors(log_warning=True)
      .batch(_PARSE_BATCH_SIZE)
      .map(_parse_jpeg_records)
      .ignore_errors(log_warning=True)
      .map(lambda records: (records, False))
      .concatenate(tf.data.Dataset.from_tensors((end_marker, True)))
  )

  def count_survivors(num_read, batch):
    records, at_end = batch
    num_read += tf.size(records["index"], out_type=tf.int64)
    num_lost = tf.where(at_end, tf.maximum(expected_count - num_read, 0), 0)
    with tf.control_dependencies([skipped_records.assign_add(num_lost)]):
      return num_read, tf.nest.map_structure(tf.identity, records)

  return batches.scan(tf.constant(0, tf.int64), count_survivors).unbatch()


def _parse_jpeg_records(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """A vector of serialized records → those whose image looks like a JPEG
  (or that have no image and say so)."""
  records = tf.io.parse_example(serialized, prepare_lib.RECORD_FEATURES)
  # Start-of-image and end-of-image markers: catches foreign bytes and cut
  # files without decoding, so the check itself cannot fail.
  images = records["image"]
  last_two = tf.maximum(tf.strings.length(images) - 2, 0)
  looks_like_jpeg = tf.logical_and(
      tf.equal(tf.strings.substr(images, 0, 2), b"\xff\xd8"),
      tf.equal(tf.strings.substr(images, last_two, tf.fill(tf.shape(images), 2)), b"\xff\xd9"),
  )
  no_image = tf.logical_and(tf.equal(records["has_image"], 0),
                            tf.equal(tf.strings.length(images), 0))
  usable = tf.logical_or(looks_like_jpeg, no_image)
  return {name: tf.boolean_mask(values, usable) for name, values in records.items()}


def _split_shards(info: dict, data_dir: str, split: str) -> tuple[list[str], list[int]]:
  if split not in info["splits"]:
    raise UserError(f"{data_dir} has no split {split!r}; it has {list(info['splits'])}")
  shards = info["splits"][split]
  files = [str(epath.Path(data_dir) / name) for name in shards["files"]]
  return files, shards["shard_counts"]


def _process_position(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # Only asked when not given: tests and tools need no JAX runtime.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is not in [0, {process_count})")
  return process_index, process_count


def _check_file_count(data_dir: str, split: str, num_files: int, process_count: int):
  if num_files < process_count:
    raise UserError(
        f"{data_dir} has {num_files} {split} files but there are {process_count} processes; "
        f"re-run prepare with num_shards >= {process_count} (a multiple of it)"
    )
  if num_files % process_count:
    _log.warning("%s: %d %s files do not divide among %d processes; some read more",
                 data_dir, num_files, split, process_count)


def _host_options(deterministic: bool, num_threads: int | None, ram_budget_bytes: int | None):
  # Bounded threads and RAM: tf.data's defaults can starve a TPU host.
  options = tf.data.Options()
  options.deterministic = deterministic
  options.threading.private_threadpool_size = num_threads or os.cpu_count() or 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.ram_budget = ram_budget_bytes or _quarter_of_host_memory()
  options.experimental_optimization.inject_prefetch = False
  return options


def _quarter_of_host_memory() -> int:
  # The training process needs the rest (checkpoints, metrics, JAX itself).
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
