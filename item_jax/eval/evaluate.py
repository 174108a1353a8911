"""`item-jax eval`: every metric for the model's three input views and the three
baselines on the same splits, and the retrieval check run during training.

The test split is embedded once per model (title + image, title only, image
only, and the attention share); the training split is the k-NN index and the
linear probe's training set. Same-product retrieval runs within the test split.
The baselines learn nothing from the catalogue's structure: TF-IDF over title
character n-grams, a colour histogram of the image, and the untrained model;
each gives L2-normalised rows that go through the same search and metrics
(TF-IDF's rows stay scipy sparse: `item_jax.eval.metrics` searches them on
the host without making them dense).

During training, `PeriodicRetrieval` embeds the first `config.eval_num_examples`
validation listings in reading order (the same at every step and on any number
of processes); its queries are the listings with another listing of their
product inside that subset.
"""

import dataclasses
import logging
import time

import numpy as np
import scipy.sparse

from item_jax.errors import MissingInputError, UserError
from item_jax.eval.embed import (ATTENTION_OUTPUTS, VIEWS, Embedder, embed_split,
                                 eval_batch_size, load_model, on_images,
                                 own_products, read_split, split_count)
from item_jax.eval.fusion import (LEXICAL, fit_added_weight, fit_weight, fuse,
                                  fuse_blocks, lexical_name, rrf_retrieval,
                                  tfidf_features)
from item_jax.eval.metrics import (classification_metrics, fit_balanced_probe,
                                   knn_predict, linear_probe, retrieval_queries,
                                   same_product_retrieval)
from item_jax.model.mobilenet import FEATURE_DIM as MOBILENET_DIM

BASELINES = ("tfidf", "minilm", "image_baseline", "mobilenet", "random_init")
# Each embedding fused with TF-IDF (`item_jax.eval.fusion`): the weight is
# fitted on the validation split's same-product retrieval, scored on test.
FUSED = {f"{entry}+tfidf": entry for entry in ("both", "title", "image", "concat",
                                                 "minilm", "mobilenet")}
# ITEm's embedding added to the best hybrid a user can build without it:
# MobileNetV2 + TF-IDF as "mobilenet+tfidf" fitted it, ITEm's share fitted
# on the validation split as FUSED's weight is (0: that hybrid as it is);
# same-product retrieval only. What it gains over "mobilenet+tfidf" is what
# ITEm adds to that stack.
FUSED_WITH_MOBILENET = {f"{entry}+mobilenet+tfidf": entry
                        for entry in ("both", "image", "concat")}
# Each fused entry also holds these metrics of reciprocal rank fusion (no
# weight, so no labels needed) as "rrf_<name>".
RRF_METRICS = ("macro_recall@10", "macro_map@10", "map@10", "recall@1")
LEXICAL_TEXTS = ("title", "title+text")
# The baselines that can skip the training split (EvalOptions.retrieval_only).
RETRIEVAL_ONLY = ("image_baseline", "mobilenet")
SCORED = VIEWS + BASELINES
ENTRIES = SCORED + tuple(FUSED) + tuple(FUSED_WITH_MOBILENET)
# The input each entry reads; it scores the listings that have it (None:
# every listing, each with what it has).
ENTRY_INPUTS = {"both": None, "title": "title", "image": "image", "concat": None,
                "tfidf": "title", "minilm": "title", "image_baseline": "image",
                "mobilenet": "image", "random_init": None}
# The (run, output) whose rows each embedding entry reads.
SOURCES = {**{view: ("item", view) for view in VIEWS},
           "minilm": ("minilm", "title"),
           "image_baseline": ("image_baseline", "image"),
           "mobilenet": ("mobilenet", "image"),
           "random_init": ("random_init", "both")}
