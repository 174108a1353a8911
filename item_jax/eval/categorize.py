"""`item-jax categorize`: leaf categories for every listing of a catalogue,
from a classifier fitted once on the run's embeddings of a labelled split.

Fitting: the run's model (`load_model`, the workdir's latest checkpoint or
`step`) embeds one view of every listing of DATA/FIT_SPLIT that has that
view's inputs and a category (category_id >= 0), and fits either

  probe: `metrics.fit_probe`, the evaluation's linear probe (scikit-learn's
         multinomial LogisticRegression, the same settings and feature
         scaling as `metrics.linear_probe`), or
  knn:   the labelled rows themselves as the index; a listing's category is
         the majority among its `knn_k` most similar rows, ties to the label
         whose best neighbour ranks highest (`metrics.knn_predict`), and its
         probabilities are the vote shares.

With `features="hybrid"` (`--features hybrid`, probe only) the probe reads
each listing's embedding and its title's TF-IDF row side by side
(`metrics.FittedProbe`'s blocks, each scaled on its own): the TF-IDF of
`fusion.FittedTfidf`, fitted on the titles of the labelled listings it is
fitted on (character 2-4-grams found in two or more of them, or every one
when none is, at most 131,072 of the most frequent), so the words that name
a category (a model line, "kurta") count beside what the embedding learned.
The TF-IDF block's weight against the embedding (1, 2, 4 or 8 times its
unit spread) is chosen by the accuracy on the fit data's validation split,
where it has one ("tfidf_balance" in the json): at equal spread the probe
can lean on a weak embedding and fall below the words alone.

Saved: WORKDIR/categorizer/, safe formats only (no pickle):

  categorizer.safetensors  probe: "weights" (C, dim) and "bias" (C,) float32,
                           the softmax over the C categories seen in fitting
                           (a binary fit is written as the equivalent two-row
                           softmax), "classes" (C,) int64, their ids;
                           knn: "index" (n, dim) float32 rows, "labels" (n,)
                           int64 category ids. Hybrid: "weights" is (C, dim +
                           V), the embedding's columns first, then the V
                           n-grams'; "idf" (V,) float32.
  categorizer.ngrams.json  hybrid only: the V n-grams, in column order.
  categorizer.json         format, method, view, workdir, step, data_dir,
                           fit_split, tokenizer (the data's tokenizer file),
                           categories (dataset.json's names, indexed by
                           category id), dim, the features' transform (probe:
                           "mean" (dim floats) and "scale": rows are
                           (embedding - mean) * scale before the weights; knn:
                           none, inner products of the embeddings as they
                           are; hybrid: "tfidf_scale" too, the TF-IDF rows'
                           factor), feature_kind ("embedding" or "hybrid"),
                           the fit's settings (probe_steps and
                           weight_decay, or knn_k), listings and categories
                           fitted on, and the accuracy on the fit data's
                           validation split (null without one).

Probabilities are computed in float64 from those float32 tensors; they match
the in-memory scikit-learn model's `predict_proba` to about 1e-6.

Predicting: `categorize_command` reuses the saved categorizer when its json
matches what is asked (the checkpoint step, method, view, features, fit
split and settings, and the fit data when given); otherwise, or with
`refit`, it fits
again and replaces it. It then predicts for every listing of a prepared split
(embedded with the same model, view and step) or for the rows of an
`item-jax embed` file (OUTPUT.npy + OUTPUT.ids.json, whose workdir, step,
modality and dimension must be the categorizer's), and writes CSV
`item_id,rank,category,probability`: k rows per listing, rank 1..k, most
probable first (ties: probe to the lower category id, k-NN as its vote), 6
decimals.
"""

import csv
import dataclasses
import io
import json
import logging
import os

import ml_collections
import numpy as np
from etils import epath
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from item_jax.data import pipeline
from item_jax.errors import MissingInputError, UserError, no_training_run
from item_jax.eval.embed import (VIEWS, Embedder, _check_same_tokenizer,
                                 embed_split, eval_batch_size, load_model,
                                 read_split)
from item_jax.eval.fusion import FittedTfidf
from item_jax.eval.metrics import (fit_balanced_probe, fit_probe, knn_ranking,
                                   knn_votes)

