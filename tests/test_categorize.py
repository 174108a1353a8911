"""`item-jax categorize`: the saved categorizer against the in-memory probe and
k-NN, the CSV, reusing and refitting, safe files, user errors."""

import csv
import json
import logging
import os
import shutil

import numpy as np
import pytest

from train_helpers import tiny_settings
from item_jax.cli import main
from item_jax.errors import MissingInputError, UserError
from item_jax.eval.categorize import (build_categorizer, categorize_command,
                                      load_categorizer)
from item_jax.eval.embed import (Embedder, embed_split, eval_batch_size,
                                 load_model, read_split, write_embeddings)
from item_jax.eval.metrics import fit_probe, knn_predict, linear_probe
from item_jax.train.loop import train


@pytest.fixture(scope="module")
def run(prepared_catalogue, tmp_path_factory):
  """(data dir, workdir) of a 4-step run (checkpoints at steps 3 and 4)."""
  data_dir = str(prepared_catalogue[1])
  workdir = tmp_path_factory.mktemp("categorized_run")
  train(tiny_settings(data_dir, "--config.total_steps=4"), str(workdir))
  return data_dir, workdir


@pytest.fixture(scope="module")
def embedded(run, tmp_path_factory):
  """The step-4 "both" embeddings of the train and test splits, and the test
  ones written as `item-jax embed` writes them."""
  data_dir, workdir = run
  loaded = load_model(str(workdir), data_dir=data_dir)
  embedder = Embedder.of(loaded, views=("both",))
  batch_size = eval_batch_size(embedder)   # as categorize's: the same rows
  splits = {split: embed_split(read_split(data_dir, split, loaded.settings, batch_size),
                               {"model": (embedder, loaded.params)})
            for split in ("train", "test")}
  rows = {split: result.outputs[("model", "both")] for split, result in splits.items()}
  base = tmp_path_factory.mktemp("embeddings") / "test"
  write_embeddings(str(base), rows["test"], splits["test"], {
      "workdir": str(workdir), "step": loaded.step, "split": "test",
      "modality": "both"})
  categories = json.loads(open(f"{data_dir}/dataset.json").read())["categories"]
  return {"splits": splits, "rows": rows, "file": str(base), "step": loaded.step,
          "categories": categories}


def _labels(embedded, split):
  labels = embedded["splits"][split].category_ids.copy()
  if split == "train":
    labels[::7] = -1   # some unlabelled listings: left out of every fit
  return labels


def test_saved_probe_predicts_as_the_in_memory_probe(embedded, tmp_path):
  train_rows, test_rows = embedded["rows"]["train"], embedded["rows"]["test"]
  labels, categories = _labels(embedded, "train"), embedded["categories"]
  build_categorizer("probe", train_rows, labels, categories).save(
      tmp_path / "categorizer")
  saved = load_categorizer(tmp_path)
  probabilities = saved.predict_proba(test_rows)
  assert probabilities.shape == (len(test_rows), len(categories))
  np.testing.assert_array_equal(
      np.argmax(probabilities, axis=1),
      linear_probe(train_rows, labels, test_rows, len(categories)))
  in_memory = fit_probe(train_rows, labels, len(categories))
  np.testing.assert_allclose(probabilities, in_memory.predict_proba(test_rows),
                             rtol=0, atol=1e-5)
  # Categories absent from the fit get 0.
  unseen = np.setdiff1d(np.arange(len(categories)), labels[labels >= 0])
  assert np.all(probabilities[:, unseen] == 0)


def test_binary_and_single_category_probes(tmp_path):
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((60, 8)).astype(np.float32)
  labels = np.where(rows[:, 0] + 0.3 * rng.standard_normal(60) > 0, 2, 0)
  categories = ["a", "b", "c"]
  build_categorizer("probe", rows, labels, categories).save(tmp_path / "categorizer")
  saved = load_categorizer(tmp_path)   # sklearn's sigmoid as a two-row softmax
  np.testing.assert_allclose(saved.predict_proba(rows),
                             fit_probe(rows, labels, 3).predict_proba(rows),
                             rtol=0, atol=1e-5)
  one = build_categorizer("probe", rows, np.full(60, 1), categories)
  indices, probabilities = one.top_k(rows[:4], k=2)
  assert indices[:, 0].tolist() == [1] * 4 and probabilities[:, 0].tolist() == [1.0] * 4
  assert probabilities[:, 1].tolist() == [0.0] * 4


