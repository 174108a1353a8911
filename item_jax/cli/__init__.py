"""The `item-jax` command line: parses flags and calls the packages, nothing more.

A mistake in what was asked (`item_jax.errors.UserError`: a missing input, a
bad flag or config value, a work directory without a run) ends in one line,
`item-jax COMMAND: error: MESSAGE`, and exit status 2; `--debug` (or
ITEM_JAX_DEBUG=1) shows its traceback instead. Any other error is a bug and
shows its traceback.
"""

import argparse
import glob
import importlib.util
import json
import logging
import os
import pathlib
import sys

from item_jax.errors import MissingInputError, UserError, no_prepared_data, no_training_run

DEBUG_ENV = "ITEM_JAX_DEBUG"

# Set by a person (or a TPU VM's image) to use a TPU. Not TPU_SKIP_MDS_QUERY
# nor TPU_LIBRARY_PATH: JAX and libtpu set those on import, TPU or not.
_TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_NAME",
            "TPU_VISIBLE_CHIPS", "TPU_PROCESS_BOUNDS",
            "TPU_CHIPS_PER_PROCESS_BOUNDS", "JAX_FORCE_TPU_INIT")
# Google's PCI vendor id and its TPU device ids (as jax._src.hardware_utils).
_TPU_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f",
                    "0x0076")
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # as JAX looks


def _quiet_tensorflow():
  # TensorFlow only feeds data: keep it off accelerators and quiet.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tpu_present(environ=None) -> bool:
  """Whether this machine has a TPU (its device files or PCI ids), or the
  environment says to use one."""
  environ = os.environ if environ is None else environ
  if any(environ.get(name) for name in _TPU_ENV):
    return True
  if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as file:
        if file.read().strip() != _TPU_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), "device")) as file:
        if file.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def _hidden_devices(*variables) -> bool:
  """A device list such as CUDA_VISIBLE_DEVICES set to none ("" or -1)."""
  return any(os.environ[name] in ("", "-1") for name in variables if name in os.environ)


def non_tpu_platforms() -> str | None:
  """JAX_PLATFORMS without the TPU: the GPU backends whose plugin is installed
  and whose devices are there, then cpu. None (let JAX choose) where another
  plugin is installed, whose platform name is not known here."""
  if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    return None
  names = set()
  try:  # the plugins JAX would load: jax_plugins.* modules and entry points
    import pkgutil
    from importlib.metadata import entry_points
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
      names.update(module.name for module in
                   pkgutil.iter_modules(spec.submodule_search_locations))
    names.update(f"{point.name} {point.value}"
                 for point in entry_points(group="jax_plugins"))
  except Exception:  # a broken plugin install: JAX reports it itself
    return None
  platforms = []
  for name in names:
    if "tpu" in name:
      continue
    if "cuda" in name:
      if (any(os.path.exists(device) for device in _NVIDIA_DEVICES)
          and not _hidden_devices("CUDA_VISIBLE_DEVICES")):
        platforms.append("cuda")
    elif "rocm" in name:
      if os.path.exists("/dev/kfd") and not _hidden_devices("HIP_VISIBLE_DEVICES",
                                                            "ROCR_VISIBLE_DEVICES"):
        platforms.append("rocm")
    else:
      return None
  return ",".join(sorted(set(platforms)) + ["cpu"])


def _skip_absent_tpu():
  """With libtpu installed (the `compile` extra), JAX's first device query
  tries the TPU and prints lines about its accelerator type and worker
  hostnames on machines without one. There, JAX_PLATFORMS names the others;
  a JAX_PLATFORMS already set (even empty: JAX's own choice) is kept."""
  if ("JAX_PLATFORMS" in os.environ or "JAX_PLATFORM_NAME" in os.environ
      or "jax" in sys.modules or tpu_present()):
    return
  platforms = non_tpu_platforms()
  if platforms:
    os.environ["JAX_PLATFORMS"] = platforms


def _debug_from_environment() -> bool:
  return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _is_local(path) -> bool:
  return "://" not in str(path)


