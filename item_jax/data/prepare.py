"""The converter: a catalogue plus its image folder → sharded TFRecords + dataset.json.

Owns the record schema (`RECORD_FEATURES`), the split by product, the shard
layout and the dataset.json summary that the input pipeline reads back.
"""

import array
import collections
from collections.abc import Callable, Iterable, Iterator
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import posixpath
import time

from etils import epath
import numpy as np
import tensorflow as tf

from item_jax.data import catalogue as catalogue_lib
from item_jax.data import images as images_lib
from item_jax.data import tokenizer as tokenizer_lib
from item_jax.errors import UserError

SCHEMA_VERSION = 1
SPLITS = ("train", "validation", "test")
DATASET_INFO_FILE = "dataset.json"

# What each tf.train.Example holds. Text is UTF-8; absent optional text is
# empty and an absent category has category_id -1. `index` numbers the
# records of a split 0..count-1 so training can derive its order from it.
RECORD_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "title": tf.io.FixedLenFeature([], tf.string),
    "item_id": tf.io.FixedLenFeature([], tf.string),
    "product_id": tf.io.FixedLenFeature([], tf.string),
    "category": tf.io.FixedLenFeature([], tf.string),
    "category_id": tf.io.FixedLenFeature([], tf.int64),
    "index": tf.io.FixedLenFeature([], tf.int64),
    # Which inputs the listing has (`prepare --modalities any`); an absent
    # image is stored as empty bytes, an absent title as "". Records written
    # before these fields existed have both.
    "has_title": tf.io.FixedLenFeature([], tf.int64, default_value=1),
    "has_image": tf.io.FixedLenFeature([], tf.int64, default_value=1),
    # The catalogue's other text columns (`prepare --text-columns`), one
    # non-empty value a line; "" without them and in older records.
    "text": tf.io.FixedLenFeature([], tf.string, default_value=""),
}
# The kinds of listing by the inputs they have, as counted in dataset.json.
LISTING_KINDS = ("title_and_image", "title_only", "image_only")
NO_TITLE_NO_IMAGE = "neither a title nor an image"
NO_IMAGE_NAMED = "no image named"  # an empty image cell, with --modalities any

_ROWS_PER_TASK = 32  # images per worker task: big enough to amortise IPC.
_TASKS_IN_FLIGHT_PER_WORKER = 4  # bounds memory while keeping workers busy.
_LOG_EVERY_ROWS = 5000
# dataset.json lists the first rows of each report; the files beside it, all.
REPORTED_ROWS = 100
REPORT_FILES = {"skipped": "skipped.jsonl", "without_image": "without_image.jsonl"}

_log = logging.getLogger(__name__)


SPLIT_BY = ("product", "group")
MAX_IMAGE_SIDE = 512  # the default larger side of stored images


def shard_file_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def split_of_product(product_key: str, seed: int, split_fractions: tuple[float, ...]) -> str:
  """The split of every listing of a product: a stable hash of (seed, product)."""
  digest = hashlib.blake2b(f"{seed}/{product_key}".encode("utf-8"), digest_size=8).digest()
  position = int.from_bytes(digest, "big") / 2**64
  for split, upper_bound in zip(SPLITS, itertools.accumulate(split_fractions)):
    if position < upper_bound:
      return split
  return SPLITS[-1]  # Fractions summing to 0.999... leave a sliver at the top.


