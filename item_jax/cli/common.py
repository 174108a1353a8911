"""What several commands share: input checks that raise `UserError` before
any work, and the flags of more than one command (debug, distributed,
catalogue). Standard library only, so that parsing stays fast."""

import argparse
import json
import os

from item_jax.errors import MissingInputError, UserError, no_prepared_data, no_training_run

DEBUG_ENV = "ITEM_JAX_DEBUG"

# The flags that say how to read a raw catalogue (embed --catalogue, neighbours).
CATALOGUE_FLAGS = ("images", "columns", "modalities", "workers")
CATALOGUE_MODALITIES = "any"  # item_jax.eval.serve.DEFAULT_MODALITIES


def is_local(path) -> bool:
  return "://" not in str(path)


def need_file(flag: str, path: str) -> None:
  """A file named on the command line must be there (local paths; gs:// and
  other URLs are left to the code that reads them)."""
  if not is_local(path):
    return
  if os.path.isdir(path):
    raise UserError(f"{flag} {path} is a folder; expected a file")
  if not os.path.isfile(path):
    raise MissingInputError(f"{flag} {path}: no such file")
  if not os.access(path, os.R_OK):
    raise MissingInputError(f"{flag} {path}: not readable (permissions)")


def need_folder(flag: str, path: str) -> None:
  if not is_local(path):
    return
  if os.path.isfile(path):
    raise UserError(f"{flag} {path} is a file; expected a folder")
  if not os.path.isdir(path):
    raise MissingInputError(f"{flag} {path}: no such folder")


def output_folder(flag: str, path: str) -> None:
  if is_local(path) and os.path.isfile(path):
    raise UserError(f"{flag} {path} is a file; expected a folder (it is "
                    "created if missing)")


def need_run(flag: str, workdir: str) -> None:
  """`workdir` holds a training run: its config.json."""
  if is_local(workdir) and not os.path.isfile(os.path.join(workdir, "config.json")):
    raise MissingInputError(f"{flag}: {no_training_run(workdir)}")


def need_prepared(flag: str, data_dir: str, splits=(), split_flag=None) -> None:
  """`data_dir` is a `prepare` output folder with `splits`."""
  if not is_local(data_dir):
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


def at_least(args, **minimums) -> None:
  """Each named flag that was given is at least its minimum."""
  for dest, minimum in minimums.items():
    value = getattr(args, dest, None)
    if value is not None and value < minimum:
      raise UserError(f"--{dest.replace('_', '-')} {value}: must be at least {minimum}")


def only_with(args, flags, where: str) -> None:
  """Flags of one way in, refused when the other is used."""
  for flag in flags:
    if getattr(args, flag, None) is not None:
      raise UserError(f"--{flag.replace('_', '-')} goes with {where}")


def catalogue_columns(args) -> dict | None:
  """Checks --catalogue and --images; the parsed --columns."""
  need_file("--catalogue", args.catalogue)
  if args.images:
    need_folder("--images", args.images)
  from item_jax.data.catalogue import parse_column_mapping
  return parse_column_mapping(args.columns) if args.columns else None


def initialize_distributed(args):
  """jax.distributed.initialize() before any other JAX call, when several
  processes run: explicit flags, or what SLURM / a TPU pod provides."""
  import jax
  if args.num_processes and args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def add_debug_flag(parser, top: bool = False) -> None:
  """--debug before or after the command (and the convert layout)."""
  parser.add_argument("--debug", action="store_true",
                      default=False if top else argparse.SUPPRESS,
                      help=f"on an error, show its traceback (also {DEBUG_ENV}=1)")


def add_catalogue_flags(parser):
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


def add_distributed_flags(parser):
  parser.add_argument("--distributed", action="store_true",
                      help="jax.distributed.initialize() from the cluster's environment")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
