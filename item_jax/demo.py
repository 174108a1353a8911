"""The embedded default end to end: synthetic catalogue → prepare → pre-train
tiny → evaluate against the baselines.

Every stage writes under one work directory and is skipped when its output is
already there, so an interrupted demo picks up where it stopped (training
itself resumes from its last checkpoint; evaluation always runs).
"""

import json
import logging
import pathlib

import jax
from etils import epath

from item_jax.data.prepare import prepare
from item_jax.data.synth import synthesize
from item_jax.eval.report import eval_command
from item_jax.train.config import load_config, validate
from item_jax.train.loop import train

TINY_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "item_tiny.py"


def run_demo(workdir: str, num_products: int = 1250, seed: int = 0,
             overrides=()) -> dict:
  """Runs every stage; returns a summary with the first and last losses, the
  evaluation report and the paths of its files."""
  root = epath.Path(workdir)
  catalogue, prepared = root / "catalogue", root / "prepared"
  if not (catalogue / "catalogue.csv").exists():
    logging.info("demo: generating %d synthetic products", num_products)
    synthesize(str(catalogue), num_products, seed=seed)
  if not (prepared / "dataset.json").exists():
    logging.info("demo: preparing TFRecords")
    prepare(str(catalogue / "catalogue.csv"), str(catalogue / "images"),
            str(prepared), num_shards=8, vocab_size=1000, seed=seed)
  config = load_config(str(TINY_CONFIG),
                       [f"--config.data.dir={prepared}", *overrides])
  settings = validate(config, jax.device_count(), jax.process_count())
  history = train(settings, str(root / "train"))
  logging.info("demo: evaluating")
  report, paths, _ = eval_command(str(root / "train"), str(prepared))
  summary = {"workdir": str(root), "dataset": str(prepared / "dataset.json"),
             "train_workdir": str(root / "train"), "eval": paths}
  if history:
    summary.update(first_step=history[0], last_step=history[-1])
  (root / "summary.json").write_text(json.dumps(summary, indent=2))
  return {**summary, "report": report}