HEADLINE = ("macro_recall@10", "map@10", "knn_accuracy", "probe_accuracy")
HISTOGRAM_BINS = 8   # per channel: 8^3 = 512 joint colour bins
PERIODIC_SPLIT = "validation"


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  step: int | None = None                 # checkpoint (default: the latest)
  batch_size: int | None = None           # global; default 64 per batch shard
  knn_k: int = 10
  probe_steps: int = 300
  max_train_examples: int | None = None   # caps the k-NN index / probe set
  # Which BASELINES to compute. The pretrained ones (minilm, mobilenet) are
  # skipped, with the reason in the report, when their package is absent.
  baselines: tuple[str, ...] = BASELINES
  # The side MobileNetV2 sees each photo resized to: ImageNet's 224, or less
  # where its CPU cost matters (it grows with the square of the side).
  mobilenet_image_size: int = 224
  # The fused entries (FUSED), when the TF-IDF baseline is asked for: they
  # embed the validation split too, to fit each weight on.
  fusion: bool = True
  # Baselines scored on same-product retrieval only: their features are not
  # computed on the training split, so they have no k-NN or probe (the
  # demo's MobileNetV2, to keep the demo's time).
  retrieval_only: tuple[str, ...] = ()
  # What the lexical side (the TF-IDF baseline and every entry fused with
  # it) reads: the title, or "title+text" the title and the record's other
  # text columns (`prepare --text-columns`, e.g. a description).
  lexical_text: str = "title"
  # Its n-grams, "ANALYZER:LOW-HIGH" (`fusion.lexical_side`): the baseline's
  # "char:2-4" by default, which keeps reports comparable; `neighbours`
  # takes the same side with the weights fitted here.
  lexical: str = LEXICAL

  def __post_init__(self):
    if self.lexical_text not in LEXICAL_TEXTS:
      raise UserError(f"lexical_text must be one of {LEXICAL_TEXTS}, got "
                      f"{self.lexical_text!r}")
    try:   # one spelling, as the report and `neighbours` read it
      object.__setattr__(self, "lexical", lexical_name(self.lexical))
    except ValueError as error:
      raise UserError(str(error)) from None
    unknown = set(self.baselines) - set(BASELINES)
    if set(self.retrieval_only) - set(RETRIEVAL_ONLY):
      raise UserError(f"retrieval_only takes {', '.join(RETRIEVAL_ONLY)} (the photo "
                      f"baselines computed per batch), got {self.retrieval_only}")
    if unknown:
      raise UserError(f"unknown baselines {sorted(unknown)}; known: "
                      f"{', '.join(BASELINES)}")


def scored_entries(report: dict) -> list[str]:
  """The ENTRIES a report holds metrics for, in order."""
  return [entry for entry in ENTRIES
          if entry in report and "unavailable" not in report[entry]]


