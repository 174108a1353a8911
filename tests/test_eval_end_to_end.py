"""Evaluation end to end on the tiny prepared catalogue: evaluation during
training, `item-jax eval` (report.json, report.md, plots, TensorBoard),
`--compare`, and `item-jax embed`."""

import json

import numpy as np
import pytest

from train_helpers import tensorboard_scalars, tiny_settings
from item_jax.cli import main
from item_jax.eval import evaluate as evaluate_lib
from item_jax.eval.evaluate import ENTRIES, PeriodicRetrieval
from item_jax.eval.report import eval_command
from item_jax.train.loop import train

IN_UNIT_RANGE = ("macro_recall@10", "map@10", "knn_accuracy", "probe_accuracy",
                 "recall@1", "macro_map@5", "knn_macro_f1", "probe_macro_f1")


@pytest.fixture(scope="module")
def run(prepared_catalogue, tmp_path_factory):
  """(data dir, workdir) of a 4-step run evaluated every 2 steps."""
  data_dir = str(prepared_catalogue[1])
  workdir = tmp_path_factory.mktemp("evaluated")
  train(tiny_settings(data_dir, "--config.total_steps=4",
                      "--config.eval_every_steps=2",
                      "--config.eval_num_examples=30"), str(workdir),
        evaluator=PeriodicRetrieval)
  return data_dir, workdir


def test_training_evaluates_retrieval_periodically(run):
  _, workdir = run
  for view in ("both", "title", "image"):
    written = tensorboard_scalars(workdir, f"eval/{view}/macro_recall@10")
    assert sorted(written) == [2, 4]
    assert all(0.0 <= value <= 1.0 for value in written.values())
  assert set(tensorboard_scalars(workdir, "eval/num_queries").values()) <= set(range(2, 31))


def test_eval_writes_the_report(run, capsys):
  data_dir, workdir = run
  main(["eval", "--workdir", str(workdir), "--data", data_dir,
        "--probe-steps", "20", "--knn-k", "3"])
  printed = capsys.readouterr().out
  assert "ITEm, title + image" in printed and "report.md" in printed
  report = json.loads((workdir / "eval" / "report.json").read_text())
  dataset = json.loads(open(f"{data_dir}/dataset.json").read())
  assert report["meta"]["step"] == 4
  assert report["meta"]["num_test_listings"] == dataset["splits"]["test"]["count"]
  assert report["meta"]["num_train_listings"] == dataset["splits"]["train"]["count"]
  for entry in ENTRIES:
    for name in IN_UNIT_RANGE:
      assert 0.0 <= report[entry][name] <= 1.0, (entry, name)
    assert report[entry]["num_queries"] > 0
    assert report[entry]["recall@1"] <= report[entry]["recall@5"] <= report[entry]["recall@10"]
  for entry in ("both", "random_init"):
    assert 0.0 < report[entry]["image_attention_share"] < 1.0
    assert 0.0 < report[entry]["image_token_share"] < 1.0
  # TF-IDF on titles that share brand and model code finds the same product.
  assert report["tfidf"]["macro_recall@10"] > 0.5
  markdown = (workdir / "eval" / "report.md").read_text()
  assert "## Headline" in markdown and "![headline.png](headline.png)" in markdown
  for plot in ("headline.png", "recall_at_k.png"):
    assert (workdir / "eval" / plot).read_bytes()[:4] == b"\x89PNG"
  written = tensorboard_scalars(workdir / "eval", "eval/tfidf/map@10")
  assert written == {4: pytest.approx(report["tfidf"]["map@10"])}


def test_compare_puts_workdirs_side_by_side(run, tmp_path, monkeypatch):
  data_dir, workdir = run
  report = json.loads((workdir / "eval" / "report.json").read_text())
  ablation = tmp_path / "ablation"
  (ablation / "eval").mkdir(parents=True)
  other = {**report, "meta": {**report["meta"], "step": 123}}
  (ablation / "eval" / "report.json").write_text(json.dumps(other))
  # The workdir itself is not re-evaluated here: its report stands in.
  monkeypatch.setattr(evaluate_lib, "evaluate", lambda *args, **kwargs: report)
  _, paths, compared = eval_command(str(workdir), data_dir, [str(ablation)])
  assert list(compared) == [str(workdir), str(ablation)]
  comparison = open(paths["markdown"]).read().split("## Comparison")[1]
  assert str(ablation) in comparison and "| 123 | both |" in comparison


def test_embed_writes_one_view_with_its_ids(run, tmp_path):
  data_dir, workdir = run
  output = tmp_path / "embeddings" / "test"
  main(["embed", "--workdir", str(workdir), "--data", data_dir, "--split", "test",
        "--output", str(output), "--step", "3", "--modality", "title"])
  embeddings = np.load(f"{output}.npy")
  ids = json.loads(open(f"{output}.ids.json").read())
  assert ids["step"] == 3 and ids["modality"] == "title"
  assert embeddings.shape == (len(ids["item_id"]), 64)
  assert len(set(ids["item_id"])) == len(ids["item_id"]) == len(ids["product_id"])
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
