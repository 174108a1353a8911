"""`item-jax neighbours --rank-by lexical|hybrid`: TF-IDF and the fused score,
exact against a brute-force numpy search, resumable, with its errors."""

import json

import numpy as np
import pytest

from item_jax.cli import main
from item_jax.errors import UserError
from item_jax.eval.fusion import (HybridIndex, hybrid_blocks, lexical_name,
                                  lexical_side, lexical_vectorizer,
                                  reciprocal_rank_fusion, rrf_blocks,
                                  tfidf_features, tfidf_vectorizer)
from item_jax.eval.neighbours import neighbours_command

WORDS = "red blue black steel cotton lamp mug shirt kettle cable".split()


def _listings(rows: int, seed: int):
  """Unit embeddings and titles with model codes that only the words share."""
  rng = np.random.default_rng(seed)
  vectors = rng.normal(size=(rows, 8)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  titles = [" ".join(rng.choice(WORDS, 3)) + f" KX-{rng.integers(0, 30)}"
            for _ in range(rows)]
  titles[3] = ""   # a listing without a title: its embedding alone
  return vectors, titles


def _write(path, vectors, titles, **meta) -> str:
  np.save(f"{path}.npy", vectors)
  ids = {**meta, "item_id": [f"{path.name}-{row}" for row in range(len(vectors))],
         "title": titles}
  (path.parent / f"{path.name}.ids.json").write_text(json.dumps(ids))
  return str(path)


def _reference_scores(queries, query_titles, index, index_titles, weight,
                      lexical="char:2-4"):
  titles = {"queries": query_titles} if index is None else {
      "queries": query_titles, "index": index_titles}
  tfidf = tfidf_features(titles, lexical=lexical)
  q_tfidf = tfidf["queries"].toarray().astype(np.float64)
  i_tfidf = q_tfidf if index is None else tfidf["index"].toarray().astype(np.float64)
  i_dense = queries if index is None else index
  scores = (weight * queries.astype(np.float64) @ i_dense.astype(np.float64).T
            + (1 - weight) * q_tfidf @ i_tfidf.T)
  if index is None:
    np.fill_diagonal(scores, -np.inf)
  return scores


@pytest.mark.parametrize("weight, self_search, lexical", [
    (0.4, True, "char:2-4"), (0.0, True, "char:2-4"), (0.7, False, "char:2-4"),
    (0.0, True, "char_wb:3-3"), (0.5, False, "char_wb:2-4")])
def test_blocks_are_the_exact_fused_top_k(weight, self_search, lexical):
  queries, query_titles = _listings(57, 0)
  index, index_titles = (None, None) if self_search else _listings(33, 1)
  reference = _reference_scores(queries, query_titles, index, index_titles, weight,
                                lexical)
  k = 5
  rows = 0
  for first, scores, indices in hybrid_blocks(queries, query_titles, index,
                                              index_titles, k, weight,
                                              block_rows=10, start_row=10,
                                              lexical=lexical):
    for row in range(scores.shape[0]):
      expected = np.sort(reference[first + row])[::-1][:k]
      np.testing.assert_allclose(scores[row], expected, atol=1e-5)
      # The rows named score what they are said to score.
      np.testing.assert_allclose(reference[first + row, indices[row]], scores[row],
                                 atol=1e-5)
      if self_search:
        assert first + row not in indices[row]
    rows += scores.shape[0]
  assert rows == 57 - 10


@pytest.fixture
def files(tmp_path):
  queries, titles = _listings(61, 2)
  return {"path": _write(tmp_path / "listings", queries, titles,
                         workdir=str(tmp_path / "run"), modality="both"),
          "tmp": tmp_path}


def test_a_hybrid_run_resumes_to_the_same_bytes(files):
  tmp = files["tmp"]
  whole = neighbours_command(files["path"], str(tmp / "whole.csv"), k=4,
                             block_rows=9, rank_by="hybrid", fusion_weight=0.3)
  assert whole["complete"] and whole["fusion_weight"] == 0.3
  first = neighbours_command(files["path"], str(tmp / "resumed.csv"), k=4,
                             block_rows=9, rank_by="hybrid", fusion_weight=0.3,
                             max_blocks=2)
  assert not first["complete"]
  # Another weight is another table: it starts afresh.
  other = neighbours_command(files["path"], str(tmp / "resumed.csv"), k=4,
                             block_rows=9, rank_by="hybrid", fusion_weight=0.6,
                             max_blocks=1)
  assert other["resumed_at"] == 0
  neighbours_command(files["path"], str(tmp / "resumed.csv"), k=4, block_rows=9,
                     rank_by="hybrid", fusion_weight=0.3, max_blocks=2)
  last = neighbours_command(files["path"], str(tmp / "resumed.csv"), k=4,
                            block_rows=5, rank_by="hybrid", fusion_weight=0.3)
  assert last["resumed_at"] == 18 and last["complete"]
  assert (tmp / "resumed.csv").read_bytes() == (tmp / "whole.csv").read_bytes()
  # So is another lexical side.
  wb = neighbours_command(files["path"], str(tmp / "resumed.csv"), k=4,
                          block_rows=9, rank_by="hybrid", fusion_weight=0.3,
                          lexical="char_wb:3-3")
  assert wb["resumed_at"] == 0 and wb["lexical"] == "char_wb:3-3"
  assert (tmp / "resumed.csv").read_bytes() != (tmp / "whole.csv").read_bytes()
  embedding = neighbours_command(files["path"], str(tmp / "dense.csv"), k=4)
  assert embedding["rank_by"] == "embedding"
  assert (tmp / "dense.csv").read_bytes() != (tmp / "whole.csv").read_bytes()


@pytest.mark.parametrize("arguments, message", [
    (dict(rank_by="hybrid"), "needs a fusion weight"),
    (dict(rank_by="hybrid", fusion_weight=1.5), "must be in \\[0, 1\\]"),
    (dict(rank_by="lexical", fusion_weight=0.5), "needs --rank-by hybrid"),
    (dict(fusion_weight=0.5), "needs --rank-by hybrid"),
    (dict(rank_by="words"), "rank_by must be one of"),
    (dict(rank_by="lexical", lexical="word:1-2"), "expected ANALYZER:LOW-HIGH"),
    (dict(rank_by="rrf", lexical="char:4-2"), "1 <= LOW <= HIGH <= 8"),
])
def test_bad_rankings_are_named(files, arguments, message):
  with pytest.raises(UserError, match=message):
    neighbours_command(files["path"], str(files["tmp"] / "out.csv"), **arguments)


def test_files_without_titles_are_named(tmp_path):
  vectors, _ = _listings(8, 3)
  np.save(tmp_path / "old.npy", vectors)
  (tmp_path / "old.ids.json").write_text(json.dumps(
      {"item_id": [str(row) for row in range(8)]}))
  with pytest.raises(UserError, match="old.ids.json has no `title` list"):
    neighbours_command(str(tmp_path / "old"), str(tmp_path / "out.csv"),
                       rank_by="lexical")


def test_the_command_takes_the_weight_eval_fitted(files, capsys):
  tmp = files["tmp"]
  output = str(tmp / "out.csv")
  command = ["neighbours", "--embeddings", files["path"], "--k", "3",
             "--rank-by", "hybrid", "--output", output]
  with pytest.raises(SystemExit) as raised:
    main(command)
  assert raised.value.code == 2
  assert "needs a fusion weight" in capsys.readouterr().err
  (tmp / "run" / "eval").mkdir(parents=True)
  (tmp / "run" / "eval" / "report.json").write_text(json.dumps(
      {"both+tfidf": {"fusion_weight": 0.3}}))
  main(command)
  assert "ranked by hybrid (w = 0.3)" in capsys.readouterr().out
  by_hand = str(tmp / "by_hand.csv")
  neighbours_command(files["path"], by_hand, k=3, rank_by="hybrid",
                     fusion_weight=0.3)
  assert open(output).read() == open(by_hand).read()
  # The weight goes with the lexical side it was fitted with.
  (tmp / "run" / "eval" / "report.json").write_text(json.dumps(
      {"both+tfidf": {"fusion_weight": 0.3}, "meta": {"lexical": "char_wb:3-3"}}))
  main(command)
  assert "(w = 0.3), lexical side char_wb:3-3" in capsys.readouterr().out
  neighbours_command(files["path"], by_hand, k=3, rank_by="hybrid",
                     fusion_weight=0.3, lexical="char_wb:3-3")
  assert open(output).read() == open(by_hand).read()
  with pytest.raises(SystemExit) as raised:
    main(["neighbours", "--embeddings", files["path"], "--output", output,
          "--lexical", "char_wb:3-3"])
  assert raised.value.code == 2
  assert "--lexical needs --rank-by lexical, hybrid or rrf" in capsys.readouterr().err
  with pytest.raises(SystemExit) as raised:
    main(command + ["--lexical", "words:1"])
  assert raised.value.code == 2
  assert "--lexical: lexical side 'words:1': expected" in capsys.readouterr().err
  main(command + ["--lexical", "char_wb:3"])   # the same side, spelt short
  assert "lexical side char_wb:3-3" in capsys.readouterr().out
  with pytest.raises(SystemExit) as raised:
    main(command + ["--lexical", "char:2-4"])
  assert raised.value.code == 2
  assert "fitted the fusion weight 0.3 with the lexical side char_wb:3-3" in (
      capsys.readouterr().err)


def test_lexical_sides_within_and_across_words():
  assert lexical_side() == ("char", (2, 4))
  assert lexical_side("char_wb:3") == ("char_wb", (3, 3))
  assert lexical_name("char_wb:3") == "char_wb:3-3"
  across = lexical_vectorizer("char:3-3").build_analyzer()("Ab  c")
  within = lexical_vectorizer("char_wb:3-3").build_analyzer()("Ab  c")
  assert "b c" in across and " ab" in across
  assert sorted(within) == [" ab", " c ", "ab "]
  for bad in ("char", "char:x-3", "words:1-2", "char_wb:0-2", "char:2-9", "char:2-",
              "char: 2-4"):
    with pytest.raises(ValueError, match="expected ANALYZER:LOW-HIGH"):
      lexical_side(bad)


def test_the_python_index_ranks_new_listings_by_the_fused_score():
  index_vectors, index_titles = _listings(40, 4)
  queries, query_titles = _listings(7, 5)
  query_titles[2] = None      # no title: the embedding's part alone
  index = HybridIndex(index_vectors, index_titles, weight=0.6)
  scores, rows = index.search(queries, query_titles, k=4)
  vectorizer = tfidf_vectorizer().fit(index_titles)
  words = (vectorizer.transform([t or "" for t in query_titles])
           @ vectorizer.transform(index_titles).T).toarray()
  reference = 0.6 * queries.astype(np.float64) @ index_vectors.T + 0.4 * words
  for row in range(7):
    np.testing.assert_allclose(scores[row], np.sort(reference[row])[::-1][:4],
                               atol=1e-5)
    np.testing.assert_allclose(reference[row, rows[row]], scores[row], atol=1e-5)
  with pytest.raises(ValueError, match="7 embeddings but 6 titles"):
    index.search(queries, query_titles[:6], k=4)
  # Another lexical side: its own n-grams.
  index = HybridIndex(index_vectors, index_titles, weight=0.6, lexical="char_wb:3-4")
  vectorizer = lexical_vectorizer("char_wb:3-4").fit(index_titles)
  words = (vectorizer.transform([t or "" for t in query_titles])
           @ vectorizer.transform(index_titles).T).toarray()
  reference = 0.6 * queries.astype(np.float64) @ index_vectors.T + 0.4 * words
  scores, rows = index.search(queries, query_titles, k=4)
  np.testing.assert_allclose(scores, np.sort(reference, axis=1)[:, ::-1][:, :4],
                             atol=1e-5)
  # With a photo model's rows: the three weights, as `fuse_blocks` takes them.
  index_photos, query_photos = _photos(len(index_vectors), 11), _photos(len(queries), 12)
  three = HybridIndex(index_vectors, index_titles, weight=(0.3, 0.3, 0.4),
                      lexical="char_wb:3-4", photos=index_photos)
  reference = (0.3 * queries.astype(np.float64) @ index_vectors.T
               + 0.3 * query_photos.astype(np.float64) @ index_photos.T + 0.4 * words)
  scores, rows = three.search(queries, query_titles, k=4, photos=query_photos)
  np.testing.assert_allclose(scores, np.sort(reference, axis=1)[:, ::-1][:, :4],
                             atol=1e-5)
  np.testing.assert_allclose(np.take_along_axis(reference, rows, axis=1), scores,
                             atol=1e-5)
  with pytest.raises(ValueError, match="need photo rows exactly when"):
    three.search(queries, query_titles, k=4)
  with pytest.raises(ValueError, match="photo rows go with three weights"):
    HybridIndex(index_vectors, index_titles, weight=0.3, photos=index_photos)


def _reference_rrf(dense: np.ndarray, words: np.ndarray, k: int, depth: int,
                   constant: int = 60):
  """Reciprocal rank fusion by brute force: each side's full ranking (score
  descending, ties to the lower row) cut at `depth`, zero scores unranked."""
  fused = {}
  for side in (dense, words):
    order = sorted(range(len(side)), key=lambda row: (-side[row], row))
    for rank, row in enumerate(order[:depth], start=1):
      if side[row] != 0 and np.isfinite(side[row]):
        fused[row] = fused.get(row, 0.0) + 1.0 / (constant + rank)
  best = sorted(fused, key=lambda row: (-fused[row], row))[:k]
  return [fused[row] for row in best], best


def test_reciprocal_rank_fusion_against_brute_force():
  queries, query_titles = _listings(23, 6)
  index, index_titles = _listings(31, 7)
  tfidf = tfidf_features({"queries": query_titles, "index": index_titles})
  dense = queries.astype(np.float64) @ index.T.astype(np.float64)
  words = (tfidf["queries"] @ tfidf["index"].T).toarray()
  k, depth = 5, 8
  for first, scores, indices in rrf_blocks(queries, query_titles, index, index_titles,
                                           k, block_rows=6, depth=depth):
    for row in range(scores.shape[0]):
      expected_scores, expected_rows = _reference_rrf(
          dense[first + row], words[first + row], k, depth)
      assert list(indices[row][:len(expected_rows)]) == expected_rows
      np.testing.assert_allclose(scores[row][:len(expected_rows)], expected_scores,
                                 rtol=1e-6)
      assert np.all(indices[row][len(expected_rows):] == -1)
  # A listing both sides rank first beats one that only one side ranks first.
  rankings = [(np.array([[0.9, 0.5]]), np.array([[4, 2]])),
              (np.array([[0.8, 0.0]]), np.array([[2, 7]]))]
  scores, indices = reciprocal_rank_fusion(rankings, 3)
  assert list(indices[0]) == [2, 4, -1]   # row 7's zero score counts for nothing
  np.testing.assert_allclose(scores[0][:2], [1 / 62 + 1 / 61, 1 / 61])


def test_an_rrf_run_resumes_to_the_same_bytes(files, capsys):
  tmp = files["tmp"]
  whole = neighbours_command(files["path"], str(tmp / "whole.csv"), k=4,
                             block_rows=9, rank_by="rrf")
  assert whole["complete"] and whole["fusion_weight"] is None
  neighbours_command(files["path"], str(tmp / "resumed.csv"), k=4, block_rows=9,
                     rank_by="rrf", max_blocks=2)
  last = neighbours_command(files["path"], str(tmp / "resumed.csv"), k=4,
                            block_rows=9, rank_by="rrf")
  assert last["resumed_at"] == 18
  assert (tmp / "resumed.csv").read_bytes() == (tmp / "whole.csv").read_bytes()
  neighbours_command(files["path"], str(tmp / "hybrid.csv"), k=4,
                     rank_by="hybrid", fusion_weight=0.5)
  assert (tmp / "hybrid.csv").read_bytes() != (tmp / "whole.csv").read_bytes()
  main(["neighbours", "--embeddings", files["path"], "--k", "3", "--rank-by", "rrf",
        "--output", str(tmp / "cli.csv")])
  assert "ranked by rrf" in capsys.readouterr().out


def test_the_python_index_ranks_by_rrf_without_a_weight():
  index_vectors, index_titles = _listings(40, 8)
  queries, query_titles = _listings(6, 9)
  index = HybridIndex(index_vectors, index_titles, weight=None, depth=12)
  scores, rows = index.search(queries, query_titles, k=5)
  vectorizer = tfidf_vectorizer().fit(index_titles)
  words = (vectorizer.transform(query_titles) @ vectorizer.transform(index_titles).T).toarray()
  dense = queries.astype(np.float64) @ index_vectors.T.astype(np.float64)
  for row in range(6):
    expected_scores, expected_rows = _reference_rrf(dense[row], words[row], 5, 12)
    assert list(rows[row]) == expected_rows
    np.testing.assert_allclose(scores[row], expected_scores, rtol=1e-6)


def _photos(rows: int, seed: int, missing=(5,)):
  """Unit photo features (another model's, another width); zero rows for
  listings without a photo."""
  photos = np.random.default_rng(seed).normal(size=(rows, 12)).astype(np.float32)
  photos /= np.linalg.norm(photos, axis=1, keepdims=True)
  photos[list(missing)] = 0.0
  return photos


@pytest.mark.parametrize("self_search", [True, False])
def test_blocks_with_photo_features_are_the_exact_three_way_top_k(self_search):
  weights = (0.2, 0.5, 0.3)
  queries, query_titles = _listings(41, 4)
  query_photos = _photos(41, 5)
  index, index_titles, index_photos = ((None, None, None) if self_search else
                                       (*_listings(29, 6), _photos(29, 7, (0, 9))))
  words = _reference_scores(queries, query_titles, index, index_titles, 0.0)
  dense = lambda a, b: a.astype(np.float64) @ b.astype(np.float64).T
  reference = (weights[0] * dense(queries, queries if self_search else index)
               + weights[1] * dense(query_photos, query_photos if self_search else index_photos)
               + weights[2] * words)
  k, rows = 4, 0
  for first, scores, indices in hybrid_blocks(
      queries, query_titles, index, index_titles, k, None, block_rows=8,
      query_photos=query_photos, index_photos=index_photos, weights=weights):
    for row in range(scores.shape[0]):
      np.testing.assert_allclose(scores[row], np.sort(reference[first + row])[::-1][:k],
                                 atol=1e-5)
      np.testing.assert_allclose(reference[first + row, indices[row]], scores[row],
                                 atol=1e-5)
    rows += scores.shape[0]
  assert rows == 41
  with pytest.raises(ValueError, match="photo rows need the three weights"):
    next(hybrid_blocks(queries, query_titles, None, None, k, 0.5, block_rows=8,
                       query_photos=query_photos))


def test_the_command_fuses_the_photo_features_with_the_weights_eval_fitted(files, capsys):
  tmp = files["tmp"]
  output, by_hand = str(tmp / "three.csv"), str(tmp / "by_hand.csv")
  command = ["neighbours", "--embeddings", files["path"], "--k", "3",
             "--rank-by", "hybrid", "--with-mobilenet", "--output", output]
  # No report: what to run first is named.
  with pytest.raises(SystemExit) as raised:
    main(command)
  assert raised.value.code == 2
  assert "run `item-jax eval` of the run with --baselines tfidf,mobilenet" in (
      capsys.readouterr().err)
  (tmp / "run" / "eval").mkdir(parents=True)
  (tmp / "run" / "eval" / "report.json").write_text(json.dumps({
      "both+tfidf": {"fusion_weight": 0.3},
      "both+mobilenet+tfidf": {"fusion_weights": {"item": 0.1, "mobilenet": 0.5,
                                                  "tfidf": 0.4}},
      "meta": {"mobilenet_image_size": 64, "lexical": "char_wb:3-3"}}))
  # The embeddings lack the photo features: `embed --with-mobilenet` is named.
  with pytest.raises(SystemExit) as raised:
    main(command)
  assert raised.value.code == 2
  assert "--with-mobilenet --mobilenet-image-size 64" in capsys.readouterr().err
  np.save(f"{files['path']}.mobilenet.npy", _photos(61, 8))
  ids = json.loads((tmp / "listings.ids.json").read_text())
  (tmp / "listings.ids.json").write_text(json.dumps({**ids, "mobilenet_image_size": 128}))
  with pytest.raises(SystemExit) as raised:   # photos of another size
    main(command)
  assert "needs MobileNetV2's photo features at 64 px" in capsys.readouterr().err
  (tmp / "listings.ids.json").write_text(json.dumps({**ids, "mobilenet_image_size": 64}))
  main(command)
  assert ("with MobileNetV2 (w = embedding / photos / words 0.1 / 0.5 / 0.4), "
          "lexical side char_wb:3-3") in capsys.readouterr().out
  result = neighbours_command(files["path"], by_hand, k=3, rank_by="hybrid",
                              fusion_weights=(0.1, 0.5, 0.4), lexical="char_wb:3-3")
  assert result["fusion_weights"] == (0.1, 0.5, 0.4)
  assert open(output).read() == open(by_hand).read()
  # Resumable: the three weights are part of what a resumed run shares.
  neighbours_command(files["path"], by_hand, k=3, rank_by="hybrid", block_rows=9,
                     fusion_weights=(0.1, 0.5, 0.4), lexical="char_wb:3-3", max_blocks=2)
  other = neighbours_command(files["path"], by_hand, k=3, rank_by="hybrid",
                             block_rows=9, fusion_weights=(0.2, 0.4, 0.4),
                             lexical="char_wb:3-3", max_blocks=1)
  assert other["resumed_at"] == 0
  neighbours_command(files["path"], by_hand, k=3, rank_by="hybrid", block_rows=9,
                     fusion_weights=(0.1, 0.5, 0.4), lexical="char_wb:3-3", max_blocks=2)
  last = neighbours_command(files["path"], by_hand, k=3, rank_by="hybrid",
                            block_rows=7, fusion_weights=(0.1, 0.5, 0.4),
                            lexical="char_wb:3-3")
  assert last["resumed_at"] == 18
  assert open(output).read() == open(by_hand).read()
  # The photos change the table.
  neighbours_command(files["path"], by_hand, k=3, rank_by="hybrid",
                     fusion_weight=0.3, lexical="char_wb:3-3")
  assert open(output).read() != open(by_hand).read()
  other_index = _write(tmp / "other", *_listings(20, 9), workdir=str(tmp / "run"),
                       modality="both")
  for flags, message in (
      (["--fusion-weight", "0.3"], "takes its three weights"),
      # The weights go with their lexical side; no single weight to give instead.
      (["--lexical", "char:2-4"], "fitted the fusion weights 0.1 / 0.5 / 0.4 with the "
       "lexical side char_wb:3-3; evaluate again with --lexical char:2-4"),
      # The index needs the photo features too, checked before any search.
      (["--index", other_index], f"--index {other_index}.npy needs MobileNetV2's "
       "photo features at 64 px")):
    with pytest.raises(SystemExit) as raised:
      main(command + flags)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
  # eval fuses MobileNetV2 with the joint, image and concat views only.
  title = _write(tmp / "titles", *_listings(10, 10), workdir=str(tmp / "run"),
                 modality="title")
  with pytest.raises(SystemExit):
    main(["neighbours", "--embeddings", title, "--rank-by", "hybrid",
          "--with-mobilenet", "--output", output])
  assert "not the title view" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main(["neighbours", "--embeddings", files["path"], "--with-mobilenet",
          "--output", output])
  assert "--with-mobilenet needs --rank-by hybrid" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (dict(rank_by="rrf", fusion_weights=(0.2, 0.3, 0.5)), "need --rank-by hybrid"),
    (dict(rank_by="hybrid", fusion_weight=0.2, fusion_weights=(0.2, 0.3, 0.5)),
     "not both"),
    (dict(rank_by="hybrid", fusion_weights=(0.2, 0.3, 0.6)), "summing to 1"),
    (dict(rank_by="hybrid", fusion_weights=(0.5, 0.5)), "expected three weights"),
    (dict(rank_by="hybrid", fusion_weights=(0.2, 0.3, 0.5)),
     "has no MobileNetV2 photo features beside it"),
])
def test_bad_three_way_rankings_are_named(files, arguments, message):
  with pytest.raises(UserError, match=message):
    neighbours_command(files["path"], str(files["tmp"] / "out.csv"), **arguments)
