"""`item-jax synth` and `item-jax prepare`: a catalogue, then the prepared
data (tokenizer and sharded TFRecords) that training reads."""

import argparse
import os

from item_jax.cli.common import at_least, need_file, need_folder, output_folder
from item_jax.errors import UserError


def register(commands):
  synth = commands.add_parser(
      "synth", help="generate the synthetic catalogue (catalogue.csv + images/)")
  synth.add_argument("--output", required=True)
  synth.add_argument("--num-products", type=int, default=1250)
  synth.add_argument("--seed", type=int, default=0)
  synth.add_argument("--image-size", type=int, default=128)
  synth.add_argument("--workers", type=int, default=None,
                     help="processes (default: all CPU cores)")
  synth.add_argument("--group-sizes", type=_group_sizes, default="2-3",
                     help="products per sibling group: MIN-MAX or a comma list "
                     "(default 2-3; e.g. 5-8 for a catalogue where titles decide less)")
  synth.set_defaults(run=_synth)

  prepare = commands.add_parser(
      "prepare", help="catalogue + images -> tokenizer and sharded TFRecords")
  prepare.add_argument("--catalogue", required=True, help="CSV or JSONL file")
  prepare.add_argument("--images", default=None,
                       help="folder the image column's paths are relative to "
                       "(default: the catalogue's folder)")
  prepare.add_argument("--output", required=True)
  prepare.add_argument("--num-shards", type=int, default=8)
  prepare.add_argument("--vocab-size", type=int, default=8000)
  prepare.add_argument("--tokenizer-sample", type=int, default=250_000,
                       help="train the tokenizer on at most this many titles (a "
                       "sample by the hash of the seed and item id)")
  prepare.add_argument("--tokenizer", default=None,
                       help="reuse this tokenizer instead of training one: a "
                       "sentencepiece .model, or a converted checkpoint's "
                       "tokenizer.json / vocab.txt (WordPiece)")
  prepare.add_argument("--columns", default=None,
                       help="renames, e.g. item_id=posting_id,product_id=label_group")
  prepare.add_argument("--split-by", choices=["product", "group"], default="product",
                       help="group: every product of a `group` column value in "
                       "one split (look-alike siblings meet in evaluation)")
  prepare.add_argument("--modalities", choices=["both", "any"], default="both",
                       help="both: a listing needs a title and an image (rows "
                       "lacking one are skipped and named in dataset.json); "
                       "any: keep title-only and image-only listings too")
  prepare.add_argument("--seed", type=int, default=0)
  prepare.add_argument("--max-image-side", type=int, default=512)
  prepare.add_argument("--workers", type=int, default=None)
  prepare.add_argument("--cased", action="store_true",
                       help="keep case in the trained sentencepiece model "
                       "(by default it folds case, like uncased BERT)")
  prepare.add_argument("--text-columns", default="",
                       help="the catalogue's other text columns to keep beside the "
                       "title, comma-separated (e.g. description,brand): each "
                       "record's `text`, read by `eval --lexical-text title+text`")
  prepare.add_argument("--runner", default=None,
                       help="convert on Apache Beam with this runner (pip install "
                       "'item-jax[beam]'): FnApiRunner here (DirectRunner means "
                       "it too), DataflowRunner, FlinkRunner or SparkRunner on a "
                       "cluster (docs/LAUNCH.md); the same dataset as without")
  prepare.add_argument("--beam-options", default=None,
                       help="Beam pipeline options for --runner, without dashes: "
                       "e.g. direct_num_workers=2,direct_running_mode=multi_processing")
  prepare.set_defaults(run=_prepare)


def _group_sizes(text: str) -> tuple[int, ...]:
  from item_jax.data.synth import parse_group_sizes
  try:
    return parse_group_sizes(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def _synth(args):
  at_least(args, num_products=1, seed=0, image_size=32, workers=1)
  output_folder("--output", args.output)
  from item_jax.data.synth import synthesize
  summary = synthesize(args.output, args.num_products, seed=args.seed,
                       image_size=args.image_size, num_workers=args.workers,
                       group_sizes=args.group_sizes)
  print(f"wrote {summary['num_listings']} listings of {summary['num_products']} "
        f"products in {summary['num_categories']} categories to "
        f"{summary['paths']['catalogue']}")


def _prepare(args):
  need_file("--catalogue", args.catalogue)
  if args.images:
    need_folder("--images", args.images)
  if args.tokenizer:
    need_file("--tokenizer", args.tokenizer)
  output_folder("--output", args.output)
  at_least(args, num_shards=1, vocab_size=1, seed=0, max_image_side=1, workers=1,
           tokenizer_sample=1)
  if args.beam_options and not args.runner:
    raise UserError("--beam-options needs --runner (the Beam runner to use)")
  from item_jax.data.catalogue import parse_column_mapping
  columns = parse_column_mapping(args.columns) if args.columns else None
  converter = None
  if args.runner:
    from item_jax.data import beam_prepare  # TensorFlow from here on
    converter = beam_prepare.converter(
        args.runner, beam_prepare.parse_beam_options(args.beam_options))
  from item_jax.data.prepare import prepare  # TensorFlow from here on
  images = args.images or os.path.dirname(os.path.abspath(args.catalogue))
  summary = prepare(
      args.catalogue, images, args.output, num_shards=args.num_shards,
      vocab_size=args.vocab_size, tokenizer_model=args.tokenizer,
      columns=columns,
      seed=args.seed, max_image_side=args.max_image_side,
      num_workers=args.workers, lowercase=not args.cased, split_by=args.split_by,
      modalities=args.modalities, tokenizer_sample=args.tokenizer_sample,
      converter=converter,
      text_columns=tuple(name.strip() for name in args.text_columns.split(",")
                         if name.strip()))
  counts = {split: info["count"] for split, info in summary["splits"].items()}
  kinds = ", ".join(f"{count} {kind.replace('_', ' ')}"
                    for kind, count in summary["listings"].items() if count)
  print(f"prepared {counts} listings ({kinds}) into {args.output}; "
        f"{summary['num_skipped']} rows skipped, with their reasons in "
        f"{args.output}/{summary['reports']['skipped']} (counts in dataset.json)")