CATEGORIZER_DIR = "categorizer"
TENSORS_FILE = "categorizer.safetensors"
INFO_FILE = "categorizer.json"
NGRAMS_FILE = "categorizer.ngrams.json"
# What the classifier reads: the embedding, or the embedding and the title's
# TF-IDF row side by side (probe only).
FEATURES = ("embedding", "hybrid")
FORMAT_VERSION = 1
METHODS = ("probe", "knn")
VALIDATION_SPLIT = "validation"
CSV_HEADER = ("item_id", "rank", "category", "probability")
# Fit settings that decide whether a saved categorizer is what is asked.
_SETTINGS = {"probe": ("probe_steps", "weight_decay"), "knn": ("knn_k",)}


@dataclasses.dataclass(frozen=True)
class Categorizer:
  """A fitted classifier over `categories` (names, indexed by category id)
  for one view's embeddings; `info` is its categorizer.json."""

  info: dict
  tensors: dict   # name -> numpy array, as in categorizer.safetensors
  lexical: FittedTfidf | None = None   # hybrid: the titles' TF-IDF

  @property
  def feature_kind(self) -> str:
    return self.info.get("feature_kind", "embedding")

  @property
  def reads_titles(self) -> bool:
    return self.feature_kind == "hybrid"

  @property
  def method(self) -> str:
    return self.info["method"]

  @property
  def categories(self) -> list[str]:
    return self.info["categories"]

  @property
  def num_categories(self) -> int:
    return len(self.categories)

  @property
  def dim(self) -> int:
    return int(self.info["dim"])

  def _check(self, embeddings) -> np.ndarray:
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
      raise ValueError(f"embeddings of shape {embeddings.shape}; the "
                       f"categorizer takes rows of {self.dim} dimensions")
    return embeddings

  def _scores(self, embeddings, titles=None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, num_categories), the ordering key: larger first)."""
    embeddings = self._check(embeddings)
    if self.reads_titles and (titles is None or len(titles) != len(embeddings)):
      raise ValueError("this categorizer reads each listing's title beside its "
                       "embedding (feature_kind hybrid): pass one title per row")
    if self.method == "probe":
      features = self.info["features"]
      rows = ((embeddings.astype(np.float64) - np.asarray(features["mean"]))
              * features["scale"])
      weights = self.tensors["weights"].astype(np.float64)
      logits = (rows @ weights[:, :self.dim].T
                + self.tensors["bias"].astype(np.float64))
      if self.reads_titles:
        words = self.lexical.transform(titles).astype(np.float64)
        logits += (words * features["tfidf_scale"]) @ weights[:, self.dim:].T
      logits -= logits.max(axis=1, keepdims=True)
      exp = np.exp(logits)
      probabilities = np.zeros((len(rows), self.num_categories))
      probabilities[:, self.tensors["classes"]] = exp / exp.sum(axis=1, keepdims=True)
      return probabilities, probabilities
    k = int(self.info["knn_k"])
    votes, first_rank = knn_votes(self.tensors["index"], self.tensors["labels"],
                                  embeddings.astype(np.float32), k,
                                  num_classes=self.num_categories)
    shares = votes / np.maximum(votes.sum(axis=1, keepdims=True), 1)
    return shares, knn_ranking(votes, first_rank, k)

  def predict_proba(self, embeddings, titles=None) -> np.ndarray:
    """(n, num_categories) float64 probabilities; a category the fit never
    saw gets 0. `titles` (one per row) are needed when `reads_titles`."""
    return self._scores(embeddings, titles)[0]

  def predict(self, embeddings, titles=None) -> np.ndarray:
    """(n,) the most probable category id of each row."""
    return self.top_k(embeddings, 1, titles)[0][:, 0]

  def top_k(self, embeddings, k: int = 3, titles=None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(category ids (n, k) int64, their probabilities (n, k)), most probable
    first; k is capped at the number of categories. Ties go to the lower
    category id (probe) or as k-NN's vote breaks them (knn)."""
    probabilities, key = self._scores(embeddings, titles)
    k = min(int(k), self.num_categories)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(probabilities, order, axis=1)

  def save(self, folder) -> epath.Path:
    """categorizer.safetensors + categorizer.json into `folder` (replaced)."""
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(value)
               for name, value in self.tensors.items()}
    # The json last: a save cut short leaves files that `load_categorizer`
    # finds inconsistent (and `categorize` refits), never a mix it reads.
    if self.lexical is not None:
      tensors["idf"] = self.lexical.idf
    _write_replacing(folder / TENSORS_FILE, save_tensors(tensors))
    if self.lexical is not None:
      _write_replacing(folder / NGRAMS_FILE, json.dumps(
          self.lexical.ngrams, ensure_ascii=False).encode())
    elif (folder / NGRAMS_FILE).exists():   # an earlier hybrid one's
      (folder / NGRAMS_FILE).unlink()
    _write_replacing(folder / INFO_FILE,
                     json.dumps(self.info, indent=1, ensure_ascii=False).encode())
    return folder


