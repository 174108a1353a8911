"""`prepare` on Apache Beam: the same dataset as the local converter, from
many workers (`item-jax prepare ... --runner NAME --beam-options k=v,...`).

The catalogue is cut into blocks of consecutive rows (`catalogue.blocks`, one
pass over the file that keeps one entry a block); every other step runs per
block on the workers, calling the per-row functions the local converter
calls (`catalogue.read_catalogue`'s checks, `images.read_and_encode`,
`prepare.row_outcome`, `split_of_product`, `make_example`). One pipeline:

1. Duplicates: every row that claims an item id gives (id, row); a group by
   id names the rows after the first (the first row wins, as locally), and
   a group by block hands each block its own.
2. Each block is converted: its rows checked, its photos read and
   re-encoded, each kept listing's split and kind decided; the block's
   listings go to a scratch file, its reports' rows to report pieces, and
   its counts, categories (in order of first row) and title sample to a
   small summary.
3. Every block's counts, in catalogue order, give where each block's
   listings start in each split (the record `index`, so the shard) and the
   category ids (a side input, so it waits for every block).
4. Each block writes its records into per-shard pieces; each shard joins
   its pieces in block order into the shard file and its offsets.

Then this process joins the reports, merges the title samples for the
tokenizer and hands `prepare` the Conversion it writes dataset.json from.
Only (item id, row) pairs and block counts pass through the runner;
records and photos go through files under `_beam/` in the output folder
(shared storage, e.g. gs://, on a cluster). The output does not depend on
the number of workers or the order they finish in. dataset.json is written
by `prepare` after the pipeline: an interrupted run leaves none.
"""

import collections
from collections.abc import Iterator
import dataclasses
import json
import logging

from etils import epath
import numpy as np
import tensorflow as tf

from item_jax.data import catalogue as catalogue_lib
from item_jax.data import images as images_lib
from item_jax.data import prepare as prepare_lib
from item_jax.data import tokenizer as tokenizer_lib
from item_jax.errors import UserError

# Rows per block: the unit of work. Big enough that per-element overheads
# vanish, small enough that one block's photos fit a worker's memory.
RECORDS_PER_BLOCK = 2000
SCRATCH = "_beam"
# Runners that run here without fetching anything: Beam's DirectRunner would
# first try to download its Prism binary, so it means the FnApiRunner too.
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner")

_log = logging.getLogger(__name__)

def parse_beam_options(text: str | None) -> dict[str, str | None]:
  """`direct_num_workers=2,save_main_session` → a dict (None: an on/off flag
  given bare)."""
  options = {}
  for entry in filter(None, (part.strip() for part in (text or "").split(","))):
    key, separator, value = (side.strip() for side in entry.partition("="))
    if not key or (separator and not value):
      raise UserError(f"--beam-options entry {entry!r} is not of the form "
                      "key=value (or a bare flag)")
    options[key] = value if separator else None
  return options


def converter(runner: str, beam_options: dict[str, str] | None = None,
              records_per_block: int = RECORDS_PER_BLOCK) -> prepare_lib.Converter:
  """A `prepare` converter that runs on Beam's `runner` (a runner name, e.g.
  DataflowRunner, FlinkRunner, SparkRunner; "FnApiRunner" or "DirectRunner"
  run here) with `beam_options` (Beam's pipeline options, without dashes)."""
  try:
    import apache_beam  # noqa: F401
  except ImportError:
    raise UserError("--runner needs Apache Beam: pip install 'item-jax[beam]'") from None
  if records_per_block < 1:
    raise UserError(f"records_per_block must be at least 1, got {records_per_block}")
  beam_options = dict(beam_options or {})
  _pipeline_options(runner, beam_options)  # bad options fail before any work

  def convert(catalogue: str, images: epath.Path, output_dir: epath.Path,
              options: prepare_lib.Options) -> prepare_lib.Conversion:
    return _convert(catalogue, images, output_dir, options, runner, beam_options,
                    records_per_block)
  return convert


def _pipeline_options(runner: str, beam_options: dict[str, str]):
  from apache_beam.options.pipeline_options import PipelineOptions
  flags = [f"--{key}" if value is None else f"--{key}={value}"
           for key, value in beam_options.items()]
  if runner not in LOCAL_RUNNERS:
    flags.append(f"--runner={runner}")
  try:
    options = PipelineOptions(flags)
    options.get_all_options()  # parses them: a bad value exits argparse
  except SystemExit:
    raise UserError(f"Beam rejected the pipeline options {flags}") from None
  unknown = [flag for flag in flags
             if flag.split("=")[0].lstrip("-") not in options.get_all_options()]
  if unknown:
    raise UserError(f"unknown Beam pipeline options: {unknown}")
  return options