def _need_file(flag: str, path: str) -> None:
  """A file named on the command line must be there (local paths; gs:// and
  other URLs are left to the code that reads them)."""
  if not _is_local(path):
    return
  if os.path.isdir(path):
    raise UserError(f"{flag} {path} is a folder; expected a file")
  if not os.path.isfile(path):
    raise MissingInputError(f"{flag} {path}: no such file")
  if not os.access(path, os.R_OK):
    raise MissingInputError(f"{flag} {path}: not readable (permissions)")


def _need_folder(flag: str, path: str) -> None:
  if not _is_local(path):
    return
  if os.path.isfile(path):
    raise UserError(f"{flag} {path} is a file; expected a folder")
  if not os.path.isdir(path):
    raise MissingInputError(f"{flag} {path}: no such folder")


def _output_folder(flag: str, path: str) -> None:
  if _is_local(path) and os.path.isfile(path):
    raise UserError(f"{flag} {path} is a file; expected a folder (it is "
                    "created if missing)")


def _need_run(flag: str, workdir: str) -> None:
  """`workdir` holds a training run: its config.json."""
  if _is_local(workdir) and not os.path.isfile(os.path.join(workdir, "config.json")):
    raise MissingInputError(f"{flag}: {no_training_run(workdir)}")


def _need_prepared(flag: str, data_dir: str, splits=(), split_flag=None) -> None:
  """`data_dir` is a `prepare` output folder with `splits`."""
  if not _is_local(data_dir):
    return
  info_file = os.path.join(data_dir, "dataset.json")
  if not os.path.isfile(info_file):
    raise MissingInputError(f"{flag}: {no_prepared_data(data_dir)}")
  try:
    with open(info_file) as file:
      present = sorted(json.load(file).get("splits", {}))
  except (OSError, ValueError, AttributeError) as error:
    raise UserError(f"{flag}: {info_file} is not readable: {error}") from error
  for split in splits:
    if split not in present:
      where = f"{split_flag} {split}" if split_flag else f"{flag} {data_dir}"
      raise UserError(f"{where}: {data_dir} has no {split!r} split; it has "
                      f"{', '.join(present)}")


def _at_least(args, **minimums) -> None:
  """Each named flag that was given is at least its minimum."""
  for dest, minimum in minimums.items():
    value = getattr(args, dest, None)
    if value is not None and value < minimum:
      raise UserError(f"--{dest.replace('_', '-')} {value}: must be at least {minimum}")


def _demo(args, overrides):
  _at_least(args, num_products=1, seed=0)
  _output_folder("--workdir", args.workdir)
  from item_jax.demo import RECIPES, run_demo
  from item_jax.eval.report import recipes_table
  from item_jax.train.config import load_config
  for _, config_file, _ in RECIPES:  # a bad --config.* fails now, not after prepare
    load_config(str(config_file), overrides)
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
  _at_least(args, num_products=1, seed=0, image_size=32, workers=1)
  _output_folder("--output", args.output)
  from item_jax.data.synth import synthesize
  summary = synthesize(args.output, args.num_products, seed=args.seed,
                       image_size=args.image_size, num_workers=args.workers,
                       group_sizes=args.group_sizes)
  print(f"wrote {summary['num_listings']} listings of {summary['num_products']} "
        f"products in {summary['num_categories']} categories to "
        f"{summary['paths']['catalogue']}")


