"""Cloud TPU pod launcher: every gcloud command that creates a TPU VM (or a
queued resource), installs item-jax on all its workers, starts, follows, stops
and deletes a training run. Standard library only, so `launch/tpu_pod.sh` runs
it from a checkout without installing anything; `--dry-run` prints the commands.

  launch/tpu_pod.sh create my-pod --accelerator-type v4-32
  launch/tpu_pod.sh run my-pod --config configs/item_base.py --bucket my-bucket
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from item_jax import __version__

DEFAULT_ZONE = "us-central2-b"
DEFAULT_ACCELERATOR = "v4-32"
DEFAULT_PYTHON = "3.11"
# The software image each TPU generation boots (gcloud's --version /
# --runtime-version); override with --runtime-version.
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Everything lives in this folder of each worker's home: venv/, config.py,
# train.log, train.pid.
REMOTE_DIR = "item-jax"
_ENVIRONMENT = {  # flag -> environment variable giving its default
    "project": "ITEM_JAX_PROJECT", "zone": "ITEM_JAX_ZONE",
    "accelerator_type": "ITEM_JAX_ACCELERATOR_TYPE",
    "runtime_version": "ITEM_JAX_RUNTIME_VERSION", "bucket": "ITEM_JAX_BUCKET",
    "service_account": "ITEM_JAX_SERVICE_ACCOUNT", "package": "ITEM_JAX_PACKAGE",
}


def accelerator_type(name: str) -> str:
  """gcloud's spelling: v5e-N is v5litepod-N."""
  return "v5litepod-" + name.split("-", 1)[1] if name.startswith("v5e-") else name


def runtime_version(accelerator: str) -> str:
  generation = accelerator.split("-", 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise SystemExit(f"no default runtime version for {accelerator}: pass "
                     "--runtime-version (see `gcloud compute tpus versions list`)")
  return RUNTIME_VERSIONS[generation]


def _location(args) -> list[str]:
  project = [f"--project={args.project}"] if args.project else []
  return [*project, f"--zone={args.zone}"]


def _ssh(args, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_location(args),
          f"--worker={worker}", f"--command={command}"]


def create_commands(args) -> list[list[str]]:
  accelerator = accelerator_type(args.accelerator_type)
  version = args.runtime_version or runtime_version(accelerator)
  options = [f"--accelerator-type={accelerator}"]
  if args.queued:
    command = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
               *_location(args), f"--node-id={args.name}", *options,
               f"--runtime-version={version}"]
  else:
    command = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name,
               *_location(args), *options, f"--version={version}"]
  if args.spot:
    command.append("--spot")
  if args.service_account:
    command.append(f"--service-account={args.service_account}")
  return [command]


def _package(args) -> str:
  if args.package:
    return args.package
  if not args.bucket:
    raise SystemExit("say what to install: --package (a gs://...whl, or "
                     "git+https://...@REVISION) or --bucket (then "
                     f"gs://BUCKET/wheels/item_jax-{__version__}-py3-none-any.whl)")
  return f"gs://{args.bucket}/wheels/item_jax-{__version__}-py3-none-any.whl"


def install_script(package: str, python: str) -> str:
  """Run on every worker: a Python `python` virtual environment with
  item-jax and its TPU extra (jax[tpu], libtpu) in ~/item-jax/venv."""
  if package.startswith("gs://"):
    wheel = package.rsplit("/", 1)[1]
    fetch = [f"gcloud storage cp {_double_quoted(package)} ."]
    requirement = f"./{wheel}[tpu]"
  elif package.startswith("git+"):
    fetch, requirement = [], f"item-jax[tpu] @ {package}"
  else:
    fetch, requirement = [], package
  # TPU VM images ship an older Python; uv brings the one item-jax needs.
  return " && ".join([
      f"mkdir -p ~/{REMOTE_DIR}", f"cd ~/{REMOTE_DIR}",
      "python3 -m pip install --quiet --user uv",
      f"~/.local/bin/uv venv --quiet --allow-existing --python {python} venv",
      *fetch,
      f"~/.local/bin/uv pip install --quiet --python venv/bin/python "
      f"{_double_quoted(requirement)}",
  ])