def build_categorizer(method: str, embeddings: np.ndarray, labels: np.ndarray,
                      categories, knn_k: int = 10, probe_steps: int = 300,
                      weight_decay: float = 1e-4, info: dict | None = None,
                      titles=None, features: str = "embedding",
                      validation=None) -> Categorizer:
  """A categorizer fitted on the rows of `embeddings` labelled >= 0
  (`labels` index `categories`); `info` adds to its json. `features`
  "hybrid" (probe only) also reads `titles`, one per row, and weighs the
  TF-IDF block against the embedding by the accuracy on `validation`
  ((embeddings, labels, titles), when given: `metrics.fit_balanced_probe`)."""
  _check_choices(method, "both", features)
  if features == "hybrid" and (titles is None or len(titles) != len(embeddings)):
    raise ValueError("features='hybrid' needs one title per embedding row")
  embeddings = np.asarray(embeddings, np.float32)
  labels = np.asarray(labels, np.int64)
  labelled = labels >= 0
  if not labelled.any():
    raise ValueError("no labelled rows to fit on")
  categories = list(categories)
  if labels.max() >= len(categories):
    raise ValueError(f"label {labels.max()} has no name among {len(categories)} "
                     "categories")
  rows, labels = embeddings[labelled], labels[labelled]
  meta = {"format": FORMAT_VERSION, "method": method, **(info or {}),
          "feature_kind": features,
          "categories": categories, "dim": int(embeddings.shape[1]),
          "num_fit_listings": int(len(labels)),
          "num_fit_categories": int(len(np.unique(labels)))}
  if method == "knn":
    return Categorizer(
        {**meta, "knn_k": int(knn_k), "features": None},
        {"index": rows, "labels": labels})
  lexical, blocks = None, rows
  transform = {"transform": "(embedding - mean) * scale"}
  if features == "hybrid":
    fit_titles = [title for title, kept in zip(titles, labelled) if kept]
    if not any(title and title.strip() for title in fit_titles):
      raise UserError(f"--features hybrid reads the titles, and none of the "
                      f"{len(fit_titles)} listings it is fitted on has one: "
                      "use --features embedding")
    lexical = FittedTfidf.fit(fit_titles)
    blocks = (rows, lexical.transform(fit_titles))
    transform = {"transform": "[(embedding - mean) * scale, tfidf(title) * "
                              "tfidf_scale]", "ngrams": len(lexical.ngrams)}
    held_out = None
    if validation is not None:
      valid_rows, valid_labels, valid_titles = validation
      held_out = ((np.asarray(valid_rows, np.float32),
                   lexical.transform(list(valid_titles))), np.asarray(valid_labels))
    probe, balance, tried = fit_balanced_probe(blocks, labels, len(categories),
                                               held_out, probe_steps, weight_decay)
    transform.update(tfidf_balance=balance, tfidf_balances_tried={
        str(weight): accuracy for weight, accuracy in tried.items()})
  else:
    probe = fit_probe(blocks, labels, len(categories), probe_steps, weight_decay)
  weights, bias = probe.logit_weights()   # zeros for one category: probability 1
  if features == "hybrid":
    transform["tfidf_scale"] = float(probe.scalings[1][1])
  return Categorizer(
      {**meta, "probe_steps": int(probe_steps), "weight_decay": float(weight_decay),
       "features": {"mean": [float(value) for value in probe.mean],
                    "scale": float(probe.scale), **transform}},
      {"weights": weights.astype(np.float32), "bias": bias.astype(np.float32),
       "classes": probe.classes.astype(np.int64)}, lexical)


def categorizer_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / CATEGORIZER_DIR