def _prepare(args):
  _need_file("--catalogue", args.catalogue)
  if args.images:
    _need_folder("--images", args.images)
  if args.tokenizer:
    _need_file("--tokenizer", args.tokenizer)
  _output_folder("--output", args.output)
  _at_least(args, num_shards=1, vocab_size=1, seed=0, max_image_side=1, workers=1)
  from item_jax.data.catalogue import parse_column_mapping
  columns = parse_column_mapping(args.columns) if args.columns else None
  from item_jax.data.prepare import prepare  # TensorFlow from here on
  images = args.images or os.path.dirname(os.path.abspath(args.catalogue))
  summary = prepare(
      args.catalogue, images, args.output, num_shards=args.num_shards,
      vocab_size=args.vocab_size, tokenizer_model=args.tokenizer,
      columns=columns,
      seed=args.seed, max_image_side=args.max_image_side,
      num_workers=args.workers, lowercase=not args.cased, split_by=args.split_by,
      modalities=args.modalities)
  counts = {split: info["count"] for split, info in summary["splits"].items()}
  kinds = ", ".join(f"{count} {kind.replace('_', ' ')}"
                    for kind, count in summary["listings"].items() if count)
  print(f"prepared {counts} listings ({kinds}) into {args.output}; skipped "
        f"rows and their reasons are in {args.output}/dataset.json")


def _train(args, overrides):
  _at_least(args, num_processes=1, process_id=0)
  _output_folder("--workdir", args.workdir)
  import jax
  from item_jax.train.config import load_config, validate
  _initialize_distributed(args)
  # A bad config fails here, before any device work.
  config = load_config(args.config, overrides)
  settings = validate(config, jax.device_count(), jax.process_count())
  from item_jax.eval.evaluate import PeriodicRetrieval  # TensorFlow from here on
  from item_jax.train.loop import train
  # Retrieval on a validation subset every config.eval_every_steps (0: never).
  history = train(settings, args.workdir, evaluator=PeriodicRetrieval)
  if history:
    print(f"step {history[-1]['step']}: " + " ".join(
        f"{name}={value:.4f}" for name, value in sorted(history[-1].items())
        if name != "step"))


def _compile(args, overrides):
  _at_least(args, vocab_size=1)
  if args.hbm_gib is not None and args.hbm_gib <= 0:
    raise UserError(f"--hbm-gib {args.hbm_gib}: must be more than 0")
  # Compiling reads no data and runs nothing: local accelerators are not needed.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from item_jax.launch import compile as compile_lib
  compile_lib.simulate_cpu_devices(args.topology)
  from item_jax.train.config import load_config
  try:
    target = compile_lib.parse_target(args.topology, args.hbm_gib)
    report = compile_lib.compile_train_step(load_config(args.config, overrides),
                                            target, args.vocab_size)
  except compile_lib.DoesNotFitError as error:  # an answer, with its report
    sys.exit(f"does not fit: {error}")
  print(json.dumps(report, indent=2) if args.json
        else compile_lib.format_report(report))


# The flags that say how to read a raw catalogue (embed --catalogue, neighbours).
_CATALOGUE_FLAGS = ("images", "columns", "modalities", "workers")
_CATALOGUE_MODALITIES = "any"  # item_jax.eval.serve.DEFAULT_MODALITIES


def _catalogue_columns(args) -> dict | None:
  """Checks --catalogue and --images; the parsed --columns."""
  _need_file("--catalogue", args.catalogue)
  if args.images:
    _need_folder("--images", args.images)
  from item_jax.data.catalogue import parse_column_mapping
  return parse_column_mapping(args.columns) if args.columns else None


def _only_with(args, flags, where: str) -> None:
  """Flags of one way in, refused when the other is used."""
  for flag in flags:
    if getattr(args, flag, None) is not None:
      raise UserError(f"--{flag.replace('_', '-')} goes with {where}")