def test_saved_knn_votes_as_knn_predict(embedded, tmp_path):
  train_rows, test_rows = embedded["rows"]["train"], embedded["rows"]["test"]
  labels, categories = _labels(embedded, "train"), embedded["categories"]
  build_categorizer("knn", train_rows, labels, categories, knn_k=5).save(
      tmp_path / "categorizer")
  saved = load_categorizer(tmp_path)
  assert set(saved.tensors) == {"index", "labels"}
  assert len(saved.tensors["index"]) == int(np.sum(labels >= 0))
  indices, probabilities = saved.top_k(test_rows, k=len(categories))
  np.testing.assert_array_equal(indices[:, 0],
                                knn_predict(train_rows, labels, test_rows, k=5))
  np.testing.assert_array_equal(saved.predict(test_rows), indices[:, 0])
  # Vote shares: fifths, summing to 1, in the categorizer's order.
  np.testing.assert_allclose(probabilities * 5, np.round(probabilities * 5), atol=1e-9)
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0)
  assert np.all(np.diff(probabilities, axis=1) <= 0)
  np.testing.assert_allclose(
      np.take_along_axis(saved.predict_proba(test_rows), indices, axis=1),
      probabilities)


@pytest.fixture(scope="module")
def categorized(run, tmp_path_factory):
  """The first `categorize_command` on the run: fits and saves the probe."""
  data_dir, workdir = run
  output = tmp_path_factory.mktemp("predictions") / "test.csv"
  summary = categorize_command(str(workdir), str(output), data_dir=data_dir,
                               split="test", k=3)
  return summary, output


def _read_csv(path):
  with open(path, newline="") as file:
    reader = csv.reader(file)
    assert next(reader) == ["item_id", "rank", "category", "probability"]
    by_item = {}
    for item_id, rank, category, probability in reader:
      by_item.setdefault(item_id, []).append((int(rank), category, float(probability)))
  return by_item


def test_categorize_writes_k_ranked_categories_per_listing(run, embedded, categorized):
  data_dir, workdir = run
  summary, output = categorized
  assert summary["fitted"] and summary["step"] == 4 and summary["k"] == 3
  test_ids = embedded["splits"]["test"].item_ids.tolist()
  by_item = _read_csv(output)
  assert list(by_item) == test_ids and summary["count"] == len(test_ids)
  categories = embedded["categories"]
  for rows in by_item.values():
    assert [rank for rank, _, _ in rows] == [1, 2, 3]
    probabilities = [p for _, _, p in rows]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) <= 1 + 1e-6
    assert all(category in categories for _, category, _ in rows)
  # The saved categorizer on the same embeddings gives the same rows.
  indices, probabilities = load_categorizer(workdir).top_k(embedded["rows"]["test"])
  for item_id, row, values in zip(test_ids, indices, probabilities):
    assert [category for _, category, _ in by_item[item_id]] == [categories[i] for i in row]
    np.testing.assert_allclose([p for _, _, p in by_item[item_id]], values, atol=6e-7)


def test_the_categorizer_is_saved_in_safe_formats(run, embedded, categorized):
  data_dir, workdir = run
  folder = workdir / "categorizer"
  assert sorted(os.listdir(folder)) == ["categorizer.json", "categorizer.safetensors"]
  for name in os.listdir(folder):
    assert not open(folder / name, "rb").read(2).startswith(b"\x80")  # no pickle
  info = json.loads((folder / "categorizer.json").read_text())
  dataset = json.loads(open(f"{data_dir}/dataset.json").read())
  assert info["method"] == "probe" and info["view"] == "both" and info["step"] == 4
  assert info["categories"] == dataset["categories"] == embedded["categories"]
  assert info["data_dir"] == os.path.realpath(data_dir)
  assert info["fit_split"] == "train"
  assert info["tokenizer"] == os.path.realpath(f"{data_dir}/{dataset['tokenizer']}")
  assert info["num_fit_listings"] == dataset["splits"]["train"]["count"]
  assert len(info["features"]["mean"]) == info["dim"] == 64
  assert info["features"]["scale"] > 0
  if dataset["splits"].get("validation", {}).get("count"):
    assert info["validation"]["split"] == "validation"
    assert 0.0 <= info["validation"]["accuracy"] <= 1.0
  tensors = load_categorizer(workdir).tensors
  assert {name: str(value.dtype) for name, value in tensors.items()} == {
      "weights": "float32", "bias": "float32", "classes": "int64"}