def load_categorizer(workdir) -> Categorizer:
  """The categorizer saved in WORKDIR/categorizer/."""
  folder = categorizer_dir(workdir)
  if not (folder / INFO_FILE).exists() or not (folder / TENSORS_FILE).exists():
    raise MissingInputError(f"no categorizer in {folder}: fit one with "
                            f"`item-jax categorize --workdir {workdir} ...`")
  info = json.loads((folder / INFO_FILE).read_text())
  if info.get("format") != FORMAT_VERSION or info.get("method") not in METHODS:
    raise UserError(f"{folder / INFO_FILE}: not a categorizer of format "
                    f"{FORMAT_VERSION}; refit it with `item-jax categorize --refit`")
  tensors = dict(load_tensors((folder / TENSORS_FILE).read_bytes()))
  lexical = None
  if info.get("feature_kind", "embedding") == "hybrid":
    why = _hybrid_files_problem(folder, info, tensors)
    if why:
      raise MissingInputError(f"{folder}: {why}; refit it with `item-jax "
                              "categorize --refit`")
    lexical = FittedTfidf(json.loads((folder / NGRAMS_FILE).read_text()),
                          tensors.pop("idf"))
  return Categorizer(info, tensors, lexical)


def _hybrid_files_problem(folder, info: dict, tensors: dict) -> str:
  """Why a hybrid categorizer's files do not fit together ("" when they do)."""
  if not (folder / NGRAMS_FILE).exists() or "idf" not in tensors:
    return f"a hybrid categorizer without its {NGRAMS_FILE} or idf"
  try:
    count = len(json.loads((folder / NGRAMS_FILE).read_text()))
  except ValueError:
    return f"{NGRAMS_FILE} is not readable"
  width = tensors["weights"].shape[1] if "weights" in tensors else -1
  if count != len(tensors["idf"]) or width != int(info["dim"]) + count:
    return (f"{count} n-grams, {len(tensors['idf'])} idf values and weights "
            f"of width {width} for a {info['dim']}-d embedding do not fit "
            "together (a save cut short?)")
  return ""


def fit_categorizer(workdir, data_dir, split: str = "train", view: str = "both",
                    method: str = "probe", step: int | None = None,
                    knn_k: int = 10, probe_steps: int = 300,
                    weight_decay: float = 1e-4, batch_size: int | None = None,
                    features: str = "embedding") -> epath.Path:
  """Fits on the `view` embeddings (and titles, for `features` "hybrid") of
  DATA_DIR/SPLIT's labelled listings and saves WORKDIR/categorizer/;
  returns that folder."""
  _check_fit_data(data_dir, split)
  _check_choices(method, view, features)
  model = _Model(workdir, step, data_dir, view, batch_size)
  return _fit(model, data_dir, split, method, knn_k, probe_steps,
              weight_decay, features).save(categorizer_dir(workdir))


class _Model:
  """The run's model and one Embedder for `view`, loaded once."""

  def __init__(self, workdir, step, data_dir, view, batch_size):
    self.loaded = load_model(workdir, step, data_dir)
    self.workdir, self.view = workdir, view
    self.trained_on = _run_config(workdir).data.dir
    self.embedder = Embedder.of(self.loaded, views=(view,))
    self.batch_size = eval_batch_size(self.embedder, batch_size)
    self._checked = {os.path.realpath(str(data_dir))}

  def embed(self, data_dir, split):
    """(the item ids, category ids, rows and titles of the split's listings
    that have the view's inputs)."""
    if os.path.realpath(str(data_dir)) not in self._checked:
      _check_same_tokenizer(self.trained_on, data_dir)
      self._checked.add(os.path.realpath(str(data_dir)))
    result = embed_split(read_split(data_dir, split, self.loaded.settings,
                                    self.batch_size),
                         {"model": (self.embedder, self.loaded.params)})
    keep = result.has(self.view)
    if not keep.all():
      logging.warning("categorize: %d listings of %s/%s have no %s input and "
                      "are left out", int((~keep).sum()), data_dir, split, self.view)
    return (result.item_ids[keep], result.category_ids[keep],
            result.outputs[("model", self.view)][keep],
            [title for title, kept in zip(result.titles, keep) if kept])


