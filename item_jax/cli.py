"""The `item-jax` command line: parses flags and calls the packages, nothing more."""

import argparse
import json
import logging
import os
import pathlib
import sys


def _quiet_tensorflow():
  # TensorFlow only feeds data: keep it off accelerators and quiet.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _demo(args, overrides):
  from item_jax.demo import run_demo
  from item_jax.eval.report import recipes_table
  summary = run_demo(args.workdir, num_products=args.num_products,
                     seed=args.seed, overrides=overrides)
  print(f"\nITEm demo in {summary['workdir']}: the hard synthetic catalogue "
        "(look-alike siblings meet in the test split)")
  for name, recipe in summary["recipes"].items():
    first, last = recipe.get("first_step"), recipe.get("last_step")
    if not (first and last):
      continue
    print(f"\n{name} recipe ({pathlib.Path(recipe['config']).name})")
    print(f"{'task':<10}{'step ' + str(first['step']):>12}{'step ' + str(last['step']):>12}")
    for task in ("loss", "itc", "itm", "mlm", "mim", "gmlm", "gmim"):
      if task in last and task in first:
        print(f"{task:<10}{first[task]:>12.4f}{last[task]:>12.4f}")
  steps = ", ".join(f"{name} at step {report['meta']['step']}"
                    for name, report in summary["reports"].items())
  print(f"\nEvaluation ({steps}; test split; k-NN and probe trained on the "
        "training split)")
  print(recipes_table(summary["reports"], markdown=False))
  for name, recipe in summary["recipes"].items():
    print(f"report ({name}): {recipe['eval'].get('markdown')}")
  print(f"TensorBoard: tensorboard --logdir {summary['workdir']}")


