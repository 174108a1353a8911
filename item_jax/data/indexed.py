"""Training input by global example index: the data position is a pure function
of (seed, step), whatever the number of processes or where a run resumed.

Global example e of the run is record perm(seed, epoch)[e % N] of the split
(epoch = e // N). Step s uses examples [s*B, (s+1)*B); process p reads rows
[p*b, (p+1)*b) of them (b = B / process count). Records are read by random
access: each shard's record offsets come from the index `prepare` writes
beside it (SHARD.offsets.npy), or from one scan of its framing for a dataset
without one (or whose index does not fit the shard). A record
that cannot be read or parsed, or whose image is not a whole JPEG, is counted,
and its batch row is marked invalid (weight 0) so shapes and order never change.

With `cells` (a frozen image stem's output per record, `data.stem_cells =
"cached"`), batches hold `image_cells` read from it instead of decoded
`image` pixels; `ordered_images` reads every record's photo once, in record
order, to compute them.
"""

import concurrent.futures
import functools
import logging
import struct
import threading

import jax
import numpy as np
import tensorflow as tf
from etils import epath

from item_jax.data import pipeline
from item_jax.data.tokenizer import load_tokenizer
from item_jax.errors import UserError

_HEADER = struct.Struct("<QI")   # record length, masked CRC of the length
_FOOTER_BYTES = 4                # masked CRC of the data
_log = logging.getLogger(__name__)


def scan_offsets(path: str) -> np.ndarray:
  """(offset, length) of each whole record in a TFRecord file, from its framing."""
  offsets = []
  with epath.Path(path).open("rb") as stream:
    size = stream.seek(0, 2)
    position = 0
    while position + _HEADER.size <= size:
      stream.seek(position)
      length, _ = _HEADER.unpack(stream.read(_HEADER.size))
      end = position + _HEADER.size + length + _FOOTER_BYTES
      if end > size:
        break  # a truncated last record
      offsets.append((position + _HEADER.size, length))
      position = end
  return np.asarray(offsets, np.int64).reshape(-1, 2)


def read_offsets(shard_path: str, offsets_path: str) -> np.ndarray | None:
  """The (offset, length) rows `prepare` wrote beside a shard, or None (with
  a warning: the shard is then scanned) when the file is missing,
  unreadable, or does not fit the shard's size and framing."""
  try:
    with epath.Path(offsets_path).open("rb") as file:
      offsets = np.load(file, allow_pickle=False)
    size = epath.Path(shard_path).stat().length
  except (OSError, ValueError) as error:
    _log.warning("%s: no usable record index (%s); scanning the shard",
                 offsets_path, error)
    return None
  starts = (offsets[:, 0] - _HEADER.size if offsets.ndim == 2 and len(offsets)
            else np.zeros(0, np.int64))
  ends = starts + _HEADER.size + (offsets[:, 1] if len(starts) else 0) + _FOOTER_BYTES
  if (offsets.ndim != 2 or offsets.shape[1] != 2 or offsets.dtype != np.int64
      or (len(starts) and (starts[0] != 0 or np.any(starts[1:] != ends[:-1])))
      or (ends[-1] if len(starts) else 0) != size):
    _log.warning("%s does not match %s (%d bytes); scanning the shard",
                 offsets_path, shard_path, size)
    return None
  return offsets


def _whole_jpeg(data: bytes) -> bool:
  return data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"