def _embed(args):
  _need_run("--workdir", args.workdir)
  _at_least(args, step=0, batch_size=1, workers=0, num_processes=1, process_id=0)
  if args.catalogue is not None:
    _only_with(args, ["split"], "--data (a --catalogue is embedded whole)")
    columns = _catalogue_columns(args)
    from item_jax.eval.serve import embed_catalogue
    _initialize_distributed(args)
    summary = embed_catalogue(
        args.workdir, args.catalogue, args.output, images=args.images,
        step=args.step, view=args.modality,
        modalities=args.modalities or _CATALOGUE_MODALITIES, columns=columns,
        batch_size=args.batch_size, num_workers=args.workers)
    print(f"embedded {summary['count']} listings of {args.catalogue} "
          f"({args.modality}, dim {summary['dim']}, step {summary['step']}; "
          f"{summary['skipped']} rows skipped): {' '.join(summary['paths'])}")
    return
  _only_with(args, _CATALOGUE_FLAGS, "--catalogue")
  split = args.split or "test"
  _need_prepared("--data", args.data, [split], split_flag="--split")
  from item_jax.eval.embed import embed_command
  _initialize_distributed(args)
  summary = embed_command(args.workdir, args.data, split, args.output,
                          step=args.step, view=args.modality,
                          batch_size=args.batch_size)
  print(f"embedded {summary['count']} {split} listings ({args.modality}, "
        f"dim {summary['dim']}, step {summary['step']}): "
        f"{' '.join(summary['paths'])}")


def _neighbours(args):
  _at_least(args, k=1, block_rows=1, index_block_rows=1, max_blocks=1, step=0,
            batch_size=1, workers=0, num_processes=1, process_id=0)
  embed_flags = ["step", "batch_size", "modality", *_CATALOGUE_FLAGS]
  if args.embeddings is not None:
    if args.workdir is not None or args.catalogue is not None:
      raise UserError("give --embeddings (an `item-jax embed` output) or "
                      "--workdir and --catalogue (to embed first), not both")
    _only_with(args, embed_flags,
               "--workdir and --catalogue (embedding first), not --embeddings")
  elif args.workdir is None or args.catalogue is None:
    raise UserError("give --embeddings OUTPUT (an `item-jax embed` output), or "
                    "--workdir and --catalogue to embed a catalogue first")
  else:
    _need_run("--workdir", args.workdir)
    columns = _catalogue_columns(args)
  if _is_local(args.output) and os.path.isdir(args.output):
    raise UserError(f"--output {args.output} is a folder; expected a .csv or "
                    ".parquet file")
  from item_jax.eval.neighbours import neighbours_command
  _initialize_distributed(args)
  queries, embedded = args.embeddings, ""
  if queries is None:
    from item_jax.eval.serve import embed_catalogue_once
    # Beside the output: a rerun finds them and resumes the search.
    queries = os.path.splitext(args.output)[0] + ".embeddings"
    summary = embed_catalogue_once(
        args.workdir, args.catalogue, queries, images=args.images,
        step=args.step, view=args.modality or "both",
        modalities=args.modalities or _CATALOGUE_MODALITIES, columns=columns,
        batch_size=args.batch_size, num_workers=args.workers)
    embedded = (f" (embeddings {queries}.npy, step {summary['step']}, "
                f"{'kept from before' if summary['reused'] else 'new'}; "
                f"{summary['skipped']} catalogue rows skipped: "
                f"{queries}.skipped.json)")
  block_flags = {name: getattr(args, name) for name in
                 ("block_rows", "index_block_rows") if getattr(args, name)}
  result = neighbours_command(queries, args.output, index=args.index, k=args.k,
                              min_score=args.min_score, max_blocks=args.max_blocks,
                              **block_flags)
  import jax
  if jax.process_index():
    return
  if result["complete"]:
    print(f"neighbours: {result['pairs']:,} pairs for {result['queries']:,} "
          f"queries (k {result['k']}, {result['index_rows']:,} index rows): "
          f"{result['path']}{embedded}")
  else:
    print(f"neighbours: {result['pairs']:,} pairs so far of {result['queries']:,} "
          f"queries in {result['path']}{embedded}; incomplete: rerun the same "
          "command to resume")