def evaluate(workdir: str, data_dir: str, options: EvalOptions = EvalOptions()
             ) -> dict:
  """The report: {entry: metrics} for each of ENTRIES, plus "meta".

  The fused entries (FUSED; with `options.fusion` and the TF-IDF baseline)
  hold same-product retrieval and "fusion_weight", fitted on the
  validation split (meta's "fusion_validation_macro_recall@10" has each
  weight tried), "rrf_<metric>" (RRF_METRICS): the same search ranked
  by reciprocal rank fusion, which needs no weight, and the linear probe on
  the embedding and the TF-IDF row side by side ("probe_*"; no k-NN), each
  where the splits allow it (`_fused_entries`).

  Each entry is scored on the listings that have its input (ENTRY_INPUTS),
  both in the test split and in the training split (the k-NN index and the
  probe's training set); `num_test_listings` / `num_train_listings` say how
  many. An entry that cannot be computed holds {"unavailable": reason}.
  """
  started = time.time()
  trained = load_model(workdir, options.step, data_dir)
  embedder = Embedder.of(trained, VIEWS, attention=True)
  runs = {"item": (embedder, trained.params)}
  unavailable = {entry: "not asked for (--baselines)" for entry in BASELINES
                 if entry not in options.baselines}
  if "random_init" in options.baselines:
    try:
      untrained = load_model(workdir, data_dir=data_dir, initialise=True)
      runs["random_init"] = (embedder, untrained.params)
    except MissingInputError as error:
      # A convolutional stem whose ImageNet weights are nowhere here.
      logging.warning("eval: no untrained baseline: %s", error)
      unavailable["random_init"] = str(error)
  pretrained = _pretrained_baselines(options.baselines, trained.mesh, unavailable,
                                     options.mobilenet_image_size)
  host_features = {}
  if "image_baseline" in options.baselines:
    host_features[("image_baseline", "image")] = on_images(colour_histograms, HISTOGRAM_BINS ** 3)
  if "mobilenet" in pretrained:
    host_features[("mobilenet", "image")] = on_images(pretrained["mobilenet"].embed, MOBILENET_DIM)
  batch_size = eval_batch_size(embedder, options.batch_size)
  fusion = options.fusion and "tfidf" in options.baselines
  has_validation = split_count(data_dir, "validation") > 0
  reads = [("test", None, runs, host_features),
           ("train", options.max_train_examples, runs,
            {key: value for key, value in host_features.items()
             if key[0] not in options.retrieval_only})]
  if fusion and has_validation:
    reads.append(("validation", None, {"item": runs["item"]},
                  {key: value for key, value in host_features.items()
                   if key[0] == "mobilenet"}))
  splits = {}
  for split, limit, split_runs, split_features in reads:
    logging.info("eval: embedding the %s split", split)
    splits[split] = embed_split(
        read_split(data_dir, split, trained.settings, batch_size, limit),
        split_runs, split_features, total=split_count(data_dir, split, limit))
  train, test = splits["train"], splits["test"]
  if "minilm" in pretrained:
    logging.info("eval: MiniLM on %d titles",
                 sum(len(split.titles) for split in splits.values()))
    for split in splits.values():
      split.outputs[("minilm", "title")] = pretrained["minilm"].embed(split.titles)
  features = _features_by_entry(train, test, [e for e in SCORED if e not in unavailable],
                                options.retrieval_only, options.lexical_text,
                                options.lexical)
  num_classes = len(trained.settings.dataset["categories"])
  report = {}
  for entry in SCORED:
    if entry in unavailable:
      report[entry] = {"unavailable": unavailable[entry]}
      continue
    in_train, in_test = (split.has(ENTRY_INPUTS[entry] or "both")
                         for split in (train, test))
    if not in_test.any() or not in_train.any():
      report[entry] = {"unavailable": f"no listing has a{'n' * (ENTRY_INPUTS[entry] == 'image')} "
                                      f"{ENTRY_INPUTS[entry]}"}
      continue
    logging.info("eval: metrics of %s", entry)
    train_features, test_features = (_rows(rows, mask) for rows, mask in zip(
        features[entry], (in_train, in_test)))
    retrieval = {"num_queries": 0}  # no product with two test listings
    products = own_products(test.product_ids, test.item_ids)[in_test]
    if len(retrieval_queries(products)):
      retrieval = same_product_retrieval(test_features, products,
                                         test.category_ids[in_test], mesh=trained.mesh)
    if entry in options.retrieval_only:
      report[entry] = {**retrieval, "num_test_listings": int(in_test.sum())}
      continue
    report[entry] = {
        **retrieval,
        **_category_metrics(train_features, train.category_ids[in_train],
                            test_features, test.category_ids[in_test],
                            num_classes, options, trained.mesh),
        "num_test_listings": int(in_test.sum()),
        "num_train_listings": int(in_train.sum())}
  for run, entry in (("item", "both"), ("random_init", "random_init")):
    if "unavailable" not in report[entry]:
      for output in ATTENTION_OUTPUTS:
        report[entry][output] = float(np.mean(test.outputs[(run, output)]))
  fitted = {}
  if fusion and "unavailable" not in report["tfidf"]:
    # The validation split's TF-IDF rows, fitted as the test split's (on the
    # training titles and its own), for every fit on the validation split.
    validation_tfidf = (None if "validation" not in splits else _tfidf_pair(
        train, splits["validation"], options.lexical_text, options.lexical)[1])
    fused, fitted, words = _fused_entries(splits, features, validation_tfidf, report,
                                          trained.mesh, num_classes, options)
    report.update(fused)
    report["tfidf"].update(words)
    if "unavailable" not in report["mobilenet"]:
      fused, fitted_three = _entries_fused_with_mobilenet(
          splits, features, validation_tfidf, report, trained.mesh)
      report.update(fused)
      fitted.update(fitted_three)
    else:
      report.update({entry: {"unavailable": "mobilenet is not scored"}
                     for entry in FUSED_WITH_MOBILENET})
  report["meta"] = {
      "workdir": str(workdir), "data": str(data_dir), "step": trained.step,
      "num_test_listings": len(test.item_ids),
      "num_train_listings": len(train.item_ids),
      "listings": {"test": test.kinds(), "train": train.kinds()},
      "num_categories": num_classes, "knn_k": options.knn_k,
      "probe_steps": options.probe_steps,
      "mobilenet_image_size": options.mobilenet_image_size,
      "lexical_text": options.lexical_text,
      "lexical": options.lexical,
      "fusion_validation_macro_recall@10": fitted,
      "tfidf_dim": (int(features["tfidf"][0].shape[1]) if "tfidf" in features
                    else None),
      "unavailable": {entry: values["unavailable"] for entry, values in report.items()
                      if "unavailable" in values},
      "seconds": round(time.time() - started, 1)}
  return report