def prepare(
    catalogue: str,
    images: str,
    output: str,
    num_shards: int = 8,
    vocab_size: int = 8000,
    columns: dict[str, str] | None = None,
    tokenizer_model: str | None = None,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_image_side: int = MAX_IMAGE_SIDE,
    num_workers: int | None = None,
    lowercase: bool = True,
    split_by: str = "product",
    modalities: str = "both",
    tokenizer_sample: int = tokenizer_lib.TOKENIZER_SAMPLE_TITLES,
    converter: "Converter | None" = None,
    text_columns: tuple[str, ...] = (),
) -> dict:
  """Converts a catalogue into `output`; returns the summary written to dataset.json.

  Rows with a broken image, an empty title, non-UTF-8 text or a repeated item
  id are skipped, each with its reason: all of them in skipped.jsonl (one
  JSON object a line), their count by reason and the first REPORTED_ROWS
  under "skipped" in dataset.json (`report_rows` reads a report). Every split
  gets `num_shards` files (records dealt round-robin), so any process count
  that can read the training split can read validation and test too.
  `num_workers` image processes (default: one per CPU; 0 checks images in
  this process) are spawned, so a calling script needs the usual
  `if __name__ == "__main__":` guard. A sentencepiece model is trained on
  at most `tokenizer_sample` kept titles (`tokenizer.TitleSample`: a
  bottom-k by the hash of the seed and item id, in catalogue order; all of
  them in a smaller catalogue) unless `tokenizer_model` is given (a sentencepiece .model,
  or a converted checkpoint's WordPiece tokenizer.json or vocab.txt); it folds
  case unless `lowercase` is False. `split_by="group"` keeps every product of
  a `group` (the catalogue column) in one split, so that look-alike siblings
  meet in evaluation; listings without a group fall back to their product.
  dataset.json is written last: a directory without it holds an unfinished
  conversion.

  `modalities="any"` keeps listings with only a title or only an image (see
  catalogue.MODALITIES): a row whose image is absent or unusable keeps its
  title (dataset.json counts those images by reason under
  "images_dropped"; without_image.jsonl lists the refused ones, and
  dataset.json the first of them under "without_image"), a row with an
  empty title keeps its image, and only a row with neither is skipped.
  dataset.json counts the listings of each kind (LISTING_KINDS), overall
  and per split.

  `text_columns` names the catalogue's other text columns to keep (e.g. a
  description): each record's "text", their non-empty values one a line.
  Title-only is the default and the paper's setting; what reads the text is
  the lexical side (`eval --lexical-text`).

  `converter` turns the catalogue into the records (default: `convert`,
  this process and `num_workers` image processes); `beam_prepare.converter`
  runs the same per-row functions on Apache Beam, for the same output.
  """
  if modalities not in catalogue_lib.MODALITIES:
    raise UserError(f"modalities must be one of {catalogue_lib.MODALITIES}, "
                    f"got {modalities!r}")
  if num_shards < 1:
    raise UserError(f"num_shards must be at least 1, got {num_shards}")
  if len(split_fractions) != len(SPLITS) or min(split_fractions) < 0:
    raise UserError(f"split_fractions must be 3 non-negative numbers, got {split_fractions}")
  if abs(sum(split_fractions) - 1) > 1e-6:
    raise UserError(f"split_fractions must sum to 1, got {split_fractions}")
  if split_by not in SPLIT_BY:
    raise UserError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
  # A given tokenizer is loaded now: a model with other special ids is refused
  # before the images are read.
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_model) if tokenizer_model else None
  options = Options(
      columns=catalogue_lib.resolve_columns(columns), num_shards=num_shards,
      split_fractions=tuple(split_fractions), seed=seed,
      max_image_side=max_image_side,
      num_workers=(os.cpu_count() or 1) if num_workers is None else num_workers,
      split_by=split_by, modalities=modalities, tokenizer_sample=tokenizer_sample,
      text_columns=tuple(text_columns))
  conversion = (converter or convert)(catalogue, epath.Path(images),
                                      epath.Path(output), options)
  columns = options.columns
  output_dir = epath.Path(output)
  if not sum(conversion.kinds.values()):
    hint = ""
    if modalities == "both":
      hint = (f"; `prepare {catalogue_lib.MODALITIES_SWITCH}` keeps listings "
              "with only a title or only an image")
    raise UserError(f"no usable listings in {catalogue}; "
                    f"reasons: {conversion.skipped_reasons}{hint}")
  if not len(conversion.titles) and tokenizer is None:
    raise UserError(f"no listing of {catalogue} has a title: the tokenizer has "
                    "nothing to learn from; pass --tokenizer (an existing one)")
  if modalities == "both" and conversion.num_skipped:
    missing = sum(conversion.skipped_reasons.get(reason, 0)
                  for reason in (catalogue_lib.EMPTY_TITLE, images_lib.MISSING_IMAGE))
    if missing:
      _log.warning("prepare: %d rows skipped for a missing title or image; "
                   "`prepare %s` keeps them as single-input listings", missing,
                   catalogue_lib.MODALITIES_SWITCH)

  if tokenizer is None:
    tokenizer = tokenizer_lib.Tokenizer(tokenizer_lib.train_sentencepiece(
        conversion.titles.titles(), str(output_dir / "tokenizer"), vocab_size,
        lowercase=lowercase))
  tokenizer_file = tokenizer.save(output_dir)
  info = {
      "schema_version": SCHEMA_VERSION,
      "splits": conversion.splits,
      "categories": conversion.categories,
      "tokenizer": tokenizer_file,
      "vocab_size": tokenizer.vocab_size,
      "columns": columns,
      "image": {
          "format": "jpeg",
          "max_side": max_image_side,
          "jpeg_quality": images_lib.JPEG_QUALITY,
          "num_reencoded": conversion.num_reencoded,
      },
      "source": {"catalogue": str(catalogue), "images": str(images)},
      "seed": seed,
      "split_fractions": list(split_fractions),
      "split_by": split_by,
      "modalities": modalities,
      "text_columns": list(text_columns),
      "listings": conversion.kinds,
      "images_dropped": conversion.images_dropped,
      "skipped_reasons": conversion.skipped_reasons,
      "num_skipped": conversion.num_skipped,
      "skipped": conversion.skipped,
      # Kept listings whose named image was refused (not those naming none).
      "num_without_image": conversion.num_without_image,
      "without_image": conversion.without_image,
      "reports": REPORT_FILES,
      "tokenizer_titles": {"kept": conversion.titles.seen,
                           "sampled": len(conversion.titles)},
  }
  (output_dir / DATASET_INFO_FILE).write_text(json.dumps(info, indent=1, ensure_ascii=False))
  _log.info("prepare: wrote %s: %s records (%s), skipped %s", output_dir,
            {split: summary["count"] for split, summary in conversion.splits.items()},
            conversion.kinds, info["skipped_reasons"])
  return info