def _eval(args):
  _need_run("--workdir", args.workdir)
  _need_prepared("--data", args.data, ["test", "train"])
  _at_least(args, step=0, batch_size=1, knn_k=1, probe_steps=1,
            max_train_examples=1, num_processes=1, process_id=0,
            mobilenet_image_size=32)
  from item_jax.eval.evaluate import BASELINES, EvalOptions
  from item_jax.eval.report import (compare_table, eval_command, headline_table,
                                    unavailable_lines)
  baselines = BASELINES if args.baselines == "all" else tuple(
      name.strip() for name in args.baselines.split(",") if name.strip())
  # A bad value fails here, before any model is loaded.
  options = EvalOptions(step=args.step, batch_size=args.batch_size,
                        knn_k=args.knn_k, probe_steps=args.probe_steps,
                        max_train_examples=args.max_train_examples,
                        baselines=baselines,
                        mobilenet_image_size=args.mobilenet_image_size,
                        fusion=args.fusion)
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


def _categorize(args):
  _need_run("--workdir", args.workdir)
  if args.data is not None:
    _need_prepared("--data", args.data, [args.split], split_flag="--split")
  if args.fit_data is not None:
    _need_prepared("--fit-data", args.fit_data, [args.fit_split],
                   split_flag="--fit-split")
  _at_least(args, k=1, step=0, knn_k=1, probe_steps=1, batch_size=1)
  from item_jax.eval.categorize import categorize_command
  summary = categorize_command(
      args.workdir, args.output, data_dir=args.data, split=args.split,
      embeddings=args.embeddings, k=args.k, fit_split=args.fit_split,
      method=args.method, refit=args.refit, view=args.modality, step=args.step,
      fit_data=args.fit_data, knn_k=args.knn_k, probe_steps=args.probe_steps,
      batch_size=args.batch_size)
  validation = summary["validation"]
  print(f"categorized {summary['count']} listings (top {summary['k']}, "
        f"{summary['method']}, {summary['view']} view, step {summary['step']}; "
        f"categorizer {'fitted' if summary['fitted'] else 'reused'}"
        + (f", validation accuracy {validation['accuracy']:.4f}" if validation else "")
        + f"): {summary['output']}")


def _convert(args, overrides):
  _check_convert_inputs(args)
  config = None
  if getattr(args, "config", None):
    from item_jax.train.config import load_config
    config = load_config(args.config, overrides)
  elif overrides:
    raise UserError("--config.* overrides need --config FILE[:ARG]")
  from item_jax.convert import commands
  if args.layout == "hf-bert":
    commands.hf_bert_to_workdir(args.checkpoint, args.workdir, args.image_size,
                                args.patch_size, config)
  elif args.layout == "hf-vit":
    commands.hf_vit_into_workdir(args.checkpoint, args.workdir)
  elif args.layout == "torch":
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


def _check_convert_inputs(args):
  """What each layout reads must be there: the checkpoint folder, or the run
  in --workdir (the others write --workdir)."""
  _at_least(args, image_size=1, patch_size=1, step=0, num_devices=1)
  layout = args.layout
  if layout == "torch" and (args.checkpoint is None) == (args.output is None):
    raise UserError("give either CHECKPOINT (torch -> --workdir) or --output "
                    "(--workdir -> torch)")
  if getattr(args, "checkpoint", None) is not None:
    _need_folder("checkpoint", args.checkpoint)
    if layout in ("hf-bert", "torch", "import"):
      _need_file("checkpoint", os.path.join(args.checkpoint, "config.json"))
  if layout in ("hf-vit", "export", "reshard") or (layout == "torch" and args.output):
    _need_run("--workdir", args.workdir)
  else:
    _output_folder("--workdir", args.workdir)
  if getattr(args, "tokenizer", None):
    _need_file("--tokenizer", args.tokenizer)


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