def _run(runner: str, beam_options: dict[str, str], build) -> None:
  import apache_beam as beam
  options = _pipeline_options(runner, beam_options)
  if runner in LOCAL_RUNNERS:
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    pipeline = beam.Pipeline(runner=FnApiRunner(), options=options)
  else:
    pipeline = beam.Pipeline(options=options)
  build(pipeline)
  pipeline.run().wait_until_finish()


def _convert(catalogue: str, images: epath.Path, output_dir: epath.Path,
             options: prepare_lib.Options, runner: str, beam_options: dict[str, str],
             records_per_block: int) -> prepare_lib.Conversion:
  import apache_beam as beam
  # The one pass over the file; it checks the columns before any output exists.
  blocks = catalogue_lib.blocks(catalogue, records_per_block, options.columns,
                                options.require(), options.modalities,
                                options.text_columns)
  _log.info("prepare (beam, %s): %d blocks of up to %d rows", runner, len(blocks),
            records_per_block)
  prepare_lib.open_output(output_dir)
  scratch = output_dir / SCRATCH
  if scratch.exists():
    scratch.rmtree()  # what an interrupted run left
  scratch.mkdir()
  job = _Job(catalogue, str(images), str(scratch), options)

  def build(pipeline):
    spread = pipeline | "blocks" >> beam.Create(blocks) | "spread" >> beam.Reshuffle()
    # Each block gets the rows of its own that repeat an earlier item id.
    duplicates = (spread
                  | "claims" >> beam.FlatMap(job.claims)
                  | "by id" >> beam.GroupByKey()
                  | "later rows" >> beam.FlatMap(_later_rows))
    counts = ({"block": spread | "by index" >> beam.Map(lambda block: (block.index, block)),
               "duplicates": duplicates}
              | "with duplicates" >> beam.CoGroupByKey()
              | "convert" >> beam.Map(
                  lambda joined: job.convert_block(joined[1]["block"][0],
                                                   joined[1]["duplicates"])))
    # The side input waits for every block's conversion before any piece.
    layout = (counts
              | "all counts" >> beam.combiners.ToList()
              | "layout" >> beam.Map(_layout, options.num_shards))
    _ = (spread
         | "pieces" >> beam.FlatMap(job.write_pieces,
                                    layout=beam.pvalue.AsSingleton(layout))
         | "by shard" >> beam.GroupByKey()
         | "join" >> beam.Map(job.join_shard, output_dir=str(output_dir)))
  _run(runner, beam_options, build)

  conversion = _conversion(len(blocks), scratch, output_dir, options)
  scratch.rmtree()
  return conversion


def _later_rows(claim: tuple) -> Iterator[tuple[int, int]]:
  """(block, row) of each row after the first that claims one item id."""
  _, rows = claim
  for row, block in sorted(rows)[1:]:
    yield block, row


def _scratch_name(block: int) -> str:
  """A block's kept listings between conversion and pieces: each a length
  (8 bytes, little-endian), its split (1 byte: its place in SPLITS) and its
  record with number 0 and category id -1 (`make_example`)."""
  return f"blocks/{block:08d}.records"


def _read_scratch(path: epath.Path) -> Iterator[bytes]:
  data = path.read_bytes()
  position = 0
  while position < len(data):
    length = int.from_bytes(data[position:position + 8], "little")
    yield data[position + 8:position + 8 + length]
    position += 8 + length


def _counts(block: int, summary: dict) -> dict:
  """What numbering the records needs of a block's summary."""
  return {"block": block, "kept": summary["kept"], "categories": summary["categories"]}


def _summary_name(block: int) -> str:
  return f"summaries/{block:08d}.json"


def _report_piece(name: str, block: int) -> str:
  return f"reports/{name}/{block:08d}.jsonl"