@dataclasses.dataclass(frozen=True)
class Options:
  """How `prepare` was asked to convert, as every converter reads it."""

  columns: dict[str, str]
  num_shards: int
  split_fractions: tuple[float, ...]
  seed: int
  max_image_side: int
  num_workers: int
  split_by: str
  modalities: str
  tokenizer_sample: int
  text_columns: tuple[str, ...] = ()

  def require(self) -> tuple[str, ...]:
    """The catalogue columns these options need beyond the usual ones."""
    return ("group",) if self.split_by == "group" else ()


def convert(catalogue: str, images: epath.Path, output_dir: epath.Path,
            options: Options) -> "Conversion":
  """The local converter: reads the catalogue in this process, checks the
  images in `options.num_workers` processes, and writes every record,
  shard offsets and report into `output_dir` (all but dataset.json and the
  tokenizer, which `prepare` writes from the returned Conversion)."""
  rows = catalogue_lib.read_catalogue(catalogue, options.columns,
                                      require=options.require(),
                                      modalities=options.modalities,
                                      text_columns=options.text_columns)
  # Reading the first row checks the catalogue's columns before any output exists.
  rows = itertools.chain(list(itertools.islice(rows, 1)), rows)
  open_output(output_dir)
  results = _with_images(rows, images, options.max_image_side, options.num_workers,
                         options.modalities)
  return _write_records(results, output_dir, options.num_shards,
                        options.split_fractions, options.seed, options.split_by,
                        tokenizer_lib.TitleSample(options.tokenizer_sample, options.seed))


def open_output(output_dir: epath.Path) -> None:
  """Creates the output folder, or withdraws the dataset.json of an earlier
  conversion there: until this one writes its own, training refuses the
  folder rather than read records of two conversions."""
  output_dir.mkdir(parents=True, exist_ok=True)
  (output_dir / DATASET_INFO_FILE).unlink(missing_ok=True)