def _add_debug_flag(parser, top: bool = False) -> None:
  """--debug before or after the command (and the convert layout)."""
  parser.add_argument("--debug", action="store_true",
                      default=False if top else argparse.SUPPRESS,
                      help=f"on an error, show its traceback (also {DEBUG_ENV}=1)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="item-jax", description="ITEm image + title embeddings in JAX/Flax.",
      epilog="A mistake (a missing input, a bad flag or config value) is "
      "reported in one line with exit status 2; --debug shows its traceback.")
  _add_debug_flag(parser, top=True)
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
      "embed", help="embeddings of every listing of a prepared split, or of a "
      "raw catalogue file, from a checkpoint")
  embed.add_argument("--workdir", required=True, help="a training workdir")
  source = embed.add_mutually_exclusive_group(required=True)
  source.add_argument("--data", help="a `prepare` output folder")
  source.add_argument("--catalogue", help="a raw catalogue CSV or JSONL file, "
                      "read and checked as `prepare` does, tokenised with the "
                      "run's tokenizer; bad rows are named in OUTPUT.skipped.json")
  embed.add_argument("--split", default=None, help="with --data (default test)")
  embed.add_argument("--output", required=True,
                     help="writes OUTPUT.npy and OUTPUT.ids.json")
  embed.add_argument("--step", type=int, default=None,
                     help="checkpoint step (default: the latest)")
  embed.add_argument("--modality", choices=["both", "title", "image"],
                     default="both")
  embed.add_argument("--batch-size", type=int, default=None,
                     help="global batch (default: 64 per batch shard)")
  _add_catalogue_flags(embed)
  _add_distributed_flags(embed)
  embed.set_defaults(run=_embed)

  neighbours = commands.add_parser(
      "neighbours", help="the k most similar listings of every listing "
      "(exact cosine search) -> a resumable CSV or Parquet table")
  neighbours.add_argument("--embeddings", default=None,
                          help="an `item-jax embed` OUTPUT (OUTPUT.npy + "
                          "OUTPUT.ids.json): its listings are the queries")
  neighbours.add_argument("--workdir", default=None,
                          help="with --catalogue: embed it with this run first "
                          "(into OUTPUT's folder, kept for a rerun)")
  neighbours.add_argument("--catalogue", default=None,
                          help="a raw catalogue CSV or JSONL file (with --workdir)")
  neighbours.add_argument("--index", default=None,
                          help="another embed OUTPUT to search (default: the "
                          "queries themselves, each listing's own row excluded)")
  neighbours.add_argument("--k", type=int, default=10)
  neighbours.add_argument("--min-score", type=float, default=None,
                          help="leave out pairs of a lower cosine score")
  neighbours.add_argument("--output", required=True,
                          help="the table: .parquet for Parquet (pyarrow), "
                          "else CSV (query_item_id,rank,item_id,score)")
  neighbours.add_argument("--block-rows", type=int, default=None,
                          help="query rows searched at a time (default 16384)")
  neighbours.add_argument("--index-block-rows", type=int, default=None,
                          help="index rows on the devices at a time (default 131072)")
  neighbours.add_argument("--max-blocks", type=int, default=None,
                          help="stop after this many query blocks (rerun to resume)")
  neighbours.add_argument("--step", type=int, default=None,
                          help="with --catalogue: checkpoint step (default: the latest)")
  neighbours.add_argument("--modality", choices=["both", "title", "image"],
                          default=None, help="with --catalogue (default both)")
  neighbours.add_argument("--batch-size", type=int, default=None,
                          help="with --catalogue: global embedding batch")
  _add_catalogue_flags(neighbours)
  _add_distributed_flags(neighbours)
  neighbours.set_defaults(run=_neighbours)

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
  evaluate.add_argument("--mobilenet-image-size", type=int, default=224,
                        help="the side MobileNetV2 sees each photo resized to "
                        "(ImageNet's 224; less costs less CPU)")
  evaluate.add_argument("--no-fusion", dest="fusion", action="store_false",
                        help="skip the entries fused with TF-IDF (they embed "
                        "the validation split to fit their weights)")
  _add_distributed_flags(evaluate)
  evaluate.set_defaults(run=_eval)

  _add_categorize_parser(commands)
  _add_convert_parser(commands)

  demo = commands.add_parser(
      "demo", help="hard synthetic catalogue -> prepare -> pre-train the tiny "
      "model (recommended recipe and the paper's) -> evaluate against baselines",
      epilog="--config.* overrides apply to both recipes")
  demo.add_argument("--workdir", default="runs/demo")
  demo.add_argument("--num-products", type=int, default=1250)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(run=_demo, takes_overrides=True)
  for command in commands.choices.values():
    _add_debug_flag(command)
  return parser