@dataclasses.dataclass(frozen=True)
class _Job:
  """What every worker needs to know; its methods are the pipelines' steps."""

  catalogue: str
  images: str
  scratch: str
  options: prepare_lib.Options

  def _rows(self, block: catalogue_lib.Block, duplicate_rows=frozenset()):
    return catalogue_lib.read_catalogue(
        self.catalogue, self.options.columns, require=self.options.require(),
        modalities=self.options.modalities, block=block,
        duplicate_rows=duplicate_rows, text_columns=self.options.text_columns)

  def claims(self, block: catalogue_lib.Block
             ) -> Iterator[tuple[str, tuple[int, int]]]:
    """(item id, (row, block)) of each row that claims its item id."""
    for listing, _ in self._rows(block):
      if catalogue_lib.claims_item_id(listing):
        yield listing.item_id, (listing.row, block.index)

  def convert_block(self, block: catalogue_lib.Block, duplicates: list[int]) -> dict:
    """Converts one block (see the module docstring); returns its counts."""
    options, scratch = self.options, epath.Path(self.scratch)
    duplicate_rows = frozenset(duplicates)
    titles = tokenizer_lib.TitleSample(options.tokenizer_sample, options.seed)
    kept = {split: 0 for split in prepare_lib.SPLITS}
    kinds = {split: dict.fromkeys(prepare_lib.LISTING_KINDS, 0)
             for split in prepare_lib.SPLITS}
    categories, num_reencoded = {}, 0
    reports = {}
    for name in prepare_lib.REPORT_FILES:
      piece = scratch / _report_piece(name, block.index)
      piece.parent.mkdir(parents=True, exist_ok=True)
      reports[name] = prepare_lib.Report(piece)
    path = scratch / _scratch_name(block.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as writer:
      for listing, reason in self._rows(block, duplicate_rows):
        image_path = prepare_lib.image_path(epath.Path(self.images), listing, reason)
        image = images_lib.read_and_encode(image_path, options.max_image_side)
        reason, jpeg, reencoded, image_reason = prepare_lib.row_outcome(
            listing, reason, image_path, image, options.modalities)
        if reason:
          reports["skipped"].add(prepare_lib.report_entry(listing, reason))
          continue
        if listing.category:
          categories.setdefault(listing.category, listing.row)
        kind = prepare_lib.listing_kind(listing, jpeg)
        split = prepare_lib.split_of_product(
            prepare_lib.product_key(listing, options.split_by), options.seed,
            options.split_fractions)
        kept[split] += 1
        kinds[split][kind] += 1
        if image_reason:
          reports["without_image"].add(prepare_lib.report_entry(listing, image_reason),
                                       listed=image_reason != prepare_lib.NO_IMAGE_NAMED)
        if kind != "image_only":
          titles.add(listing.row, listing.item_id, listing.title)
        num_reencoded += reencoded
        # The record as written, but for its number and category id.
        record = bytes([prepare_lib.SPLITS.index(split)]) + prepare_lib.make_example(
            listing, jpeg, -1, 0)
        writer.write(len(record).to_bytes(8, "little") + record)
    for report in reports.values():
      report.close()
    summary = {
        "kept": kept, "kinds": kinds,
        "skipped_reasons": dict(reports["skipped"].reasons),
        "images_dropped": dict(reports["without_image"].reasons),
        "listed": {name: report.count for name, report in reports.items()},
        "categories": list(categories), "num_reencoded": num_reencoded,
        "titles_seen": titles.seen,
        # This block's part of the tokenizer's sample: [key, row, title].
        "titles": titles.entries(),
    }
    target = scratch / _summary_name(block.index)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, ensure_ascii=False))
    return _counts(block.index, summary)

  def write_pieces(self, block: catalogue_lib.Block, layout: dict
                   ) -> Iterator[tuple[tuple[str, int], tuple[int, str, int]]]:
    """Block `block`'s records, numbered and dealt to their shards as in
    the local converter, into one piece per shard they reach."""
    scratch, num_shards = epath.Path(self.scratch), self.options.num_shards
    block = block.index
    next_index = {split: layout["starts"][split][block] for split in prepare_lib.SPLITS}
    writers = {}
    category_ids = layout["category_ids"]
    for entry in _read_scratch(scratch / _scratch_name(block)):
      split = prepare_lib.SPLITS[entry[0]]
      index = next_index[split]
      next_index[split] += 1
      shard = index % num_shards
      if (split, shard) not in writers:
        piece = scratch / f"pieces/{split}-{shard:05d}/{block:08d}.tfrecord"
        piece.parent.mkdir(parents=True, exist_ok=True)
        writers[split, shard] = prepare_lib.ShardWriter(piece)
      # Parsed, numbered, serialised as `make_example` does: the same bytes.
      example = tf.train.Example.FromString(entry[1:])
      feature = example.features.feature
      category = feature["category"].bytes_list.value[0].decode("utf-8")
      feature["category_id"].int64_list.value[0] = category_ids.get(category, -1)
      feature["index"].int64_list.value[0] = index
      writers[split, shard].write(example.SerializeToString(deterministic=True))
    for (split, shard), piece in writers.items():
      piece.close()
      yield (split, shard), (block, piece.path, piece.size)

  def join_shard(self, shard_pieces: tuple, output_dir: str) -> None:
    """A shard file from its pieces in block order, with its offsets."""
    (split, shard), pieces = shard_pieces
    name = prepare_lib.shard_file_name(split, shard, self.options.num_shards)
    output = epath.Path(output_dir)
    offsets, position = [], 0
    with (output / name).open("wb") as target:
      for _, path, size in sorted(pieces):
        target.write(epath.Path(path).read_bytes())
        with epath.Path(prepare_lib.offsets_file_name(path)).open("rb") as file:
          piece_offsets = np.load(file)
        piece_offsets[:, 0] += position
        offsets.append(piece_offsets)
        position += size
    with (output / prepare_lib.offsets_file_name(name)).open("wb") as file:
      np.save(file, np.concatenate(offsets).astype(np.int64))