def _double_quoted(text: str) -> str:
  # Double quotes keep the remote command readable inside gcloud's --command=.
  if any(char in text for char in '"$`\\'):
    raise SystemExit(f"--package {text!r}: no quotes, $, ` or \\ please")
  return f'"{text}"'


def train_script(config_arg: str, workdir: str, overrides: list[str]) -> str:
  """Run on every worker: start training in the background, detached from
  the ssh session; its output goes to ~/item-jax/train.log."""
  config = "config.py" + (f":{config_arg}" if config_arg else "")
  train = shlex.join(["venv/bin/item-jax", "train", "--config", config,
                      "--workdir", workdir, "--distributed", *overrides])
  return " && ".join([
      f"cd ~/{REMOTE_DIR}",
      "if [ -f train.pid ] && kill -0 \"$(cat train.pid)\" 2>/dev/null; then "
      "echo \"already training: pid $(cat train.pid)\" >&2; exit 1; fi",
      f"(setsid nohup {train} >> train.log 2>&1 < /dev/null & echo $! > train.pid)",
      "echo \"started on $(hostname): pid $(cat train.pid)\"",
  ])


STOP_SCRIPT = " && ".join([
    f"cd ~/{REMOTE_DIR}",
    "if [ -f train.pid ] && kill -0 \"$(cat train.pid)\" 2>/dev/null; then "
    "kill -TERM \"$(cat train.pid)\" && timeout 600 tail --pid=\"$(cat train.pid)\" "
    "-f /dev/null; echo \"stopped on $(hostname)\"; "
    "else echo \"not training on $(hostname)\"; fi",
])


def run_commands(args) -> list[list[str]]:
  config_file, _, config_arg = args.config.partition(":")
  if not os.path.isfile(config_file):
    raise SystemExit(f"--config {args.config}: no file {config_file}")
  overrides = list(args.overrides)
  if not any(flag.startswith("--config.data.dir=") for flag in overrides):
    if not args.bucket:
      raise SystemExit("give --config.data.dir=gs://... or --bucket (then "
                       "gs://BUCKET/prepared)")
    overrides.append(f"--config.data.dir=gs://{args.bucket}/prepared")
  workdir = args.workdir
  if not workdir:
    if not args.bucket:
      raise SystemExit("give --workdir gs://... or --bucket (then gs://BUCKET/runs/NAME)")
    workdir = f"gs://{args.bucket}/runs/{args.name}"
  commands = []
  if not args.skip_install:
    commands.append(_ssh(args, install_script(_package(args), args.python)))
  commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", config_file,
                   f"{args.name}:{REMOTE_DIR}/config.py", *_location(args),
                   "--worker=all"])
  commands.append(_ssh(args, train_script(config_arg, workdir, overrides)))
  return commands


def logs_commands(args) -> list[list[str]]:
  follow = ["-f"] if args.follow else []
  tail = shlex.join(["tail", "-n", str(args.lines), *follow])
  return [_ssh(args, f"{tail} ~/{REMOTE_DIR}/train.log", worker=args.worker)]


def stop_commands(args) -> list[list[str]]:
  return [_ssh(args, STOP_SCRIPT)]


def status_commands(args) -> list[list[str]]:
  kind = "queued-resources" if args.queued else "tpu-vm"
  return [["gcloud", "compute", "tpus", kind, "describe", args.name, *_location(args)]]


def delete_commands(args) -> list[list[str]]:
  if args.queued:
    # --force deletes the TPU VM that the queued resource created as well.
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name,
             *_location(args), "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name,
           *_location(args), "--quiet"]]