def _add_categorize_parser(commands):
  categorize = commands.add_parser(
      "categorize", help="top-k leaf categories of every listing, from a "
      "linear probe (or k-NN) fitted once on a labelled split and saved in "
      "WORKDIR/categorizer/")
  categorize.add_argument("--workdir", required=True, help="a training workdir")
  listings = categorize.add_mutually_exclusive_group(required=True)
  listings.add_argument("--data", default=None,
                        help="a `prepare` output folder: categorize its --split")
  listings.add_argument("--embeddings", default=None, metavar="OUTPUT",
                        help="an `item-jax embed` output (OUTPUT.npy + "
                        "OUTPUT.ids.json) of this workdir")
  categorize.add_argument("--split", default="test")
  categorize.add_argument("--output", required=True,
                          help="CSV item_id,rank,category,probability")
  categorize.add_argument("--k", type=int, default=3, help="categories per listing")
  categorize.add_argument("--method", choices=["probe", "knn"], default="probe")
  categorize.add_argument("--fit-split", default="train",
                          help="the labelled split the categorizer is fitted on")
  categorize.add_argument("--fit-data", default=None,
                          help="the prepared folder it is fitted on (default: "
                          "--data, else the saved categorizer's, else the "
                          "run's data.dir)")
  categorize.add_argument("--refit", action="store_true",
                          help="fit again even when the saved categorizer matches")
  categorize.add_argument("--modality", choices=["both", "title", "image"],
                          default=None,
                          help="the view (default: the embeddings' modality, or both)")
  categorize.add_argument("--step", type=int, default=None,
                          help="checkpoint step (default: the latest)")
  categorize.add_argument("--knn-k", type=int, default=10,
                          help="neighbours that vote (--method knn)")
  categorize.add_argument("--probe-steps", type=int, default=300,
                          help="the probe's L-BFGS iterations at most")
  categorize.add_argument("--batch-size", type=int, default=None,
                          help="global batch for embedding (default: 64 per "
                          "batch shard)")
  categorize.set_defaults(run=_categorize)


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
  for sub in layouts.choices.values():
    _add_debug_flag(sub)


def _add_catalogue_flags(parser):
  """How `--catalogue` is read (as `prepare` reads one)."""
  parser.add_argument("--images", default=None,
                      help="with --catalogue: the folder its image paths are "
                      "relative to (default: the catalogue's folder)")
  parser.add_argument("--columns", default=None,
                      help="with --catalogue: renames, e.g. item_id=posting_id")
  parser.add_argument("--modalities", choices=["both", "any"], default=None,
                      help="with --catalogue: any (the default) embeds every "
                      "listing with a title or an image, each with what it has, "
                      "so that only rows with neither are lost; both skips "
                      "listings lacking either, as `prepare`'s default does")
  parser.add_argument("--workers", type=int, default=None,
                      help="with --catalogue: image processes (default: one "
                      "per CPU core; 0: in this process)")


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


def _command_name(args) -> str:
  layout = getattr(args, "layout", None)
  return f"{args.command} {layout}" if args.command == "convert" and layout else args.command


def _one_line(error: BaseException) -> str:
  text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
  return text or type(error).__name__


def main(argv=None):
  _skip_absent_tpu()  # before JAX is first imported
  _quiet_tensorflow()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropLibraryChatter())
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)  # its own errors exit 2
  try:
    if getattr(args, "takes_overrides", False):
      bad = [flag for flag in unknown if not flag.startswith("--config.")]
      if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
      args.run(args, unknown)
    elif unknown:
      parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    else:
      args.run(args)
  except UserError as error:
    if args.debug or _debug_from_environment():
      raise
    sys.stdout.flush()
    print(f"item-jax {_command_name(args)}: error: {_one_line(error)}",
          file=sys.stderr, flush=True)
    raise SystemExit(2) from None


if __name__ == "__main__":
  main()