def _fit(model: _Model, data_dir, split, method, knn_k, probe_steps,
         weight_decay, features: str = "embedding") -> Categorizer:
  info = pipeline.load_dataset_info(data_dir)
  _, labels, rows, titles = model.embed(data_dir, split)
  if not (labels >= 0).any():
    raise UserError(_no_labels(data_dir, split))
  has_validation = bool(info.get("splits", {}).get(VALIDATION_SPLIT, {}).get("count"))
  held_out = None
  if has_validation:
    _, valid_labels, valid_rows, valid_titles = model.embed(data_dir, VALIDATION_SPLIT)
    held_out = (valid_rows, valid_labels, valid_titles)
  categorizer = build_categorizer(
      method, rows, labels, info["categories"], knn_k, probe_steps, weight_decay,
      info={"view": model.view, "workdir": _real(model.workdir),
            "step": model.loaded.step, "data_dir": _real(data_dir),
            "fit_split": split,
            "tokenizer": _real(epath.Path(data_dir) / info["tokenizer"])},
      titles=titles, features=features,
      validation=held_out if features == "hybrid" else None)
  validation = None
  if held_out is not None:
    rows, labels, titles = held_out
    labelled = labels >= 0
    if labelled.any():
      predicted = categorizer.predict(
          rows[labelled], [title for title, kept in zip(titles, labelled) if kept])
      validation = {"split": VALIDATION_SPLIT, "listings": int(labelled.sum()),
                    "accuracy": float(np.mean(predicted == labels[labelled]))}
  categorizer.info["validation"] = validation
  logging.info("categorize: fitted the %s categorizer (%s) on %d listings of "
               "%s/%s (step %d, %s view)%s", method, features,
               categorizer.info["num_fit_listings"],
               data_dir, split, model.loaded.step, model.view,
               f"; validation accuracy {validation['accuracy']:.4f}"
               if validation else "")
  return categorizer


def categorize_command(workdir, output, data_dir=None, split=None, embeddings=None,
                       k: int = 3, fit_split: str = "train", method: str = "probe",
                       refit: bool = False, view: str | None = None,
                       step: int | None = None, fit_data: str | None = None,
                       knn_k: int = 10, probe_steps: int = 300,
                       weight_decay: float = 1e-4,
                       batch_size: int | None = None,
                       features: str = "embedding") -> dict:
  """`item-jax categorize`: the top-k categories of every listing of
  DATA_DIR/SPLIT (default test) or of an `item-jax embed` file, as CSV.

  The categorizer is fitted on FIT_DATA/FIT_SPLIT (FIT_DATA: `fit_data`,
  else `data_dir`, else the saved categorizer's data, else the run's
  data.dir), or reused from WORKDIR/categorizer/ when it matches (see the
  module docstring). `view` defaults to the embeddings file's modality, or
  "both". `features` "hybrid" reads each listing's title beside its
  embedding (an embeddings file must then list the titles, as `item-jax
  embed` writes them). Returns a summary.
  """
  if (data_dir is None) == (embeddings is None):
    raise UserError("give either --data (with --split) or --embeddings")
  if k < 1:
    raise UserError(f"--k {k}: must be at least 1")
  split = split or "test"
  if not (epath.Path(workdir) / "config.json").exists():
    raise MissingInputError(no_training_run(workdir))
  rows = ids = None
  if embeddings is not None:
    rows, ids = read_embeddings(embeddings)
    modality = ids.get("modality", "both")
    if view is not None and view != modality:
      raise UserError(f"--modality {view}: {embeddings} holds {modality} "
                      "embeddings")
    view = modality
  view = view or "both"
  _check_choices(method, view, features)
  if features == "hybrid" and ids is not None and not isinstance(ids.get("title"), list):
    raise UserError(f"--features hybrid reads the titles, and --embeddings "
                    f"{embeddings}'s .ids.json has none: write it with `item-jax "
                    "embed`")
  if data_dir is not None:
    pipeline.load_dataset_info(data_dir)   # a prepared folder
  wanted_step = _checkpoint_step(workdir, step)
  if ids is not None:   # before any fitting
    _check_embeddings_source(embeddings, ids, workdir, wanted_step)
  saved = _saved_info(workdir)
  asked = {"method": method, "view": view, "step": wanted_step,
           "feature_kind": features,
           "fit_split": fit_split, "knn_k": int(knn_k),
           "probe_steps": int(probe_steps), "weight_decay": float(weight_decay)}
  if fit_data or data_dir:   # named: the saved one must be fitted on it
    fit_data = fit_data or data_dir
    asked["data_dir"] = _real(fit_data)
  else:
    fit_data = (saved or {}).get("data_dir") or _run_config(workdir).data.dir
  if not fit_data:
    raise UserError(f"the run in {workdir} names no data.dir: give --fit-data "
                    "or --data")
  why = "--refit" if refit else _mismatch(saved, asked)
  model = None
  if why:
    _check_fit_data(fit_data, fit_split)
    logging.info("categorize: fitting a categorizer (%s)", why)
    model = _Model(workdir, wanted_step, fit_data, view, batch_size)
    categorizer = _fit(model, fit_data, fit_split, method, knn_k, probe_steps,
                       weight_decay, features)
    categorizer.save(categorizer_dir(workdir))
  else:
    logging.info("categorize: reusing the categorizer in %s (step %d, %s, %s, "
                 "%s view)", categorizer_dir(workdir), saved["step"], method,
                 features, view)
    categorizer = load_categorizer(workdir)
  if embeddings is not None:
    _check_embeddings(embeddings, rows, ids, categorizer, workdir)
    item_ids = np.asarray(ids["item_id"], dtype=str)
    titles = ids.get("title")
  else:
    _check_split(data_dir, split, "--split")
    model = model or _Model(workdir, wanted_step, data_dir, view, batch_size)
    item_ids, _, rows, titles = model.embed(data_dir, split)
  indices, probabilities = categorizer.top_k(
      rows, k, titles if categorizer.reads_titles else None)
  write_predictions(output, item_ids, indices, probabilities,
                    categorizer.categories)
  return {"count": int(len(item_ids)), "k": int(indices.shape[1]),
          "fitted": bool(why), "method": method, "view": view,
          "features": features,
          "step": categorizer.info["step"],
          "categorizer": str(categorizer_dir(workdir)), "output": str(output),
          "validation": categorizer.info.get("validation")}


