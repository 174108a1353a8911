"""The `item-jax` command line: parses flags and calls the packages, nothing more.
Each command group's module (`data`, `training`, `embeddings`, `evaluation`,
`convert`, `demo`) owns its flags, checks and call; `common` holds what they
share.

A mistake in what was asked (`item_jax.errors.UserError`: a missing input, a
bad flag or config value, a work directory without a run) ends in one line,
`item-jax COMMAND: error: MESSAGE`, and exit status 2; `--debug` (or
ITEM_JAX_DEBUG=1) shows its traceback instead. Any other error is a bug and
shows its traceback.
"""

import argparse
import glob
import importlib.util
import logging
import os
import sys

from item_jax.cli import convert, data, demo, embeddings, evaluation, training
from item_jax.cli.common import DEBUG_ENV, add_debug_flag
from item_jax.errors import UserError

# Each module adds its commands, in the order `item-jax --help` lists them.
COMMAND_GROUPS = (data, training, embeddings, evaluation, convert, demo)

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


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="item-jax", description="ITEm image + title embeddings in JAX/Flax.",
      epilog="A mistake (a missing input, a bad flag or config value) is "
      "reported in one line with exit status 2; --debug shows its traceback.")
  add_debug_flag(parser, top=True)
  commands = parser.add_subparsers(dest="command", required=True)
  for group in COMMAND_GROUPS:
    group.register(commands)
  for command in commands.choices.values():
    add_debug_flag(command)
  return parser


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
