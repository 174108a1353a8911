"""`item-jax demo`: the hard synthetic catalogue -> prepare -> pre-train both
recipes -> evaluate, with the losses and the evaluation printed as tables."""

import pathlib

from item_jax.cli.common import at_least, output_folder


def register(commands):
  demo = commands.add_parser(
      "demo", help="hard synthetic catalogue -> prepare -> pre-train the tiny "
      "model (recommended recipe and the paper's) -> evaluate against baselines",
      epilog="--config.* overrides apply to both recipes")
  demo.add_argument("--workdir", default="runs/demo")
  demo.add_argument("--num-products", type=int, default=1250)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(run=_demo, takes_overrides=True)


def _demo(args, overrides):
  at_least(args, num_products=1, seed=0)
  output_folder("--workdir", args.workdir)
  from item_jax.demo import RECIPES, run_demo
  from item_jax.eval.report import adds_table, job_hint, recipes_table
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
  name, report = next(iter(summary["reports"].items()))
  print(f"\nWhat ITEm adds ({name} recipe; each side's best row above; macro: "
        "over leaf categories, micro: over test listings)")
  print(adds_table(report, markdown=False))
  catalogue = pathlib.Path(summary["workdir"]) / "catalogue"
  hint = job_hint(report, str(catalogue / "catalogue.csv"), str(catalogue / "images"),
                  markdown=False)
  if hint:
    print("\n" + hint)
  for name, recipe in summary["recipes"].items():
    print(f"report ({name}): {recipe['eval'].get('markdown')}")
  print(f"TensorBoard: tensorboard --logdir {summary['workdir']}")