def build_parser() -> argparse.ArgumentParser:
  env = lambda name, default=None: os.environ.get(_ENVIRONMENT[name], default)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="the TPU VM's (and queued resource's) name")
  common.add_argument("--project", default=env("project"),
                      help="GCP project ($ITEM_JAX_PROJECT; default: gcloud's "
                      "configured project)")
  common.add_argument("--zone", default=env("zone", DEFAULT_ZONE),
                      help=f"($ITEM_JAX_ZONE; default {DEFAULT_ZONE})")
  common.add_argument("--accelerator-type", default=env("accelerator_type",
                                                        DEFAULT_ACCELERATOR),
                      help="v4-32, v5e-256 (= v5litepod-256), v5p-256, v6e-64, ... "
                      f"($ITEM_JAX_ACCELERATOR_TYPE; default {DEFAULT_ACCELERATOR})")
  common.add_argument("--runtime-version", default=env("runtime_version"),
                      help="TPU software version ($ITEM_JAX_RUNTIME_VERSION; "
                      "default by generation: " + ", ".join(
                          f"{k} {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
  common.add_argument("--bucket", default=env("bucket"),
                      help="GCS bucket name without gs:// ($ITEM_JAX_BUCKET): "
                      "wheels/, prepared/ and runs/NAME live there")
  common.add_argument("--queued", action="store_true",
                      default=os.environ.get("ITEM_JAX_QUEUED", "") not in ("", "0"),
                      help="a queued resource instead of a TPU VM ($ITEM_JAX_QUEUED=1)")
  common.add_argument("--dry-run", action="store_true",
                      help="print every command instead of running it")

  parser = argparse.ArgumentParser(
      prog="tpu_pod.sh", description="Train item-jax on a Cloud TPU VM or pod "
      "slice: create, run, logs, stop, status, delete.")
  commands = parser.add_subparsers(dest="command", required=True)
  create = commands.add_parser("create", parents=[common],
                               help="create the TPU VM (or queued resource)")
  create.add_argument("--spot", action="store_true", help="preemptible capacity")
  create.add_argument("--service-account", default=env("service_account"),
                      help="($ITEM_JAX_SERVICE_ACCOUNT; default: the project's "
                      "Compute Engine default service account)")
  create.set_defaults(build=create_commands)

  run = commands.add_parser(
      "run", parents=[common], help="install item-jax on every worker and start "
      "`item-jax train --distributed` (rerun to resume)",
      epilog="Config overrides follow: --config.mesh.fsdp=8")
  run.add_argument("--config", required=True, help="local path/to/config.py[:arg]")
  run.add_argument("--workdir", default=None,
                   help="checkpoints and TensorBoard (default gs://BUCKET/runs/NAME)")
  run.add_argument("--package", default=env("package"),
                   help="what to install ($ITEM_JAX_PACKAGE): gs://.../X.whl, "
                   "git+https://...@REVISION or a pip requirement (default "
                   f"gs://BUCKET/wheels/item_jax-{__version__}-py3-none-any.whl)")
  run.add_argument("--python", default=DEFAULT_PYTHON,
                   help=f"Python version of the workers' venv (default {DEFAULT_PYTHON})")
  run.add_argument("--skip-install", action="store_true",
                   help="the workers already have ~/item-jax/venv")
  run.set_defaults(build=run_commands, takes_overrides=True)

  logs = commands.add_parser("logs", parents=[common], help="tail a worker's train.log")
  logs.add_argument("--worker", default="0", help="0, 1, ... or all (default 0)")
  logs.add_argument("--lines", type=int, default=100)
  logs.add_argument("--follow", action="store_true")
  logs.set_defaults(build=logs_commands)

  stop = commands.add_parser("stop", parents=[common], help="SIGTERM the training "
                             "on every worker: it checkpoints and exits")
  stop.set_defaults(build=stop_commands)
  status = commands.add_parser("status", parents=[common],
                               help="describe the TPU VM (or queued resource)")
  status.set_defaults(build=status_commands)
  delete = commands.add_parser("delete", parents=[common],
                               help="delete the TPU VM (or queued resource and its VM)")
  delete.set_defaults(build=delete_commands)
  return parser


def parse(argv) -> argparse.Namespace:
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  bad = [flag for flag in unknown if not (getattr(args, "takes_overrides", False)
                                          and flag.startswith("--config."))]
  if bad:
    parser.error(f"unrecognized arguments: {' '.join(bad)}")
  args.overrides = unknown
  return args


def main(argv=None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  for command in args.build(args):
    if args.dry_run:
      print(shlex.join(command))
      continue
    print(f"+ {shlex.join(command)}", file=sys.stderr, flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode:
      return result.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
