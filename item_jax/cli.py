"""The `item-jax` command line: parses flags and calls the packages, nothing more."""

import argparse
import logging
import os
import sys


def _quiet_tensorflow():
  # TensorFlow only feeds data: keep it off accelerators and quiet.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _demo(args, overrides):
  from item_jax.demo import run_demo
  summary = run_demo(args.workdir, num_products=args.num_products,
                     seed=args.seed, overrides=overrides)
  first, last = summary.get("first_step"), summary.get("last_step")
  print(f"\nITEm demo in {summary['workdir']}")
  if first and last:
    print(f"{'task':<10}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}")
    for task in ("loss", "itm", "mlm", "mim", "gmlm", "gmim"):
      if task in last:
        print(f"{task:<10}{first[task]:>12.4f}{last[task]:>12.4f}")
  print(f"TensorBoard: tensorboard --logdir {summary['train_workdir']}")


def _synth(args):
  from item_jax.data.synth import synthesize
  summary = synthesize(args.output, args.num_products, seed=args.seed,
                       image_size=args.image_size, num_workers=args.workers)
  print(f"wrote {summary['num_listings']} listings of {summary['num_products']} "
        f"products in {summary['num_categories']} categories to "
        f"{summary['paths']['catalogue']}")


def _prepare(args):
  from item_jax.data.catalogue import parse_column_mapping
  from item_jax.data.prepare import prepare
  summary = prepare(
      args.catalogue, args.images, args.output, num_shards=args.num_shards,
      vocab_size=args.vocab_size, tokenizer_model=args.tokenizer,
      columns=parse_column_mapping(args.columns) if args.columns else None,
      seed=args.seed, max_image_side=args.max_image_side,
      num_workers=args.workers)
  counts = {split: info["count"] for split, info in summary["splits"].items()}
  print(f"prepared {counts} listings into {args.output}; skipped rows and "
        f"their reasons are in {args.output}/dataset.json")


def _train(args, overrides):
  import jax
  from item_jax.train.config import load_config, validate
  from item_jax.train.loop import train
  _initialize_distributed(args)
  # A bad config fails here, before any device work.
  config = load_config(args.config, overrides)
  settings = validate(config, jax.device_count(), jax.process_count())
  history = train(settings, args.workdir)
  if history:
    print(f"step {history[-1]['step']}: " + " ".join(
        f"{name}={value:.4f}" for name, value in sorted(history[-1].items())
        if name != "step"))


def _initialize_distributed(args):
  """jax.distributed.initialize() before any other JAX call, when several
  processes run: explicit flags, or what SLURM / a TPU pod provides."""
  import jax
  if args.num_processes and args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="item-jax", description="ITEm image + title embeddings in JAX/Flax.")
  commands = parser.add_subparsers(dest="command", required=True)

  synth = commands.add_parser(
      "synth", help="generate the synthetic catalogue (catalogue.csv + images/)")
  synth.add_argument("--output", required=True)
  synth.add_argument("--num-products", type=int, default=1250)
  synth.add_argument("--seed", type=int, default=0)
  synth.add_argument("--image-size", type=int, default=128)
  synth.add_argument("--workers", type=int, default=None,
                     help="processes (default: all CPU cores)")
  synth.set_defaults(run=_synth)

  prepare = commands.add_parser(
      "prepare", help="catalogue + images -> tokenizer and sharded TFRecords")
  prepare.add_argument("--catalogue", required=True, help="CSV or JSONL file")
  prepare.add_argument("--images", required=True, help="folder of image files")
  prepare.add_argument("--output", required=True)
  prepare.add_argument("--num-shards", type=int, default=8)
  prepare.add_argument("--vocab-size", type=int, default=8000)
  prepare.add_argument("--tokenizer", default=None,
                       help="reuse this sentencepiece .model instead of training one")
  prepare.add_argument("--columns", default=None,
                       help="renames, e.g. item_id=posting_id,product_id=label_group")
  prepare.add_argument("--split-by", choices=["product"], default="product")
  prepare.add_argument("--seed", type=int, default=0)
  prepare.add_argument("--max-image-side", type=int, default=512)
  prepare.add_argument("--workers", type=int, default=None)
  prepare.set_defaults(run=_prepare)

  train = commands.add_parser(
      "train", help="pre-train (or resume) from a config file",
      epilog="Any config field can be overridden: --config.optimizer.learning_rate=3e-4")
  train.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  train.add_argument("--workdir", required=True)
  train.add_argument("--distributed", action="store_true",
                     help="jax.distributed.initialize() from the cluster's environment")
  train.add_argument("--coordinator", default=None, help="host:port of process 0")
  train.add_argument("--num-processes", type=int, default=None)
  train.add_argument("--process-id", type=int, default=None)
  train.set_defaults(run=_train, takes_overrides=True)

  demo = commands.add_parser(
      "demo", help="synthetic catalogue -> prepare -> pre-train the tiny model")
  demo.add_argument("--workdir", default="runs/demo")
  demo.add_argument("--num-products", type=int, default=1250)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(run=_demo, takes_overrides=True)
  return parser


class _DropLibraryChatter(logging.Filter):
  """Orbax logs every save step by step at INFO; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv=None):
  _quiet_tensorflow()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropLibraryChatter())
  argv = sys.argv[1:] if argv is None else list(argv)
  args, unknown = build_parser().parse_known_args(argv)
  if getattr(args, "takes_overrides", False):
    bad = [flag for flag in unknown if not flag.startswith("--config.")]
    if bad:
      build_parser().error(f"unrecognized arguments: {' '.join(bad)}")
    args.run(args, unknown)
  elif unknown:
    build_parser().error(f"unrecognized arguments: {' '.join(unknown)}")
  else:
    args.run(args)


if __name__ == "__main__":
  main()
