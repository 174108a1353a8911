"""`item-jax demo`: the hard catalogue, two recipes, one summary."""

import json

from item_jax.cli import main
from item_jax.train.config import load_config


def test_demo_trains_both_recipes_on_the_hard_split_and_names_the_recommended(
    tmp_path, capsys):
  workdir = tmp_path / "demo"
  main(["demo", "--workdir", str(workdir), "--num-products", "24",
        "--config.total_steps=2", "--config.global_batch_size=8",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=2",
        "--config.model.image_size=32", "--config.optimizer.warmup_steps=1"])
  printed = capsys.readouterr().out
  for row in ("recommended: ITEm, title + image", "paper: ITEm, title + image",
              "TF-IDF", "colour histogram", "ITEm untrained",
              "recommended: ITEm, title + image + TF-IDF (w = "):
    assert row in printed, row
  # The fused entries are the recommended recipe's; the baselines are shown once.
  assert "paper: ITEm, title + image + TF-IDF" not in printed
  table, adds = printed.split("What ITEm adds")
  assert table.count("TF-IDF, title char 2-4-grams") == 1
  # Then the recommended recipe's best rows against the best without it.
  for row in ("best ITEm", "best without ITEm", "ITEm's margin",
              "macro R@10, embedding alone", "macro R@10, fused with the words"):
    assert row in adds, row
  # ... and the job's command for its best hybrid, on the demo's catalogue.
  assert (f"item-jax neighbours --workdir {workdir / 'train'} --catalogue "
          f"{workdir / 'catalogue' / 'catalogue.csv'} --images "
          f"{workdir / 'catalogue' / 'images'} --modality ") in adds
  # The photo anchor, at the demo's resolution, wherever its weights are.
  from item_jax.model.mobilenet import weights_path
  import importlib.util
  stem = weights_path() is not None and importlib.util.find_spec("torch")
  if stem:
    assert "MobileNetV2 ImageNet, image 224 px" in printed
    # What ITEm adds to the best hybrid built without it.
    assert "recommended: ITEm, title + image + MobileNetV2 + TF-IDF (w = " in printed
  summary = json.loads((workdir / "summary.json").read_text())
  # The recommended recipe has the pretrained image stem where its weights
  # are installed, and is the patch-embedding recipe elsewhere.
  recommended = load_config(f"configs/item_converted.py:{workdir / 'train'}")
  assert recommended.model.image_stem == ("mobilenet_v2" if stem else "patches")
  assert summary["recipes"]["recommended"]["config"].endswith(
      "item_hybrid.py" if stem else "item_recommended.py")
  assert summary["recipe"] == "recommended"
  assert summary["train_workdir"] == str(workdir / "train")
  assert summary["eval"]["json"].startswith(str(workdir / "train"))
  assert set(summary["recipes"]) == {"recommended", "paper"}
  dataset = json.loads((workdir / "prepared" / "dataset.json").read_text())
  assert dataset["split_by"] == "group"
  catalogue = (workdir / "catalogue" / "catalogue.csv").read_text().splitlines()
  groups = {}
  for line in catalogue[1:]:
    fields = line.split(",")
    groups.setdefault(fields[-1], set()).add(fields[3])
  assert max(len(products) for products in groups.values()) >= 5
  # Each train workdir keeps its resolved config: the recipe reruns from it.
  for train_dir, itc_weight in (("train", 1.0), ("train-paper", 0.0)):
    rerun = load_config(f"configs/item_converted.py:{workdir / train_dir}")
    assert rerun.objectives.itc_weight == itc_weight
    assert rerun.total_steps == 2