def _pretrained_baselines(baselines, mesh, unavailable: dict,
                          mobilenet_image_size: int = 224) -> dict:
  """{name: loaded model} of the pretrained baselines asked for and
  installed; the others' reasons go into `unavailable`."""
  from item_jax.eval.minilm import load_minilm
  from item_jax.eval.mobilenet import load_mobilenet
  loaded = {}
  for name, load in (("minilm", lambda: load_minilm(mesh)),
                     ("mobilenet", lambda: load_mobilenet(
                         image_size=mobilenet_image_size))):
    if name not in baselines:
      continue
    model, why = load()
    if model is None:
      logging.warning("eval: no %s baseline: %s", name, why)
      unavailable[name] = why
    else:
      loaded[name] = model
  return loaded


def _rows(rows, mask: np.ndarray):
  return rows if rows is None or mask.all() else rows[mask]


def _features_by_entry(train, test, entries, retrieval_only=(),
                       lexical_text: str = "title", lexical: str = LEXICAL) -> dict:
  """{entry: (train rows, test rows)} of `entries` (train rows None for
  those scored on retrieval only)."""
  features = {entry: (None if entry in retrieval_only else train.outputs[SOURCES[entry]],
                      test.outputs[SOURCES[entry]])
              for entry in entries if entry in SOURCES}
  if "tfidf" in entries:
    features["tfidf"] = _tfidf_pair(train, test, lexical_text, lexical)
  return features


def _lexical_texts(split, lexical_text: str = "title") -> list[str]:
  """What the lexical side reads of each listing (EvalOptions.lexical_text)."""
  if lexical_text == "title":
    return list(split.titles)
  return [f"{title}\n{text}" if text else title
          for title, text in zip(split.titles, split.texts or [""] * len(split.titles))]


def _tfidf_pair(train, other, lexical_text: str = "title",
                lexical: str = LEXICAL) -> tuple:
  """(train rows, `other`'s rows) of TF-IDF fitted on both splits' titles
  (of the listings that have one; the others get empty rows), with their
  other text columns for lexical_text "title+text", as n-grams `lexical`."""
  tfidf = _tfidf_of({"train": train, "other": other}, lexical_text, lexical)
  return tfidf["train"], tfidf["other"]


def _tfidf_of(splits: dict, lexical_text: str = "title",
              lexical: str = LEXICAL) -> dict:
  """{name: rows} of TF-IDF fitted on every given split's titles together
  (one column space), as `_tfidf_pair`."""
  tfidf = tfidf_features({name: [t for t, kept in zip(_lexical_texts(split, lexical_text),
                                                      split.has_title)
                                 if kept] for name, split in splits.items()},
                         lexical=lexical)
  return {name: _scatter(tfidf[name], split.has_title)
          for name, split in splits.items()}