def test_a_second_categorize_reuses_the_categorizer_and_refit_refits(
    run, embedded, categorized, tmp_path, caplog, capsys):
  data_dir, workdir = run
  saved = workdir / "categorizer" / "categorizer.safetensors"
  before = os.stat(saved).st_mtime_ns
  num_categories = len(embedded["categories"])
  output = tmp_path / "all.csv"
  with caplog.at_level(logging.INFO):
    main(["categorize", "--workdir", str(workdir), "--embeddings", embedded["file"],
          "--output", str(output), "--k", str(num_categories + 5)])
  assert "reusing the categorizer" in caplog.text
  assert "categorizer reused" in capsys.readouterr().out
  assert os.stat(saved).st_mtime_ns == before
  by_item = _read_csv(output)   # k capped at the categories: the whole distribution
  assert len(by_item) == len(embedded["rows"]["test"])
  for rows in by_item.values():
    assert [rank for rank, _, _ in rows] == list(range(1, num_categories + 1))
    assert abs(sum(p for _, _, p in rows) - 1) <= num_categories * 5e-7 + 1e-9

  # An embeddings file the categorizer does not fit: a clear error.
  short = tmp_path / "short"
  write_embeddings(str(short), embedded["rows"]["test"][:, :10],
                   embedded["splits"]["test"],
                   {"workdir": str(workdir), "step": 4, "modality": "both"})
  with pytest.raises(UserError, match="takes 64 dimensions"):
    categorize_command(str(workdir), str(tmp_path / "x.csv"), embeddings=str(short))
  assert os.stat(saved).st_mtime_ns == before

  summary = categorize_command(str(workdir), str(output), embeddings=embedded["file"],
                               refit=True)
  assert summary["fitted"] and os.stat(saved).st_mtime_ns != before

  # Another method is another categorizer: k-NN, fitted on the same data.
  output = tmp_path / "knn.csv"
  summary = categorize_command(str(workdir), str(output), embeddings=embedded["file"],
                               method="knn", knn_k=5)
  assert summary["fitted"]
  info = json.loads((workdir / "categorizer" / "categorizer.json").read_text())
  assert info["method"] == "knn" and info["knn_k"] == 5
  assert info["data_dir"] == os.path.realpath(data_dir)
  expected = knn_predict(embedded["rows"]["train"],
                         embedded["splits"]["train"].category_ids,
                         embedded["rows"]["test"], k=5)
  by_item = _read_csv(output)
  assert [rows[0][1] for rows in by_item.values()] == [
      embedded["categories"][label] for label in expected]


def test_embeddings_of_another_step_or_run_are_refused(run, embedded, tmp_path):
  data_dir, workdir = run
  for meta, message in (({"workdir": str(workdir), "step": 3}, "of step 3"),
                        ({"workdir": str(tmp_path), "step": 4}, "come from the run")):
    base = tmp_path / f"step{meta['step']}"
    write_embeddings(str(base), embedded["rows"]["test"], embedded["splits"]["test"],
                     {**meta, "modality": "both"})
    with pytest.raises(UserError, match=message):
      categorize_command(str(workdir), str(tmp_path / "x.csv"), embeddings=str(base))


