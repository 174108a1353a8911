"""`item-jax train` (pre-train or resume from a config file) and
`item-jax compile` (its train step compiled ahead of time for a TPU slice)."""

import json
import os
import sys

from item_jax.cli.common import (add_distributed_flags, at_least,
                                 initialize_distributed, output_folder)
from item_jax.errors import UserError


def register(commands):
  train = commands.add_parser(
      "train", help="pre-train (or resume) from a config file",
      epilog="Any config field can be overridden: --config.optimizer.learning_rate=3e-4")
  train.add_argument("--config", required=True, help="path/to/config.py[:arg]")
  train.add_argument("--workdir", required=True)
  add_distributed_flags(train)
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


def _train(args, overrides):
  at_least(args, num_processes=1, process_id=0)
  output_folder("--workdir", args.workdir)
  import jax
  from item_jax.train.config import load_config, validate
  initialize_distributed(args)
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
  at_least(args, vocab_size=1)
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
