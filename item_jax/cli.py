"""The `item-jax` command line: parses flags and calls the packages, nothing more."""

import argparse
import logging
import os
import sys


def _quiet_tensorflow():
  # TensorFlow only feeds data: keep it off accelerators and quiet.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _pretrain_random(args):
  from item_jax.train.random_pretrain import pretrain_random
  report = pretrain_random(args.workdir, steps=args.steps,
                           batch_size=args.batch_size, size=args.size,
                           seed=args.seed)
  print(f"pre-trained '{report['model_size']}' on random listings for "
        f"{report['steps']} steps in {report['seconds']} s: total loss "
        f"{report['first_loss']:.3f} -> {report['last_loss']:.3f}")
  print(f"metrics: {os.path.join(args.workdir, 'metrics.json')}")


def _synth(args):
  from item_jax.data.synth import synthesize
  summary = synthesize(args.output, args.num_products, seed=args.seed,
                       image_size=args.image_size, num_workers=args.workers)
  print(f"wrote {summary['num_listings']} listings of {summary['num_products']} "
        f"products in {summary['num_categories']} categories to "
        f"{summary['paths']['catalogue']}")


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

  random_run = commands.add_parser(
      "pretrain-random",
      help="pre-train a small model on generated random listings (a smoke run)")
  random_run.add_argument("--workdir", required=True)
  random_run.add_argument("--steps", type=int, default=150)
  random_run.add_argument("--batch-size", type=int, default=16)
  random_run.add_argument("--size", default="tiny")
  random_run.add_argument("--seed", type=int, default=0)
  random_run.set_defaults(run=_pretrain_random)
  return parser


def main(argv=None):
  _quiet_tensorflow()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  args.run(args)


if __name__ == "__main__":
  main()