def _layout(counts: list[dict], num_shards: int) -> dict:
  """Where each block's listings start in each split, and the category ids
  (in order of first kept row), from every block's counts (`_counts`)."""
  counts = sorted(counts, key=lambda block: block["block"])
  starts = {split: [] for split in prepare_lib.SPLITS}
  totals = dict.fromkeys(prepare_lib.SPLITS, 0)
  category_ids = {}
  for block in counts:
    for split in prepare_lib.SPLITS:
      starts[split].append(totals[split])
      totals[split] += block["kept"][split]
    for category in block["categories"]:
      category_ids.setdefault(category, len(category_ids))
  return {"starts": starts, "totals": totals, "category_ids": category_ids,
          "num_shards": num_shards}


def _conversion(num_blocks: int, scratch: epath.Path, output_dir: epath.Path,
                options: prepare_lib.Options) -> prepare_lib.Conversion:
  """The Conversion `prepare` writes dataset.json from, as the local
  converter returns it, from the block summaries read one at a time in
  catalogue order; joins the report pieces and writes empty shards."""
  counts, titles = [], tokenizer_lib.TitleSample(options.tokenizer_sample, options.seed)
  kinds = {split: dict.fromkeys(prepare_lib.LISTING_KINDS, 0) for split in prepare_lib.SPLITS}
  skipped_reasons, images_dropped = collections.Counter(), collections.Counter()
  totals = collections.Counter()
  for index in range(num_blocks):
    summary = json.loads((scratch / _summary_name(index)).read_text())
    counts.append(_counts(index, summary))
    titles.merge(summary["titles"], summary["titles_seen"])
    for split in prepare_lib.SPLITS:
      for kind, value in summary["kinds"][split].items():
        kinds[split][kind] += value
    skipped_reasons.update(summary["skipped_reasons"])
    images_dropped.update(summary["images_dropped"])
    totals.update({"num_reencoded": summary["num_reencoded"], **summary["listed"]})
  layout = _layout(counts, options.num_shards)
  num_shards = options.num_shards
  splits = {}
  for split in prepare_lib.SPLITS:
    count = layout["totals"][split]
    files = [prepare_lib.shard_file_name(split, shard, num_shards)
             for shard in range(num_shards)]
    for shard, name in enumerate(files):
      if shard >= count:  # no record reached it: empty, whatever was there
        prepare_lib.ShardWriter(output_dir / name).close()
    splits[split] = {
        "count": count, "num_shards": num_shards, "files": files,
        "offsets_files": [prepare_lib.offsets_file_name(name) for name in files],
        "shard_counts": [(count - shard + num_shards - 1) // num_shards
                         for shard in range(num_shards)],
        "listings": kinds[split],
    }
  first = {}
  for name, file_name in prepare_lib.REPORT_FILES.items():
    first[name] = []
    with (output_dir / file_name).open("w") as target:
      for index in range(num_blocks):
        text = (scratch / _report_piece(name, index)).read_text()
        target.write(text)
        # "\n" only: splitlines() also splits at U+2028 and the like, which
        # json.dumps(ensure_ascii=False) leaves inside a string.
        for line in text.split("\n")[:-1]:
          if len(first[name]) == prepare_lib.REPORTED_ROWS:
            break
          first[name].append(json.loads(line))
  return prepare_lib.Conversion(
      splits=splits,
      categories=list(layout["category_ids"]),
      titles=titles,
      skipped=first["skipped"],
      skipped_reasons=dict(skipped_reasons),
      num_skipped=totals["skipped"],
      num_reencoded=totals["num_reencoded"],
      kinds={kind: sum(kinds[split][kind] for split in prepare_lib.SPLITS)
             for kind in prepare_lib.LISTING_KINDS},
      without_image=first["without_image"],
      num_without_image=totals["without_image"],
      images_dropped=dict(images_dropped),
  )