class IndexedSource:
  """Host-local training batches for steps start, start+1, ... of a run."""

  def __init__(self, data_dir: str, split: str, *, global_batch_size: int,
               seed: int, image_size: int, max_title_len: int,
               resize: str = "pad", process_index: int = 0,
               process_count: int = 1, num_read_threads: int = 16,
               max_text_len: int = 0, cells: np.ndarray | None = None):
    if global_batch_size % process_count:
      raise UserError(f"global batch {global_batch_size} is not divisible by "
                      f"{process_count} processes")
    info = pipeline.load_dataset_info(data_dir)
    split_info = info["splits"].get(split)
    if split_info is None:
      raise UserError(f"{data_dir} has no split {split!r}; it has "
                      f"{sorted(info['splits'])}")
    self._files = [str(epath.Path(data_dir) / name) for name in split_info["files"]]
    # Written by `prepare` beside each shard; older datasets have none.
    self._offsets_files = [str(epath.Path(data_dir) / name)
                           for name in split_info.get("offsets_files", ())]
    self._counts = np.asarray(split_info["shard_counts"], np.int64)
    self.num_records = int(self._counts.sum())
    if not self.num_records:
      raise UserError(f"{data_dir}: split {split!r} has no records to train on")
    self._first_record = np.concatenate([[0], np.cumsum(self._counts)[:-1]])
    self._offsets = {}
    self._offsets_lock = threading.Lock()
    self._handles = threading.local()
    self._pool = concurrent.futures.ThreadPoolExecutor(num_read_threads)
    self._skipped = 0
    self._skipped_lock = threading.Lock()
    self.global_batch_size = global_batch_size
    self.process_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.seed = seed
    self.image_size = image_size
    self.max_title_len = max_title_len
    # > 0: batches also hold text_ids (batch, max_text_len) and has_text, the
    # records' other text columns (ITC's "text" view).
    self.max_text_len = max_text_len
    self.resize = resize
    # (num_records, cells, channels), any float dtype (a memmap): batches
    # then carry image_cells (float32) instead of image.
    if cells is not None and len(cells) != self.num_records:
      raise UserError(f"{len(cells)} cached image cells for the "
                      f"{self.num_records} records of split {split!r}")
    self._cells = cells
    self._tokenizer = load_tokenizer(str(epath.Path(data_dir) / info["tokenizer"]))

  # -- which records ---------------------------------------------------------

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_records)

  def example_indices(self, step: int) -> np.ndarray:
    """This process's global example indices for 0-based step `step`."""
    start = step * self.global_batch_size + self.process_index * self.process_batch_size
    return np.arange(start, start + self.process_batch_size, dtype=np.int64)

  def record_ids(self, example_indices: np.ndarray) -> np.ndarray:
    epochs, positions = np.divmod(example_indices, self.num_records)
    return np.asarray([self._permutation(int(epoch))[position]
                       for epoch, position in zip(epochs, positions)], np.int64)

  # -- reading ---------------------------------------------------------------

  def _shard_offsets(self, shard: int) -> np.ndarray:
    with self._offsets_lock:
      if shard not in self._offsets:
        offsets = None
        if self._offsets_files:
          offsets = read_offsets(self._files[shard], self._offsets_files[shard])
        self._offsets[shard] = (scan_offsets(self._files[shard]) if offsets is None
                                else offsets)
        found, expected = len(self._offsets[shard]), int(self._counts[shard])
        if found != expected:
          _log.warning("%s: %d whole records, dataset.json says %d; the missing "
                       "ones are skipped", self._files[shard], found, expected)
      return self._offsets[shard]

  def _handle(self, shard: int):
    handles = self._handles.__dict__.setdefault("open", {})
    if shard not in handles:
      handles[shard] = epath.Path(self._files[shard]).open("rb")
    return handles[shard]

  def _read_one(self, record_id: int):
    """(title bytes, jpeg bytes, has_title, has_image, text bytes) of a
    record, or None if it is unusable. A listing without an image has empty
    jpeg bytes; one without other text columns empty text."""
    shard = int(np.searchsorted(self._first_record, record_id, side="right") - 1)
    position = record_id - self._first_record[shard]
    try:
      offsets = self._shard_offsets(shard)
      if position >= len(offsets):
        raise ValueError("beyond the shard's last whole record")
      offset, length = offsets[position]
      stream = self._handle(shard)
      stream.seek(int(offset))
      data = stream.read(int(length))
      features = tf.train.Example.FromString(data).features.feature
      title = features["title"].bytes_list.value[0]
      jpeg = features["image"].bytes_list.value[0]
      # Records written before these fields existed have both inputs.
      has = {name: bool(features[name].int64_list.value[0]) if name in features
             else True for name in ("has_title", "has_image")}
      if has["has_image"] and not _whole_jpeg(jpeg):
        raise ValueError("image is not a whole JPEG")
      text = (features["text"].bytes_list.value[0]
              if "text" in features and features["text"].bytes_list.value else b"")
      return (title, jpeg if has["has_image"] else b"", has["has_title"],
              has["has_image"], text)
    except Exception as error:  # any failure of one record skips only that record
      _log.warning("skipping record %d of %s: %s", position, self._files[shard], error)
      with self._skipped_lock:
        self._skipped += 1
      return None

  def skipped_records(self) -> int:
    return self._skipped

  def _read_step(self, step):
    indices = self.example_indices(int(step))
    records = list(self._pool.map(self._read_one, self.record_ids(indices)))
    valid = np.asarray([record is not None for record in records])
    titles = [record[0] if record else b"" for record in records]
    # Cached cells replace the photo: its bytes need not travel on.
    jpegs = [record[1] if record and self._cells is None else b""
             for record in records]
    has_title = np.asarray([bool(record and record[2]) for record in records])
    has_image = np.asarray([bool(record and record[3]) for record in records])
    texts = [record[4] if record else b"" for record in records]
    outputs = (np.asarray(titles, object), np.asarray(jpegs, object), valid,
               indices.astype(np.int32), has_title, has_image,
               np.asarray(texts, object))
    if self._cells is None:
      return outputs
    ids = self.record_ids(indices)
    order = np.argsort(ids)  # a memmap reads faster in record order
    cells = np.empty((len(ids),) + self._cells.shape[1:], np.float32)
    cells[order] = self._cells[ids[order]]
    cells[~(valid & has_image)] = 0.0
    return outputs + (cells,)

  def ordered_images(self, batch_size: int):
    """(record ids, images (n, size, size, 3) float32, usable (n,) bool) of
    every record of the split in record order, `batch_size` at a time: the
    photos training would decode. A record that cannot be read, or has no
    photo, is not usable (its image is zeros)."""
    def read(start):
      ids = np.arange(start, min(start + batch_size, self.num_records))
      records = list(self._pool.map(self._read_one, ids))
      usable = np.asarray([bool(record and record[3]) for record in records])
      jpegs = np.asarray([record[1] if record else b"" for record in records],
                         object)
      return ids, jpegs, usable

    starts = tf.data.Dataset.range(0, self.num_records, batch_size)
    batches = starts.map(
        lambda start: tf.numpy_function(read, [start],
                                        [tf.int64, tf.string, tf.bool]),
        num_parallel_calls=2, deterministic=True).map(
        lambda ids, jpegs, usable: (
            ids, tf.map_fn(lambda x: self._decode_image(*x), (jpegs, usable),
                           fn_output_signature=tf.float32), usable),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return batches.prefetch(2).as_numpy_iterator()

  # -- the tf.data pipeline ----------------------------------------------------

  def _decode_image(self, jpeg, has_image):
    """A record's normalised pixels (image_size, image_size, 3), zeros
    without a photo."""
    size = self.image_size
    return tf.cond(
        has_image,
        lambda: pipeline.preprocess_image(jpeg, size, self.resize,
                                          (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        lambda: tf.zeros([size, size, 3], tf.float32))

  def dataset(self, start_step: int) -> tf.data.Dataset:
    batch = self.process_batch_size
    cached = self._cells is not None
    types = [tf.string, tf.string, tf.bool, tf.int32, tf.bool, tf.bool, tf.string]

    def read(step):
      outputs = tf.numpy_function(self._read_step, [step],
                                  types + [tf.float32] * cached, stateful=False)
      shapes = [[batch]] * len(types) + (
          [[batch, *self._cells.shape[1:]]] if cached else [])
      return tuple(tf.ensure_shape(output, shape)
                   for output, shape in zip(outputs, shapes))

    def decode(title, jpeg, valid, index, has_title, has_image, text,
               cells=None):
      example = {"title": title, "valid": valid, "index": index,
                 "has_title": has_title, "has_image": has_image}
      if cached:
        example["image_cells"] = cells
      else:
        example["image"] = self._decode_image(jpeg, has_image)
      if self.max_text_len:
        example["text"] = text
      return example

    def tokenise(examples):
      examples = dict(examples)
      title_ids = tf.numpy_function(
          lambda titles: self._tokenizer.encode_batch(list(titles), self.max_title_len),
          [examples.pop("title")], tf.int32, stateful=False)
      examples["title_ids"] = tf.ensure_shape(title_ids, [batch, self.max_title_len])
      if self.max_text_len:
        text = examples.pop("text")
        text_ids = tf.numpy_function(
            lambda texts: self._tokenizer.encode_batch(
                [value.decode("utf-8", "replace").replace("\n", " ")
                 for value in texts],
                self.max_text_len),
            [text], tf.int32, stateful=False)
        examples["text_ids"] = tf.ensure_shape(text_ids, [batch, self.max_text_len])
        examples["has_text"] = (tf.strings.length(tf.strings.strip(text)) > 0) & (
            examples["valid"])
      return examples

    steps = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    examples = steps.map(read, num_parallel_calls=2, deterministic=True).unbatch()
    examples = examples.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
    batches = examples.batch(batch, drop_remainder=True).map(
        tokenise, num_parallel_calls=2, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1
    return batches.prefetch(2).with_options(options)

  def batches(self, start_step: int):
    """Host-local numpy batches for 0-based steps start_step, start_step+1, ..."""
    return self.dataset(start_step).as_numpy_iterator()

  def abstract_global_batch(self, sharding) -> dict:
    """ShapeDtypeStructs of one global batch, for compiling the step."""
    return abstract_global_batch(
        self.global_batch_size, self.image_size, self.max_title_len, sharding,
        max_text_len=self.max_text_len,
        cells_shape=None if self._cells is None else self._cells.shape[1:])


def abstract_global_batch(global_batch_size: int, image_size: int,
                          max_title_len: int, sharding=None,
                          max_text_len: int = 0,
                          cells_shape: tuple[int, int] | None = None) -> dict:
  """ShapeDtypeStructs of one global training batch; needs no data (AOT
  compile). `max_text_len` > 0 adds the text view's text_ids and has_text;
  `cells_shape` (cells, channels) puts cached image_cells in place of image."""
  batch, size = global_batch_size, image_size
  image = (("image_cells", (batch, *cells_shape)) if cells_shape
           else ("image", (batch, size, size, 3)))
  shapes = {"title_ids": ((batch, max_title_len), np.int32),
            image[0]: (image[1], np.float32),
            "valid": ((batch,), np.bool_), "index": ((batch,), np.int32),
            "has_title": ((batch,), np.bool_), "has_image": ((batch,), np.bool_)}
  if max_text_len:
    shapes.update(text_ids=((batch, max_text_len), np.int32),
                  has_text=((batch,), np.bool_))
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for name, (shape, dtype) in shapes.items()}