def write_predictions(output, item_ids, indices: np.ndarray,
                      probabilities: np.ndarray, categories) -> str:
  """CSV `item_id,rank,category,probability`, one row per (listing, rank)."""
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(CSV_HEADER)
  for item_id, row, values in zip(item_ids, indices, probabilities):
    for rank, (category, probability) in enumerate(zip(row, values), start=1):
      writer.writerow((item_id, rank, categories[category], f"{probability:.6f}"))
  path = epath.Path(output)
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_replacing(path, text.getvalue().encode("utf-8"))
  return str(path)


def read_embeddings(embeddings) -> tuple[np.ndarray, dict]:
  """(rows, ids.json) of an `item-jax embed` output (OUTPUT or OUTPUT.npy)."""
  base = str(embeddings).removesuffix(".npy")
  array_path, ids_path = epath.Path(base + ".npy"), epath.Path(base + ".ids.json")
  for path in (array_path, ids_path):
    if not path.exists():
      raise MissingInputError(f"--embeddings {embeddings}: no {path} (write it "
                              "with `item-jax embed --output ...`)")
  with array_path.open("rb") as file:
    rows = np.load(file)
  try:
    ids = json.loads(ids_path.read_text())
  except ValueError as error:
    raise UserError(f"--embeddings: {ids_path} is not readable: {error}") from error
  return rows, ids


def _check_embeddings(name, rows, ids, categorizer: Categorizer, workdir):
  if rows.ndim != 2 or rows.shape[1] != categorizer.dim:
    raise UserError(f"--embeddings {name}: rows of shape {rows.shape}; the "
                    f"categorizer of {workdir} takes {categorizer.dim} dimensions")
  if len(ids.get("item_id", ())) != len(rows):
    raise UserError(f"--embeddings {name}: {len(rows)} rows but "
                    f"{len(ids.get('item_id', ()))} item ids in its .ids.json")
  if categorizer.reads_titles and len(ids.get("title") or ()) != len(rows):
    raise UserError(f"--embeddings {name}: {len(rows)} rows but "
                    f"{len(ids.get('title') or ())} titles in its .ids.json")


def _check_embeddings_source(name, ids, workdir, step: int):
  """The embeddings come from `workdir` at `step`."""
  if ids.get("workdir") is not None and _real(ids["workdir"]) != _real(workdir):
    raise UserError(f"--embeddings {name} come from the run in {ids['workdir']}, "
                    f"not {workdir}: embed with `item-jax embed --workdir {workdir}`")
  if ids.get("step") is not None and int(ids["step"]) != int(step):
    raise UserError(f"--embeddings {name} are of step {ids['step']}, the "
                    f"categorizer of step {step}: pass --step {ids['step']}, "
                    f"or embed again at step {step}")