Converter = Callable[[str, epath.Path, epath.Path, Options], "Conversion"]


@dataclasses.dataclass
class Conversion:
  """What writing the records found, for dataset.json and the tokenizer."""

  splits: dict[str, dict]
  categories: list[str]
  titles: tokenizer_lib.TitleSample
  skipped: list[dict]          # the first REPORTED_ROWS skipped rows
  skipped_reasons: dict[str, int]
  num_skipped: int
  num_reencoded: int
  kinds: dict[str, int]        # LISTING_KINDS -> count
  without_image: list[dict]    # the first kept listings whose named image was refused
  num_without_image: int
  images_dropped: dict[str, int]   # kept listings without an image, by reason


class Report:
  """One report's rows: every one to its JSON-lines file as it comes, the
  first REPORTED_ROWS kept for dataset.json, a count by reason."""

  def __init__(self, path: epath.Path):
    self._file = path.open("w")
    self.first, self.count, self.reasons = [], 0, collections.Counter()

  def add(self, entry: dict, listed: bool = True) -> None:
    self.reasons[entry["reason"]] += 1
    if not listed:
      return
    self.count += 1
    if len(self.first) < REPORTED_ROWS:
      self.first.append(entry)
    self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")

  def close(self) -> None:
    self._file.close()


def report_rows(data_dir: str, report: str) -> Iterator[dict]:
  """Every row of a report ("skipped" or "without_image") of a prepared
  folder, from its file (or, for a folder written before the files
  existed, dataset.json's list)."""
  info = json.loads((epath.Path(data_dir) / DATASET_INFO_FILE).read_text())
  name = info.get("reports", {}).get(report)
  if name is None:
    yield from info.get(report, [])
    return
  with (epath.Path(data_dir) / name).open() as file:
    for line in file:
      yield json.loads(line)


def _write_records(
    results: Iterable[tuple[catalogue_lib.Listing, str | None, bytes | None, bool,
                            str | None]],
    output_dir: epath.Path,
    num_shards: int,
    split_fractions: tuple[float, ...],
    seed: int,
    split_by: str = "product",
    titles: tokenizer_lib.TitleSample | None = None,
) -> Conversion:
  writers = {split: _SplitWriter(output_dir, split, num_shards) for split in SPLITS}
  categories: dict[str, int] = {}
  if titles is None:  # (an empty sample is falsy: it has a length)
    titles = tokenizer_lib.TitleSample(seed=seed)
  skipped, without_image = (Report(output_dir / REPORT_FILES[name])
                            for name in ("skipped", "without_image"))
  kinds = dict.fromkeys(LISTING_KINDS, 0)
  num_reencoded = 0
  started = time.monotonic()
  for row_count, (listing, reason, jpeg, reencoded, image_reason) in enumerate(
      results, start=1):
    if row_count % _LOG_EVERY_ROWS == 0:
      _log.info("prepare: %d rows, %d kept, %d skipped, %.0f rows/s", row_count,
                sum(kinds.values()), skipped.count,
                row_count / (time.monotonic() - started))
    if reason:
      skipped.add(report_entry(listing, reason))
      continue
    category_id = -1
    if listing.category:
      category_id = categories.setdefault(listing.category, len(categories))
    kind = listing_kind(listing, jpeg)
    kinds[kind] += 1
    if image_reason:
      without_image.add(report_entry(listing, image_reason),
                        listed=image_reason != NO_IMAGE_NAMED)
    writers[split_of_product(product_key(listing, split_by), seed, split_fractions)].write(
        listing, jpeg, category_id, kind)
    if kind != "image_only":
      titles.add(listing.row, listing.item_id, listing.title)
    num_reencoded += reencoded
  for writer in (*writers.values(), skipped, without_image):
    writer.close()
  return Conversion(
      splits={split: writer.summary() for split, writer in writers.items()},
      categories=list(categories),
      titles=titles,
      skipped=skipped.first,
      skipped_reasons=dict(skipped.reasons),
      num_skipped=skipped.count,
      num_reencoded=num_reencoded,
      kinds=kinds,
      without_image=without_image.first,
      num_without_image=without_image.count,
      images_dropped=dict(without_image.reasons),
  )