def _fused_entries(splits: dict, features: dict, validation_tfidf, report: dict,
                   mesh, num_classes: int, options: EvalOptions) -> tuple:
  """({fused entry: metrics}, {fused entry: {weight: validation macro
  Recall@10}}): each embedding beside TF-IDF.

  Same-product retrieval: the fused score, its weight fitted on the
  validation split (its TF-IDF fitted, as the test split's, on the training
  titles and its own) and scored on the test split, and reciprocal rank
  fusion of the same test search. Categories: the linear probe on the
  embedding and the TF-IDF row side by side (each scaled on its own:
  `metrics.FittedProbe`, the TF-IDF block's weight chosen on the validation
  split where it has categories), trained on the training split as every entry's
  probe; it needs no fusion weight. It is the kind of probe `item-jax
  categorize --features hybrid` fits, on TF-IDF rows fitted on the
  training, validation and test titles together (categorize fits its own on
  the training titles alone). An entry holds what its split can
  score."""
  validation, test = splits.get("validation"), splits["test"]
  train_tfidf, test_tfidf = features["tfidf"]
  labelled = {name: own_products(split.product_ids, split.item_ids)
              for name, split in (("validation", validation), ("test", test))
              if split is not None}
  fused, fitted, probe_tfidf = {}, {}, None
  for entry, source in FUSED.items():
    if source not in report or "unavailable" in report[source]:
      fused[entry] = {"unavailable": f"{source} is not scored"}
      continue
    metrics, why = {}, None
    if validation is None or not len(retrieval_queries(labelled["validation"])):
      why = ("no product has two validation listings to fit the weight on"
             if validation is not None else "no validation split to fit the weight on")
    elif not len(retrieval_queries(labelled["test"])):
      why = "no product has two test listings"
    else:
      # A listing without the embedding's input is its TF-IDF row alone.
      rows = {name: split.outputs[SOURCES[source]]
              * split.has(ENTRY_INPUTS[source] or "both")[:, None]
              for name, split in (("validation", validation), ("test", test))}
      logging.info("eval: fitting the fusion of %s with TF-IDF", source)
      weight, tried = fit_weight(rows["validation"], validation_tfidf,
                                 labelled["validation"], validation.category_ids,
                                 mesh=mesh)
      # What a catalogue without labels would get: reciprocal rank fusion.
      rrf = rrf_retrieval(rows["test"], test_tfidf, labelled["test"],
                          test.category_ids, mesh=mesh)
      metrics.update({
          **same_product_retrieval(fuse(rows["test"], test_tfidf, weight),
                                   labelled["test"], test.category_ids, mesh=mesh),
          "fusion_weight": weight,
          **{f"rrf_{name}": rrf[name] for name in RRF_METRICS}})
      fitted[entry] = {str(w): recall for w, recall in tried.items()}
    if source not in options.retrieval_only:
      if probe_tfidf is None:   # one column space for the probe's three splits
        probe_tfidf = (_tfidf_of(splits, options.lexical_text, options.lexical)
                       if validation is not None
                       else {"train": train_tfidf, "test": test_tfidf})
      metrics.update(_hybrid_probe(
          {name: (splits[name], rows) for name, rows in probe_tfidf.items()},
          source, num_classes, options))
    if not metrics:
      fused[entry] = {"unavailable": why or "no category to probe"}
      continue
    fused[entry] = {**metrics, "num_test_listings": len(test.item_ids)}
  # The bar for those probes: the words alone, their weight chosen the same
  # way (a weight on one block is its L2 penalty, tuned).
  words = {}
  if probe_tfidf is not None and "validation" in probe_tfidf:
    words = {name.replace("probe_", "probe_tuned_").replace("tfidf_balance", "weight"):
             value for name, value in _hybrid_probe(
                 {name: (splits[name], rows) for name, rows in probe_tfidf.items()},
                 None, num_classes, options).items()}
  return fused, fitted, words