def _group_sizes(text: str) -> tuple[int, ...]:
  from item_jax.data.synth import parse_group_sizes
  try:
    return parse_group_sizes(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def _synth(args):
  from item_jax.data.synth import synthesize
  summary = synthesize(args.output, args.num_products, seed=args.seed,
                       image_size=args.image_size, num_workers=args.workers,
                       group_sizes=args.group_sizes)
  print(f"wrote {summary['num_listings']} listings of {summary['num_products']} "
        f"products in {summary['num_categories']} categories to "
        f"{summary['paths']['catalogue']}")


def _prepare(args):
  from item_jax.data.catalogue import parse_column_mapping
  from item_jax.data.prepare import prepare
  images = args.images or os.path.dirname(os.path.abspath(args.catalogue))
  summary = prepare(
      args.catalogue, images, args.output, num_shards=args.num_shards,
      vocab_size=args.vocab_size, tokenizer_model=args.tokenizer,
      columns=parse_column_mapping(args.columns) if args.columns else None,
      seed=args.seed, max_image_side=args.max_image_side,
      num_workers=args.workers, lowercase=not args.cased, split_by=args.split_by,
      modalities=args.modalities)
  counts = {split: info["count"] for split, info in summary["splits"].items()}
  kinds = ", ".join(f"{count} {kind.replace('_', ' ')}"
                    for kind, count in summary["listings"].items() if count)
  print(f"prepared {counts} listings ({kinds}) into {args.output}; skipped "
        f"rows and their reasons are in {args.output}/dataset.json")


def _train(args, overrides):
  import jax
  from item_jax.eval.evaluate import PeriodicRetrieval
  from item_jax.train.config import load_config, validate
  from item_jax.train.loop import train
  _initialize_distributed(args)
  # A bad config fails here, before any device work.
  config = load_config(args.config, overrides)
  settings = validate(config, jax.device_count(), jax.process_count())
  # Retrieval on a validation subset every config.eval_every_steps (0: never).
  history = train(settings, args.workdir, evaluator=PeriodicRetrieval)
  if history:
    print(f"step {history[-1]['step']}: " + " ".join(
        f"{name}={value:.4f}" for name, value in sorted(history[-1].items())
        if name != "step"))


def _compile(args, overrides):
  # Compiling reads no data and runs nothing: local accelerators are not needed.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from item_jax.launch import compile as compile_lib
  compile_lib.simulate_cpu_devices(args.topology)
  from item_jax.train.config import load_config
  try:
    target = compile_lib.parse_target(args.topology, args.hbm_gib)
    report = compile_lib.compile_train_step(load_config(args.config, overrides),
                                            target, args.vocab_size)
  except compile_lib.DoesNotFitError as error:
    sys.exit(f"does not fit: {error}")
  except ValueError as error:  # a bad topology or config: no traceback
    sys.exit(f"item-jax compile: {error}")
  print(json.dumps(report, indent=2) if args.json
        else compile_lib.format_report(report))


def _embed(args):
  from item_jax.eval.embed import embed_command
  _initialize_distributed(args)
  summary = embed_command(args.workdir, args.data, args.split, args.output,
                          step=args.step, view=args.modality,
                          batch_size=args.batch_size)
  print(f"embedded {summary['count']} {args.split} listings ({args.modality}, "
        f"dim {summary['dim']}, step {summary['step']}): "
        f"{' '.join(summary['paths'])}")


def _eval(args):
  from item_jax.eval.evaluate import BASELINES, EvalOptions
  from item_jax.eval.report import (compare_table, eval_command, headline_table,
                                    unavailable_lines)
  baselines = BASELINES if args.baselines == "all" else tuple(
      name.strip() for name in args.baselines.split(",") if name.strip())
  # A bad value fails here, before any model is loaded.
  options = EvalOptions(step=args.step, batch_size=args.batch_size,
                        knn_k=args.knn_k, probe_steps=args.probe_steps,
                        max_train_examples=args.max_train_examples,
                        baselines=baselines)
  _initialize_distributed(args)
  report, paths, compared = eval_command(args.workdir, args.data, args.compare,
                                         options)
  print(headline_table(report, markdown=False))
  for line in unavailable_lines(report):
    print(line)
  if compared:
    print("\n" + compare_table(compared, markdown=False))
  if paths:
    print(f"report: {paths['markdown']}")


def _convert(args, overrides):
  from item_jax.convert import commands
  config = None
  if getattr(args, "config", None):
    from item_jax.train.config import load_config
    config = load_config(args.config, overrides)
  elif overrides:
    sys.exit("--config.* overrides need --config FILE[:ARG]")
  if args.layout == "hf-bert":
    commands.hf_bert_to_workdir(args.checkpoint, args.workdir, args.image_size,
                                args.patch_size, config)
  elif args.layout == "hf-vit":
    commands.hf_vit_into_workdir(args.checkpoint, args.workdir)
  elif args.layout == "torch":
    if (args.checkpoint is None) == (args.output is None):
      sys.exit("convert torch: give CHECKPOINT (torch -> --workdir) or "
               "--output (--workdir -> torch), not both")
    if args.output:
      commands.workdir_to_torch(args.workdir, args.output, args.step)
    else:
      commands.torch_to_workdir(args.checkpoint, args.workdir, config)
  elif args.layout == "export":
    commands.export(args.workdir, args.output, args.step, args.tokenizer,
                    args.format)
  elif args.layout == "import":
    commands.import_export(args.checkpoint, args.workdir, config)
  else:
    commands.reshard(args.workdir, args.output, args.mesh, args.num_devices,
                     args.step)


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
  prepare.set_defaults(run=_prepare)

  train = commands.add_parser(
      "train", help="pre-train (or resume) from a config file",
      epilog="Any config field can be overridden: --config.optimizer.learning_rate=3e-4")
  train.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  train.add_argument("--workdir", required=True)
  _add_distributed_flags(train)
  train.set_defaults(run=_train, takes_overrides=True)

  compile_step = commands.add_parser(
      "compile", help="compile the train step ahead of time for a TPU slice: "
      "memory per chip, FLOPs, collectives",
      epilog="Any config field can be overridden: --config.mesh.fsdp=16")
  compile_step.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  compile_step.add_argument("--topology", required=True,
                            help="v4-32, v5e-256, v5p-256, v6e-64, ... or cpu-N "
                            "(N simulated CPU devices)")
  compile_step.add_argument("--vocab-size", type=int, default=32000,
                            help="the tokenizer's size (no data is read)")
  compile_step.add_argument("--hbm-gib", type=float, default=None,
                            help="memory per device to fit in (default: the "
                            "TPU chip's HBM; none for cpu-N)")
  compile_step.add_argument("--json", action="store_true",
                            help="print the report as JSON")
  compile_step.set_defaults(run=_compile, takes_overrides=True)

  embed = commands.add_parser(
      "embed", help="embeddings of every listing of a split from a checkpoint")
  embed.add_argument("--workdir", required=True, help="a training workdir")
  embed.add_argument("--data", required=True, help="a `prepare` output folder")
  embed.add_argument("--split", default="test")
  embed.add_argument("--output", required=True,
                     help="writes OUTPUT.npy and OUTPUT.ids.json")
  embed.add_argument("--step", type=int, default=None,
                     help="checkpoint step (default: the latest)")
  embed.add_argument("--modality", choices=["both", "title", "image"],
                     default="both")
  embed.add_argument("--batch-size", type=int, default=None,
                     help="global batch (default: 64 per batch shard)")
  _add_distributed_flags(embed)
  embed.set_defaults(run=_embed)

  evaluate = commands.add_parser(
      "eval", help="retrieval, category prediction and baselines -> "
      "WORKDIR/eval/report.{json,md}")
  evaluate.add_argument("--workdir", required=True, help="a training workdir")
  evaluate.add_argument("--data", required=True, help="a `prepare` output folder")
  evaluate.add_argument("--compare", nargs="*", default=[], metavar="WORKDIR",
                        help="other workdirs (ablations) for a side-by-side table")
  evaluate.add_argument("--step", type=int, default=None)
  evaluate.add_argument("--batch-size", type=int, default=None)
  evaluate.add_argument("--knn-k", type=int, default=10)
  evaluate.add_argument("--probe-steps", type=int, default=300,
                        help="the linear probe's L-BFGS iterations at most")
  evaluate.add_argument("--baselines", default="all",
                        help="comma-separated subset of tfidf, minilm, "
                        "image_baseline, mobilenet, random_init (default all; "
                        "minilm and mobilenet need their wheels installed)")
  evaluate.add_argument("--max-train-examples", type=int, default=None,
                        help="cap the training listings used as the k-NN "
                        "index and the probe's training set")
  _add_distributed_flags(evaluate)
  evaluate.set_defaults(run=_eval)

  _add_convert_parser(commands)

  demo = commands.add_parser(
      "demo", help="hard synthetic catalogue -> prepare -> pre-train the tiny "
      "model (recommended recipe and the paper's) -> evaluate against baselines",
      epilog="--config.* overrides apply to both recipes")
  demo.add_argument("--workdir", default="runs/demo")
  demo.add_argument("--num-products", type=int, default=1250)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(run=_demo, takes_overrides=True)
  return parser


def _add_convert_parser(commands):
  convert = commands.add_parser(
      "convert", help="checkpoint conversion: Hugging Face BERT/ViT, the torch "
      "reference, serving exports, resharding")
  layouts = convert.add_subparsers(dest="layout", required=True)
  config_help = "train config FILE[:ARG] for the written run (default: the defaults)"

  def layout(name, help_text, checkpoint=None, config=False):
    sub = layouts.add_parser(name, help=help_text)
    if checkpoint:
      sub.add_argument("checkpoint", nargs="?" if name == "torch" else None,
                       help=checkpoint)
    sub.add_argument("--workdir", required=True, help="an item-jax work directory")
    if config:
      sub.add_argument("--config", default=None, help=config_help)
    sub.set_defaults(run=_convert, takes_overrides=True)
    return sub

  bert = layout("hf-bert", "BERT text side -> step 0 of a pre-training run",
                "a Hugging Face BERT folder (config.json, model.safetensors or "
                "pytorch_model.bin, vocab.txt)", config=True)
  bert.add_argument("--image-size", type=int, default=224)
  bert.add_argument("--patch-size", type=int, default=16)
  layout("hf-vit", "ViT patch embedding + image positions -> a converted "
         "workdir's image side", "a Hugging Face ViT folder")
  torch = layout("torch", "the torch reference <-> item-jax",
                 "a torch reference folder (model.safetensors + config.json) "
                 "to read into --workdir", config=True)
  torch.add_argument("--output", default=None,
                     help="write --workdir's checkpoint here in torch layout instead")
  torch.add_argument("--step", type=int, default=None)
  export = layout("export", "a checkpoint -> model.safetensors + config.json "
                  "(+ tokenizer) for serving")
  export.add_argument("--output", required=True)
  export.add_argument("--step", type=int, default=None, help="default: the latest")
  export.add_argument("--tokenizer", default=None,
                      help="default: the workdir's, or its data.dir's")
  export.add_argument("--format", choices=["item-jax", "hf-bert"], default="item-jax")
  layout("import", "an export -> step 0 of a run in --workdir",
         "an `export` output folder", config=True)
  reshard = layout("reshard", "restore a checkpoint onto another mesh and save it")
  reshard.add_argument("--output", required=True, help="the new work directory")
  reshard.add_argument("--mesh", required=True, help="e.g. data=2,fsdp=4,model=1")
  reshard.add_argument("--num-devices", type=int, default=None,
                       help="use the first N devices (default: all)")
  reshard.add_argument("--step", type=int, default=None)


def _add_distributed_flags(parser):
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() from the cluster's environment")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)


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