def listing_kind(listing: catalogue_lib.Listing, jpeg: bytes | None) -> str:
  if not jpeg:
    return "title_only"
  return "title_and_image" if listing.title.strip() else "image_only"


# TFRecord framing around each record's data: its length (8 bytes) and that
# length's CRC (4) before, the data's CRC (4) after.
RECORD_HEADER_BYTES, RECORD_FOOTER_BYTES = 12, 4


def offsets_file_name(shard_file: str) -> str:
  """The record index written beside a shard: (offset, length) int64 rows."""
  return shard_file + ".offsets.npy"


class ShardWriter:
  """One TFRecord file and its record index, written beside it at close as
  `offsets_file_name(path)`: (offset, length) int64 rows, from the framing
  (an 8-byte length and its 4-byte CRC, the data, its 4-byte CRC)."""

  def __init__(self, path: str):
    self.path = str(path)
    self._writer = tf.io.TFRecordWriter(self.path)
    self._offsets = array.array("q")   # flat (offset, length): 16 bytes a record
    self.size = self.count = 0

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self._offsets.extend((self.size + RECORD_HEADER_BYTES, len(record)))
    self.size += RECORD_HEADER_BYTES + len(record) + RECORD_FOOTER_BYTES
    self.count += 1

  def close(self) -> None:
    self._writer.close()
    with epath.Path(offsets_file_name(self.path)).open("wb") as file:
      np.save(file, np.frombuffer(self._offsets, np.int64).reshape(-1, 2))


class _SplitWriter:
  """Deals one split's records round-robin over its shards, numbering them."""

  def __init__(self, output_dir: epath.Path, split: str, num_shards: int):
    self.files = [shard_file_name(split, shard, num_shards) for shard in range(num_shards)]
    self._shards = [ShardWriter(output_dir / name) for name in self.files]
    self.count = 0
    self.kinds = dict.fromkeys(LISTING_KINDS, 0)

  def write(self, listing: catalogue_lib.Listing, jpeg: bytes | None,
            category_id: int, kind: str = "title_and_image"):
    shard = self._shards[self.count % len(self._shards)]
    shard.write(make_example(listing, jpeg, category_id, self.count))
    self.count += 1
    self.kinds[kind] += 1

  def close(self):
    for shard in self._shards:
      shard.close()

  def summary(self) -> dict:
    return {
        "count": self.count,
        "num_shards": len(self.files),
        "files": self.files,
        "offsets_files": [offsets_file_name(name) for name in self.files],
        "shard_counts": [shard.count for shard in self._shards],
        "listings": self.kinds,
    }