def _entries_fused_with_mobilenet(splits: dict, features: dict, validation_tfidf,
                                  report: dict, mesh) -> tuple:
  """({entry: metrics}, {entry: {ITEm's share: validation macro Recall@10}})
  of FUSED_WITH_MOBILENET: ITEm's view added to MobileNetV2 + TF-IDF at the
  weight "mobilenet+tfidf" was fitted with, ITEm's share a fitted on the
  validation split (`fusion.fit_added_weight`) and scored on the test
  split; "fusion_weights" holds the three weights."""
  validation, test = splits.get("validation"), splits["test"]
  fused, fitted = {}, {}
  base_weight = report.get("mobilenet+tfidf", {}).get("fusion_weight")
  why = (None if base_weight is not None else
         "MobileNetV2 + TF-IDF has no fitted weight")
  tfidf = labelled = None
  if not why:
    labelled = {name: own_products(split.product_ids, split.item_ids)
                for name, split in (("validation", validation), ("test", test))}
    tfidf = {"validation": validation_tfidf, "test": features["tfidf"][1]}
  for entry, source in FUSED_WITH_MOBILENET.items():
    if why or "unavailable" in report[source]:
      fused[entry] = {"unavailable": why or f"{source} is not scored"}
      continue
    blocks = {name: [split.outputs[SOURCES[name_of]] * split.has(ENTRY_INPUTS[name_of]
                                                                 or "both")[:, None]
                     for name_of in (source, "mobilenet")]
              for name, split in (("validation", validation), ("test", test))}
    logging.info("eval: fitting %s's share beside MobileNetV2 + TF-IDF", source)
    weights, tried = fit_added_weight(*blocks["validation"], base_weight,
                                      tfidf["validation"], labelled["validation"],
                                      validation.category_ids, mesh=mesh)
    fused[entry] = {
        **same_product_retrieval(fuse_blocks(blocks["test"], tfidf["test"], weights),
                                 labelled["test"], test.category_ids, mesh=mesh),
        "fusion_weights": dict(zip(("item", "mobilenet", "tfidf"), weights)),
        "num_test_listings": len(test.item_ids)}
    fitted[entry] = {str(added): recall for added, recall in tried.items()}
  return fused, fitted


def _hybrid_probe(splits: dict, source: str, num_classes: int,
                  options: EvalOptions) -> dict:
  """The probe's accuracy and macro-F1 on (embedding, TF-IDF row) blocks, of
  every listing (one without the embedding's input has a zero embedding
  row, one without a title an empty TF-IDF row), the TF-IDF block's weight
  chosen on the validation split where it has labels
  (`metrics.fit_balanced_probe`: "probe_tfidf_balance"); {} without labels.
  `splits`: {name: (SplitEmbeddings, its TF-IDF rows)}, train and test, and
  validation when there is one. `source` None: the TF-IDF rows alone."""
  rows, labels = {}, {}
  for name, (split, tfidf) in splits.items():
    if source is None:
      rows[name], labels[name] = (tfidf,), split.category_ids
      continue
    embedding = (split.outputs[SOURCES[source]]
                 * split.has(ENTRY_INPUTS[source] or "both")[:, None])
    rows[name], labels[name] = (embedding, tfidf), split.category_ids
  labelled = labels["test"] >= 0
  if not labelled.any() or not (labels["train"] >= 0).any():
    return {}
  logging.info("eval: the probe on %s", f"{source} beside TF-IDF" if source
               else "TF-IDF alone, its weight chosen on the validation split")
  probe, balance, _ = fit_balanced_probe(
      rows["train"], labels["train"], num_classes,
      (rows["validation"], labels["validation"]) if "validation" in rows else None,
      steps=options.probe_steps)
  predicted = probe.predict(tuple(block[labelled] for block in rows["test"]))
  return {**{f"probe_{name}": value for name, value in
             classification_metrics(labels["test"][labelled], predicted).items()},
          "probe_tfidf_balance": balance}


def _scatter(rows, present: np.ndarray):
  """Sparse rows of the listings where `present`, placed at their positions
  among all listings (empty rows elsewhere)."""
  if present.all():
    return rows
  positions = np.flatnonzero(present)
  expand = scipy.sparse.csr_matrix(
      (np.ones(len(positions), np.float32), (positions, np.arange(len(positions)))),
      shape=(len(present), len(positions)))
  return (expand @ rows).tocsr()


