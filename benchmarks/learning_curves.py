"""Learning curves of several recipes on several catalogues, with seeds.

  python benchmarks/learning_curves.py \
      --data default=runs/demo/prepared --data hard=runs/hard/prepared \
      --recipe paper=configs/item_tiny.py \
      --recipe recommended=configs/item_recommended.py \
      --recipe "no-global=configs/item_tiny.py --config.objectives.gmlm_weight=0 --config.objectives.gmim_weight=0" \
      --steps 3000 --eval-at 0,500,1000,2000,3000 --seeds 0,1,2 \
      --output runs/curves

A recipe is `NAME=CONFIG[:ARG] [--config.field=value ...] [--init-from=WORKDIR]`;
its config's schedule is stretched to `--steps` (warmup kept); `--init-from`
starts from that workdir's latest checkpoint's parameters (e.g. a converted
BERT's step 0, with `configs/item_converted.py:WORKDIR`) with a fresh
optimizer state (a catalogue prepared with that checkpoint's tokenizer is a
run of its own: `--data` accepts any prepared folder). Each (catalogue, recipe,
seed) trains in memory on one device with the real jitted step (the masks,
optimizer and schedule of `item-jax train`, no checkpoints) and, at each
`--eval-at` step (0: before any update), scores the test split: macro R@10 of
the three [CLS] views (title + image, title only, image only) and the
leaf-category linear probe on the title + image embedding (trained on the
training split's embeddings, as `item-jax eval` does). Writes
OUTPUT/curves.json (every point), OUTPUT/curves.md (mean and spread over the
seeds at each step) and OUTPUT/curves.png (title + image R@10 and probe
accuracy against steps, one panel per catalogue, the seeds' range shaded).
The last line is `best_final_both_r10_<catalogue>: <value> (<recipe>)` for
the last catalogue given.
"""

import argparse
import json
import pathlib
import shlex
import sys
import time

import jax
import numpy as np
from etils import epath
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from learning import embeddings, load_split, training_batches  # noqa: E402  (the sibling script)

from item_jax.data.tokenizer import load_tokenizer  # noqa: E402
from item_jax.eval import metrics  # noqa: E402
from item_jax.objectives import TokenSpec  # noqa: E402
from item_jax.train.config import load_config, validate  # noqa: E402
from item_jax.train.image_stem import with_pretrained_stem  # noqa: E402
from item_jax.train.optimizer import make_optimizer  # noqa: E402
from item_jax.train.step import init_model, init_train_state, make_train_step  # noqa: E402

VIEWS = ("both", "title", "image")


def parse_named(text: str, what: str) -> tuple[str, str]:
  name, equals, value = text.partition("=")
  if not equals or not name or not value:
    raise SystemExit(f"--{what} {text!r}: expected NAME=VALUE")
  return name, value


def score(model, train: dict, test: dict, num_classes: int) -> dict:
  """R@10 of the three views on the test split, probe accuracy on `both`."""
  test_rows = embeddings(model, test)
  out = {view: metrics.same_product_retrieval(
      test_rows[view], test["product_id"], test["category_id"])["macro_recall@10"]
         for view in VIEWS}
  train_rows = embeddings(model, train)["both"]
  labelled = test["category_id"] >= 0
  predicted = metrics.linear_probe(train_rows, train["category_id"],
                                   test_rows["both"][labelled], num_classes)
  out["probe"] = float(np.mean(predicted == test["category_id"][labelled]))
  return out


def run_one(config_spec: str, overrides: list, data_dir: str, splits: dict,
            seed: int, steps: int, eval_at: set, log,
            init_from: str | None = None, stem_dir: str = ".") -> list[dict]:
  config = load_config(config_spec, [*overrides, f"--config.data.dir={data_dir}",
                                     f"--config.seed={seed}",
                                     f"--config.total_steps={steps}"])
  settings = validate(config, num_devices=1)
  dataset = settings.dataset
  tokenizer = load_tokenizer(str(epath.Path(data_dir) / dataset["tokenizer"]))
  tokens = TokenSpec(settings.model.vocab_size, tokenizer.mask_id,
                     tokenizer.special_ids)
  optimizer = make_optimizer(settings.optimizer)
  graphdef, params = init_model(settings.model, config.seed)
  # A convolutional image stem starts from ImageNet (kept beside the results).
  params = with_pretrained_stem(params, settings.model, stem_dir)
  if init_from:
    from item_jax.convert.workdir import restore_workdir
    restored = jax.device_get(restore_workdir(init_from).state.params)
    shape = lambda tree: jax.tree.map(np.shape, tree)
    if shape(restored) != shape(params):
      raise SystemExit(f"--init-from={init_from}: its parameters do not fit the "
                       f"recipe's model (use configs/item_converted.py:{init_from})")
    params = restored
  train, test = splits["train"], splits["test"]
  num_classes = len(dataset["categories"])
  points = []

  def evaluate(step, params):
    started = time.perf_counter()
    values = score(nnx.merge(graphdef, params), train, test, num_classes)
    points.append({"step": step, **values})
    log(f"  step {step:6d}: " + " ".join(f"{k} {v:.3f}" for k, v in values.items())
        + f" ({time.perf_counter() - started:.0f} s)")

  if 0 in eval_at:
    evaluate(0, params)
  state = init_train_state(params, optimizer)
  step_fn = jax.jit(make_train_step(graphdef, optimizer, settings.objectives,
                                    tokens, config.seed,
                                    config.grad_accumulation_steps),
                    donate_argnums=0)
  window, started = [], time.perf_counter()
  for index, batch in enumerate(training_batches(
      train, config.global_batch_size, steps, config.seed)):
    state, step_metrics = step_fn(state, batch)
    window.append(step_metrics)
    number = index + 1
    if number % config.log_every_steps == 0 or number == steps:
      window = jax.device_get(window)
      names = [name for name in ("loss", "itc", "itm", "mlm", "mim", "gmlm", "gmim")
               if name in window[0]]
      log(f"  step {number:6d} ({time.perf_counter() - started:.0f} s): "
          + " ".join(f"{name} {np.mean([m[name] for m in window]):.3f}"
                     for name in names))
      window = []
    if number in eval_at:
      evaluate(number, state.params)
  return points