def test_user_errors_are_one_line_and_exit_2(run, tmp_path, capsys):
  data_dir, workdir = run
  unlabelled = tmp_path / "unlabelled"
  unlabelled.mkdir()
  info = json.loads(open(f"{data_dir}/dataset.json").read())
  (unlabelled / "dataset.json").write_text(json.dumps({**info, "categories": []}))
  shutil.copy(f"{data_dir}/{info['tokenizer']}", unlabelled / info["tokenizer"])
  for argv, message in (
      (["--workdir", str(workdir), "--data", str(unlabelled)],
       f"no listing of {unlabelled}/train has a category: categorize needs "
       "labelled listings"),
      (["--workdir", str(tmp_path / "nothing"), "--data", data_dir],
       "no training run")):
    with pytest.raises(SystemExit) as exit_info:
      main(["categorize", *argv, "--output", str(tmp_path / "out.csv")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("item-jax categorize: error:")
    assert message in lines[0]
  assert not (tmp_path / "out.csv").exists()


def test_a_hybrid_probe_reads_the_words_beside_the_embedding(tmp_path):
  # Categories that only the titles tell apart: the embeddings are noise.
  rng = np.random.default_rng(0)
  words = ["kurta", "sneaker", "saree"]
  def listings(count):
    labels = rng.integers(0, 3, size=count)
    titles = [f"{rng.choice(['blue', 'red', 'green'])} {words[label]} "
              f"size {rng.integers(30, 46)}" for label in labels]
    return rng.standard_normal((count, 8)).astype(np.float32), labels, titles
  rows, labels, titles = listings(90)
  test_rows, test_labels, test_titles = listings(40)
  categories = ["kurtas", "sneakers", "sarees"]
  embedding_only = build_categorizer("probe", rows, labels, categories)
  hybrid = build_categorizer("probe", rows, labels, categories, titles=titles,
                             features="hybrid")
  assert np.mean(hybrid.predict(test_rows, test_titles) == test_labels) == 1.0
  assert np.mean(embedding_only.predict(test_rows) == test_labels) < 0.6
  with pytest.raises(ValueError, match="pass one title per row"):
    hybrid.predict(test_rows)
  with pytest.raises(UserError, match="takes --method probe"):
    build_categorizer("knn", rows, labels, categories, titles=titles,
                      features="hybrid")
  with pytest.raises(UserError, match="none of the 90 listings .* has one"):
    build_categorizer("probe", rows, labels, categories, titles=[""] * 90,
                      features="hybrid")


def test_a_saved_hybrid_probe_predicts_as_the_in_memory_one(embedded, tmp_path):
  from item_jax.eval.fusion import FittedTfidf
  train, test = embedded["splits"]["train"], embedded["splits"]["test"]
  train_rows, test_rows = embedded["rows"]["train"], embedded["rows"]["test"]
  labels, categories = _labels(embedded, "train"), embedded["categories"]
  build_categorizer("probe", train_rows, labels, categories, titles=train.titles,
                    features="hybrid").save(tmp_path / "categorizer")
  folder = tmp_path / "categorizer"
  assert sorted(os.listdir(folder)) == ["categorizer.json", "categorizer.ngrams.json",
                                        "categorizer.safetensors"]
  saved = load_categorizer(tmp_path)
  ngrams = json.loads((folder / "categorizer.ngrams.json").read_text())
  assert saved.info["feature_kind"] == "hybrid" and saved.lexical.ngrams == ngrams
  assert saved.tensors["weights"].shape[1] == 64 + len(ngrams)
  # The same fit in memory: TF-IDF fitted on the labelled training titles.
  fit_titles = [title for title, label in zip(train.titles, labels) if label >= 0]
  words = FittedTfidf.fit(fit_titles)
  assert words.ngrams == ngrams
  in_memory = fit_probe((train_rows, words.transform(train.titles)), labels,
                        len(categories))
  np.testing.assert_allclose(
      saved.predict_proba(test_rows, test.titles),
      in_memory.predict_proba((test_rows, words.transform(test.titles))),
      rtol=0, atol=1e-5)
  # n-grams that do not fit the weights (a save cut short): refit, not a mix.
  (folder / "categorizer.ngrams.json").write_text(json.dumps(ngrams[:-1]))
  with pytest.raises(MissingInputError, match="do not fit together .* --refit"):
    load_categorizer(tmp_path)


def test_categorize_features_hybrid_refits_and_reads_the_embedded_titles(
    run, embedded, tmp_path, capsys):
  data_dir, workdir = run
  output = tmp_path / "hybrid.csv"
  main(["categorize", "--workdir", str(workdir), "--embeddings", embedded["file"],
        "--output", str(output), "--features", "hybrid", "--fit-data", data_dir])
  assert "probe, hybrid" in capsys.readouterr().out
  saved = load_categorizer(workdir)
  assert saved.info["feature_kind"] == "hybrid"
  # The words' weight, chosen on the validation split.
  tried = saved.info["features"]["tfidf_balances_tried"]
  assert sorted(tried, key=float) == ["1.0", "2.0", "4.0", "8.0"]
  assert tried[str(saved.info["features"]["tfidf_balance"])] == max(tried.values())
  test = embedded["splits"]["test"]
  indices, _ = saved.top_k(embedded["rows"]["test"], 3, test.titles)
  by_item = _read_csv(output)
  assert [[category for _, category, _ in rows] for rows in by_item.values()] == [
      [embedded["categories"][i] for i in row] for row in indices]
  # One saved before the words' weight was chosen is refitted, not reused.
  info_path = workdir / "categorizer" / "categorizer.json"
  info = json.loads(info_path.read_text())
  del info["features"]["tfidf_balance"]
  info_path.write_text(json.dumps(info))
  summary = categorize_command(str(workdir), str(output), embeddings=embedded["file"],
                               features="hybrid", fit_data=data_dir)
  assert summary["fitted"]
  assert "tfidf_balance" in json.loads(info_path.read_text())["features"]
  # Asking for the embedding alone again is another categorizer.
  summary = categorize_command(str(workdir), str(output), embeddings=embedded["file"])
  assert summary["fitted"] and load_categorizer(workdir).lexical is None
  assert sorted(os.listdir(workdir / "categorizer")) == [
      "categorizer.json", "categorizer.safetensors"]
  assert not (workdir / "categorizer" / "categorizer.json").read_text().count('"hybrid"')
  with pytest.raises(SystemExit) as exit_info:
    main(["categorize", "--workdir", str(workdir), "--embeddings", embedded["file"],
          "--output", str(output), "--features", "hybrid", "--method", "knn"])
  assert exit_info.value.code == 2
  assert "takes --method probe" in capsys.readouterr().err