def _checkpoint_step(workdir, step: int | None) -> int:
  """`step` if saved (default: the latest), without restoring anything."""
  from item_jax.train import checkpoint as checkpoint_lib
  config = _run_config(workdir)
  checkpointer = checkpoint_lib.Checkpointer(
      epath.Path(workdir) / "checkpoints", config.checkpoint_every_steps,
      config.keep_checkpoints, async_saves=False)
  try:
    steps = checkpointer.all_steps()
  finally:
    checkpointer.close()
  if not steps:
    raise MissingInputError(f"no complete checkpoint in {workdir}/checkpoints: "
                            "the run has not saved one yet")
  if step is None:
    return max(steps)
  if step not in steps:
    raise MissingInputError(f"--step {step}: no checkpoint of that step in "
                            f"{workdir}; saved steps: {sorted(steps)}")
  return int(step)


def _saved_info(workdir) -> dict | None:
  path = categorizer_dir(workdir) / INFO_FILE
  if not path.exists() or not (categorizer_dir(workdir) / TENSORS_FILE).exists():
    return None
  try:
    info = json.loads(path.read_text())
  except ValueError:
    logging.warning("categorize: %s is not readable; fitting again", path)
    return None
  if info.get("format") != FORMAT_VERSION:
    return None
  if info.get("feature_kind") == "hybrid":
    folder = categorizer_dir(workdir)
    why = _hybrid_files_problem(
        folder, info, dict(load_tensors((folder / TENSORS_FILE).read_bytes())))
    if why:
      logging.warning("categorize: %s: %s; fitting again", folder, why)
      return None
  return info


def _mismatch(saved: dict | None, asked: dict) -> str:
  """Why the saved categorizer is not the one asked for ("" when it is)."""
  if saved is None:
    return "none saved"
  names = ["method", "view", "feature_kind", "step", "fit_split", "data_dir",
           *_SETTINGS[asked["method"]]]
  saved = {"feature_kind": "embedding", **saved}   # older categorizers
  for name in names:
    if name in asked and saved.get(name) != asked[name]:
      return f"the saved one has {name} {saved.get(name)!r}, asked {asked[name]!r}"
  if saved["feature_kind"] == "hybrid" and "tfidf_balance" not in (saved.get("features") or {}):
    return "the saved hybrid one was fitted before the words' weight was chosen"
  return ""


def _check_choices(method, view, features: str = "embedding"):
  if method not in METHODS:
    raise UserError(f"unknown categorize method {method!r}; known: "
                    f"{', '.join(METHODS)}")
  if features not in FEATURES:
    raise UserError(f"unknown categorize features {features!r}; known: "
                    f"{', '.join(FEATURES)}")
  if features == "hybrid" and method != "probe":
    raise UserError("--features hybrid takes --method probe: the probe weighs "
                    "the embedding and the words itself, where k-NN would need "
                    "a fusion weight")
  if view not in VIEWS:
    raise UserError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")


def _check_split(data_dir, split, flag):
  splits = pipeline.load_dataset_info(data_dir).get("splits", {})
  if split not in splits:
    raise UserError(f"{flag} {split}: {data_dir} has no {split!r} split; it has "
                    f"{', '.join(sorted(splits))}")


def _check_fit_data(data_dir, split):
  """The fit data is prepared, has `split`, and names categories."""
  _check_split(data_dir, split, "--fit-split")
  if not pipeline.load_dataset_info(data_dir).get("categories"):
    raise UserError(_no_labels(data_dir, split))


def _no_labels(data_dir, split) -> str:
  return (f"no listing of {data_dir}/{split} has a category: categorize needs "
          "labelled listings")


def _run_config(workdir) -> ml_collections.ConfigDict:
  from item_jax.train.config import base_config
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise MissingInputError(no_training_run(workdir))
  config = base_config()
  config.update(ml_collections.ConfigDict(json.loads(path.read_text())).to_dict())
  return config


def _real(path) -> str:
  path = str(path)
  return path if "://" in path else os.path.realpath(path)


def _write_replacing(path: epath.Path, data: bytes):
  """`data` into `path`, through a temporary file renamed over it."""
  temporary = path.parent / f".{path.name}.tmp"
  temporary.write_bytes(data)
  temporary.replace(path)