def summarise(rows: list[dict]) -> str:
  """Markdown: mean ± spread (half the max-min range) over seeds, per step."""
  lines = ["| catalogue | recipe | step | seeds | both R@10 | title R@10 | "
           "image R@10 | probe acc. |", "| --- | --- | ---: | ---: | --- | --- "
           "| --- | --- |"]
  order = {name: i for i, name in enumerate(dict.fromkeys(r["recipe"] for r in rows))}
  keys = sorted({(r["catalogue"], r["recipe"], r["step"]) for r in rows},
                key=lambda k: (k[0], order[k[1]], k[2]))
  for catalogue, recipe, step in keys:
    group = [r for r in rows if (r["catalogue"], r["recipe"], r["step"])
             == (catalogue, recipe, step)]
    cells = []
    for name in (*VIEWS, "probe"):
      values = np.array([r[name] for r in group])
      cell = f"{values.mean():.3f}"
      if len(values) > 1:
        cell += f" ± {(values.max() - values.min()) / 2:.3f}"
      cells.append(cell)
    lines.append(f"| {catalogue} | {recipe} | {step} | {len(group)} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  catalogues = list(dict.fromkeys(r["catalogue"] for r in rows))
  recipes = list(dict.fromkeys(r["recipe"] for r in rows))
  figure, axes = plt.subplots(2, len(catalogues), squeeze=False,
                              figsize=(5 * len(catalogues), 7))
  for column, catalogue in enumerate(catalogues):
    for row, (metric, label) in enumerate((("both", "title + image macro R@10"),
                                           ("probe", "category probe accuracy"))):
      ax = axes[row][column]
      for recipe in recipes:
        group = [r for r in rows if r["catalogue"] == catalogue
                 and r["recipe"] == recipe]
        steps = sorted({r["step"] for r in group})
        values = [[r[metric] for r in group if r["step"] == s] for s in steps]
        mean = [np.mean(v) for v in values]
        line, = ax.plot(steps, mean, marker="o", label=recipe)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                        color=line.get_color(), alpha=0.2)
      ax.set_title(f"{catalogue}: {label}")
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      if row == 0 and column == 0:
        ax.legend(fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", action="append", required=True,
                      metavar="NAME=DIR", help="a `prepare` output folder")
  parser.add_argument("--recipe", action="append", required=True,
                      metavar="NAME=CONFIG [OVERRIDES]")
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--eval-at", default="", metavar="STEPS",
                      help="comma-separated steps (default: 0 and --steps)")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--output", required=True)
  args = parser.parse_args()
  datas = [parse_named(text, "data") for text in args.data]
  recipes = []
  for text in args.recipe:
    name, spec = parse_named(text, "recipe")
    config_spec, *overrides = shlex.split(spec)
    init_from = [o.split("=", 1)[1] for o in overrides
                 if o.startswith("--init-from=")]
    overrides = [o for o in overrides if not o.startswith("--init-from=")]
    recipes.append((name, config_spec, overrides, (init_from or [None])[0]))
  eval_at = {int(s) for s in args.eval_at.split(",") if s} or {0, args.steps}
  eval_at.add(args.steps)
  seeds = [int(s) for s in args.seeds.split(",")]
  output = pathlib.Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  log_file = open(output / "log.txt", "a")

  def log(text):
    print(text, flush=True)
    log_file.write(text + "\n")
    log_file.flush()

  rows = []
  for catalogue, data_dir in datas:
    splits, shapes = {}, None
    for name, config_spec, overrides, init_from in recipes:
      config = load_config(config_spec, [*overrides, f"--config.data.dir={data_dir}"])
      wanted = (config.model.image_size, config.data.max_title_len, config.data.resize)
      if wanted != shapes:
        started = time.perf_counter()
        splits = {split: load_split(data_dir, split, *wanted)
                  for split in ("train", "test")}
        shapes = wanted
        log(f"{catalogue}: decoded {len(splits['train']['title_ids'])} training "
            f"and {len(splits['test']['title_ids'])} test listings in "
            f"{time.perf_counter() - started:.0f} s")
      for seed in seeds:
        log(f"{catalogue} / {name} / seed {seed}")
        started = time.perf_counter()
        for point in run_one(config_spec, overrides, data_dir, splits, seed,
                             args.steps, eval_at, log, init_from, str(output)):
          rows.append({"catalogue": catalogue, "recipe": name, "seed": seed, **point})
        log(f"  {time.perf_counter() - started:.0f} s")
        (output / "curves.json").write_text(json.dumps(rows, indent=1))
  table = summarise(rows)
  (output / "curves.md").write_text(table + "\n")
  plot(rows, output / "curves.png")
  log(table)
  last = datas[-1][0]
  final = {r["recipe"]: [] for r in rows}
  for r in rows:
    if r["catalogue"] == last and r["step"] == args.steps:
      final[r["recipe"]].append(r["both"])
  best = max(final, key=lambda name: np.mean(final[name]))
  log(f"best_final_both_r10_{last}: {np.mean(final[best]):.3f} ({best})")


if __name__ == "__main__":
  main()