def make_example(
    listing: catalogue_lib.Listing, jpeg: bytes | None, category_id: int, index: int
) -> bytes:
  def bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

  def int_feature(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  has_title = bool(listing.title.strip())
  features = {
      "image": bytes_feature(jpeg or b""),
      "title": bytes_feature(listing.title.encode("utf-8")),
      "item_id": bytes_feature(listing.item_id.encode("utf-8")),
      "product_id": bytes_feature(listing.product_id.encode("utf-8")),
      "category": bytes_feature(listing.category.encode("utf-8")),
      "category_id": int_feature(category_id),
      "index": int_feature(index),
      "has_title": int_feature(int(has_title)),
      "has_image": int_feature(int(bool(jpeg))),
  }
  if listing.text:  # absent, the reader's default: older records' bytes
    features["text"] = bytes_feature(listing.text.encode("utf-8"))
  # deterministic: map entries in key order, so the same listing gives the
  # same bytes in every process (the features map is a hash map otherwise).
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString(
      deterministic=True)


def _with_images(
    rows: Iterable[tuple[catalogue_lib.Listing, str | None]],
    image_dir: epath.Path,
    max_side: int,
    num_workers: int,
    modalities: str = "both",
) -> Iterator[tuple[catalogue_lib.Listing, str | None, bytes | None, bool, str | None]]:
  """Yields `(listing, reason, jpeg, reencoded, image_reason)` in catalogue
  order: `reason` skips the row; `image_reason` says why a kept listing
  (modalities "any") has no image.

  Images are checked in worker processes, a bounded number of chunks at a
  time, so memory stays flat however long the catalogue. "spawn" because
  forking a process that has started TensorFlow's threads can deadlock.
  """
  encode = functools.partial(images_lib.encode_many, max_side=max_side)
  pool = contextlib.nullcontext()
  if num_workers > 0:
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context)
  with pool:
    submit = pool.submit if num_workers > 0 else _run_now
    pending = collections.deque()
    rows = iter(rows)
    for chunk in iter(lambda: list(itertools.islice(rows, _ROWS_PER_TASK)), []):
      paths = [image_path(image_dir, listing, reason) for listing, reason in chunk]
      pending.append((chunk, paths, submit(encode, paths)))
      if len(pending) >= _TASKS_IN_FLIGHT_PER_WORKER * max(1, num_workers):
        yield from _merge(*pending.popleft(), modalities)
    while pending:
      yield from _merge(*pending.popleft(), modalities)


def _merge(chunk, paths, future, modalities: str = "both"):
  for (listing, reason), path, result in zip(chunk, paths, future.result()):
    yield (listing, *row_outcome(listing, reason, path, result, modalities))


def image_path(image_dir: epath.Path, listing: catalogue_lib.Listing,
               reason: str | None) -> str | None:
  """The file to read for a row: None for a row already skipped or one that
  names no image."""
  if reason is None and listing.image.strip():
    # os.path.join, not epath's `/`, which costs as much as reading a small
    # photo; the name normalised as `/` would (`./a.jpg`, `a//b.jpg`).
    return os.path.join(os.fspath(image_dir), posixpath.normpath(listing.image))
  return None


def row_outcome(listing: catalogue_lib.Listing, reason: str | None, path: str | None,
                image: tuple[bytes | None, str | None, bool], modalities: str = "both"
                ) -> tuple[str | None, bytes | None, bool, str | None]:
  """One row's fate from its text check (`reason`), the image file it names
  (`image_path`) and what reading it gave (`images.read_and_encode`):
  `(reason, jpeg, reencoded, image_reason)`. `reason` skips the row;
  `image_reason` says why a kept listing (modalities "any") has no image."""
  jpeg, image_reason, reencoded = image
  if reason is None and path is None:  # The row names no image at all.
    image_reason = images_lib.MISSING_IMAGE if modalities == "both" else NO_IMAGE_NAMED
  if modalities == "both" or reason:
    return reason or image_reason, jpeg, reencoded, None
  if not listing.title.strip():
    # An image-only listing needs its image.
    return _neither(image_reason) if image_reason else None, jpeg, reencoded, None
  return None, jpeg, reencoded, image_reason


def product_key(listing: catalogue_lib.Listing, split_by: str = "product") -> str:
  """What decides a listing's split: its group (`split_by="group"`), else its
  product; a listing without a product id is a product of its own."""
  if split_by == "group" and listing.group:
    return f"group:{listing.group}"
  return (f"product:{listing.product_id}" if listing.product_id
          else f"item:{listing.item_id}")


def report_entry(listing: catalogue_lib.Listing, reason: str) -> dict:
  """A row of the skipped or without-image report."""
  return {"row": listing.row,
          "item_id": catalogue_lib.printable_item_id(listing.item_id),
          "reason": reason}


def _neither(image_reason: str) -> str:
  return (NO_TITLE_NO_IMAGE if image_reason == NO_IMAGE_NAMED
          else f"{catalogue_lib.EMPTY_TITLE}, {image_reason}")


def _run_now(function, *args) -> concurrent.futures.Future:
  future = concurrent.futures.Future()
  future.set_result(function(*args))
  return future