def _category_metrics(train_features, train_labels, test_features, test_labels,
                      num_classes: int, options: EvalOptions, mesh) -> dict:
  """k-NN and linear-probe accuracy and macro-F1 on labelled test listings."""
  labelled = test_labels >= 0
  if not labelled.any() or not (train_labels >= 0).any():
    return {}
  queries, labels = test_features[labelled], test_labels[labelled]
  knn = classification_metrics(labels, knn_predict(
      train_features, train_labels, queries, options.knn_k, mesh=mesh))
  probe = classification_metrics(labels, linear_probe(
      train_features, train_labels, queries, num_classes,
      steps=options.probe_steps))
  return {**{f"knn_{name}": value for name, value in knn.items()},
          **{f"probe_{name}": value for name, value in probe.items()}}


def colour_histograms(images: np.ndarray, image_mean=(0.5, 0.5, 0.5),
                      image_std=(0.5, 0.5, 0.5), bins: int = HISTOGRAM_BINS
                      ) -> np.ndarray:
  """(batch, H, W, 3) normalised images -> (batch, bins^3) joint RGB histograms.

  `image_mean`/`image_std` undo the input pipeline's normalisation (its
  defaults). Each histogram is square-rooted then L2-normalised, so the inner
  product of two is the Bhattacharyya coefficient of their colour
  distributions.
  """
  pixels = np.asarray(images, np.float32) * np.asarray(image_std) + np.asarray(image_mean)
  levels = np.clip((pixels * bins).astype(np.int64), 0, bins - 1)
  joint = (levels[..., 0] * bins + levels[..., 1]) * bins + levels[..., 2]
  batch = joint.shape[0]
  offsets = np.arange(batch)[:, None] * bins ** 3
  counts = np.bincount((joint.reshape(batch, -1) + offsets).ravel(),
                       minlength=batch * bins ** 3).reshape(batch, bins ** 3)
  roots = np.sqrt(counts.astype(np.float32))
  return roots / np.maximum(np.linalg.norm(roots, axis=1, keepdims=True), 1e-12)


class PeriodicRetrieval:
  """Call with (step, params) after a training step; evaluates every
  `config.eval_every_steps` steps. Every process must call it."""

  def __init__(self, settings, graphdef, param_shardings, mesh, writer):
    config = settings.config
    self.settings = settings
    self.every_steps = int(config.eval_every_steps)
    self.num_examples = int(config.eval_num_examples)
    self.mesh = mesh
    self.writer = writer
    self.embedder = Embedder(graphdef, param_shardings, mesh, VIEWS)
    self.batch_size = eval_batch_size(self.embedder)

  def __call__(self, step: int, params) -> dict | None:
    if not self.every_steps or step % self.every_steps:
      return None
    started = time.time()
    batches = read_split(self.settings.config.data.dir, PERIODIC_SPLIT,
                         self.settings, self.batch_size, self.num_examples)
    listings = embed_split(batches, {"model": (self.embedder, params)})
    products = own_products(listings.product_ids, listings.item_ids)
    if not len(retrieval_queries(products)):
      logging.warning("eval at step %d: no product has two of the first %d "
                      "validation listings; nothing to retrieve", step,
                      self.num_examples)
      return None
    scalars = {}
    for view in VIEWS:
      metrics = same_product_retrieval(
          listings.outputs[("model", view)], products,
          listings.category_ids, mesh=self.mesh)
      scalars.update({f"eval/{view}/{name}": value
                      for name, value in metrics.items() if not name.startswith("num_")})
    scalars["eval/num_queries"] = metrics["num_queries"]
    self.writer.write_scalars(step, scalars)
    logging.info("eval at step %d (%.1f s, %d queries): macro R@10 %s", step,
                 time.time() - started, metrics["num_queries"], " ".join(
                     f"{view}={scalars[f'eval/{view}/macro_recall@10']:.3f}"
                     for view in VIEWS))
    return scalars
