"""The evaluation's outputs: report.json, report.md with its PNG plots, the same
scalars in TensorBoard, and the side-by-side table of several workdirs.
"""

import json

import jax
from clu import metric_writers
from etils import epath

from item_jax.eval import evaluate as evaluate_lib
from item_jax.eval.evaluate import ENTRIES, HEADLINE, VIEWS, scored_entries
from item_jax.eval.fusion import LEXICAL, lexical_side
from item_jax.eval.metrics import RETRIEVAL_KS

LABELS = {
    "both": "ITEm, title + image",
    "title": "ITEm, title only",
    "image": "ITEm, image only",
    "concat": "ITEm, title | image (two passes)",
    "tfidf": "TF-IDF, title char 2-4-grams",
    "minilm": "all-MiniLM-L6-v2, title",
    "image_baseline": "colour histogram, image",
    "mobilenet": "MobileNetV2 ImageNet, image",
    "random_init": "ITEm untrained, title + image",
}
LABELS.update({fused: f"{LABELS[source]} + TF-IDF"
               for fused, source in evaluate_lib.FUSED.items()})
LABELS.update({fused: f"{LABELS[source]} + MobileNetV2 + TF-IDF"
               for fused, source in evaluate_lib.FUSED_WITH_MOBILENET.items()})
HEADLINE_NAMES = {"macro_recall@10": "macro R@10", "map@10": "MAP@10",
                  "knn_accuracy": "k-NN acc", "probe_accuracy": "probe acc"}
REPORT_JSON, REPORT_MD = "report.json", "report.md"


def entry_label(entry: str, report: dict) -> str:
  """LABELS[entry], with the side MobileNetV2 saw the photos at, the lexical
  side's n-grams where they are not the baseline's, and a fused entry's
  weight."""
  size = report.get("meta", {}).get("mobilenet_image_size")
  label = LABELS[entry]
  lexical = report.get("meta", {}).get("lexical", LEXICAL)
  if entry == "tfidf" and lexical != LEXICAL:
    analyzer, (low, high) = lexical_side(lexical)
    label = (f"TF-IDF, title {'char' if analyzer == 'char' else 'in-word char'} "
             f"{low}-{high}-grams")
  elif lexical != LEXICAL:   # fused with another lexical side than the baseline's
    label = label.replace("TF-IDF", f"TF-IDF {lexical}")
  if entry in ("mobilenet", "mobilenet+tfidf") and size:
    label = label.replace("image", f"image {size} px", 1)
  weight = report.get(entry, {}).get("fusion_weight")
  if weight is not None:
    label += f" (w = {weight:.1f})"
  weights = report.get(entry, {}).get("fusion_weights")
  if weights:
    label += f" (w = {' / '.join(f'{w:.2f}' for w in weights.values())})"
  return label


def eval_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "eval"


def read_report(workdir: str) -> dict | None:
  path = eval_dir(workdir) / REPORT_JSON
  return json.loads(path.read_text()) if path.exists() else None


def write_report(report: dict, workdir: str, compare: dict | None = None) -> dict:
  """Writes DIR/eval/{report.json, report.md, *.png} and TensorBoard scalars
  at the checkpoint's step; `compare` ({workdir: report}) adds the side-by-side
  table. Returns the paths written."""
  directory = eval_dir(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / REPORT_JSON).write_text(json.dumps(report, indent=2))
  plots = _plot(report, directory)
  markdown = format_markdown(report, plots, compare)
  (directory / REPORT_MD).write_text(markdown)
  # TensorBoard only: the default writer would also log every scalar.
  writer = metric_writers.SummaryWriter(str(directory))
  writer.write_scalars(report["meta"]["step"], {
      f"eval/{entry}/{name}": value for entry in scored_entries(report)
      for name, value in report[entry].items() if isinstance(value, (int, float))})
  writer.close()
  return {"json": str(directory / REPORT_JSON), "markdown": str(directory / REPORT_MD),
          "plots": [str(directory / plot) for plot in plots]}


def format_table(header: list[str], rows: list[list], markdown: bool = True) -> str:
  """A table of strings and floats (shown with 3 decimals; None as "-")."""
  cells = [[f"{cell:.3f}" if isinstance(cell, float) else
            "-" if cell is None else str(cell) for cell in row]
           for row in [header, *rows]]
  if markdown:   # a "|" inside a cell (the concat view's label) is escaped
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join(" --- " for _ in header) + "|")
    return "\n".join(lines)
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  return "\n".join("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                             for i, (cell, width) in enumerate(zip(row, widths)))
                   for row in cells)


def headline_table(report: dict, markdown: bool = True) -> str:
  """Each scored entry's four headline metrics and how many test listings
  it scored ("-": no query or no category to score)."""
  return format_table(
      ["", *HEADLINE_NAMES.values(), "test listings"],
      [[entry_label(entry, report), *(report[entry].get(name) for name in HEADLINE),
        report[entry].get("num_test_listings", report["meta"]["num_test_listings"])]
       for entry in scored_entries(report)], markdown)


# What ITEm adds: its best entry against the best without it, alone and fused.
# ITEm's: its views, each view + TF-IDF, each view + MobileNetV2 + TF-IDF;
# without it: the baselines a user already has (not the untrained model) and
# their fusions with TF-IDF.
OTHERS_ALONE = ("tfidf", "minilm", "image_baseline", "mobilenet")
ITEM_FUSED = (tuple(entry for entry, source in evaluate_lib.FUSED.items() if source in VIEWS)
              + tuple(evaluate_lib.FUSED_WITH_MOBILENET))
OTHERS_FUSED = ("tfidf",) + tuple(entry for entry, source in evaluate_lib.FUSED.items()
                                  if source in OTHERS_ALONE)
ADDS_METRICS = {"macro_recall@10": "macro R@10", "macro_map@10": "macro MAP@10",
                "knn_accuracy": "k-NN accuracy (micro)",
                "probe_accuracy": "probe accuracy (micro)"}


def _value(report: dict, entry: str, metric: str, fused: bool):
  """`metric` of `entry`; beside the fused probes, TF-IDF's is its probe
  with the words' weight chosen as theirs is (their bar)."""
  if fused and entry == "tfidf" and metric == "probe_accuracy":
    metric = "probe_tuned_accuracy"
  return report.get(entry, {}).get(metric)


def _best(report: dict, entries, metric: str, fused: bool = False):
  """(entry, value) of the entry with the highest `metric`, or None."""
  values = [(_value(report, entry, metric, fused), entry) for entry in entries]
  scored = [(value, entry) for value, entry in values if value is not None]
  if not scored:
    return None
  value, entry = max(scored, key=lambda pair: pair[0])
  return entry, value


def what_item_adds(report: dict) -> dict:
  """{metric: {"alone": ..., "fused": ...}} for same-product retrieval and
  leaf categories (ADDS_METRICS): each side's best entry ({"item": (entry,
  value), "others": (entry, value), "margin": item - others}), ITEm's
  embedding alone against the inputs a user has without it alone (TF-IDF,
  MiniLM, MobileNetV2, the colour histogram), then ITEm's best hybrid
  against the best hybrid without it (TF-IDF alone counts: a weight of 0
  is a hybrid; beside the fused probes, its probe with the words' weight
  chosen as theirs is). Each side's best row of this split, chosen the
  same way for both; a metric or side with no scored entry is left out
  (the fused entries have no k-NN)."""
  adds = {}
  for metric in ADDS_METRICS:
    for kind, item_entries, other_entries in (
        ("alone", VIEWS, OTHERS_ALONE),
        ("fused", ITEM_FUSED, OTHERS_FUSED)):
      fused = kind == "fused"
      item = _best(report, item_entries, metric, fused)
      others = _best(report, other_entries, metric, fused)
      if item and others:
        adds.setdefault(metric, {})[kind] = {
            "item": item, "others": others, "margin": item[1] - others[1]}
  return adds


def adds_table(report: dict, markdown: bool = True) -> str:
  """`what_item_adds` as one row per metric some entry has (retrieval needs
  product ids) and kind (the embeddings alone, fused with the words):
  ITEm's best, the best without it, and the margin."""
  adds = what_item_adds(report)
  if not adds:
    return "No entry is scored on this split: nothing to compare."
  rows = []
  for kind, name in (("alone", "embedding alone"), ("fused", "fused with the words")):
    for metric, metric_name in ADDS_METRICS.items():
      if kind in adds.get(metric, {}):
        found = adds[metric][kind]
        rows.append([f"{metric_name}, {name}",
                     *(f"{found[side][1]:.3f} ({entry_label(found[side][0], report)})"
                       for side in ("item", "others")),
                     f"{found['margin']:+.3f}"])
  return format_table(["", "best ITEm", "best without ITEm", "ITEm's margin"],
                      rows, markdown)


NEEDS = {"image": "a photo", "title": "a title"}


def job_hint(report: dict, catalogue: str = "CATALOGUE", images: str | None = None,
             markdown: bool = True) -> str | None:
  """How to rank `catalogue` with the report's best ITEm hybrid in
  `item-jax neighbours`: a view fused with the words (VIEW + TF-IDF), or
  with MobileNetV2's photo features and the words (`--with-mobilenet`),
  the entry chosen by its validation macro R@10 at the fitted weights, as
  the weights were (never on the test split); None where no ITEm hybrid was
  fitted."""
  validation = report.get("meta", {}).get("fusion_validation_macro_recall@10") or {}
  fitted = []
  for view in VIEWS:
    two, three = f"{view}+tfidf", f"{view}+mobilenet+tfidf"
    weight = report.get(two, {}).get("fusion_weight")
    if weight is not None and f"{weight:.1f}" in validation.get(two, {}):
      fitted.append((validation[two][f"{weight:.1f}"], two))
    if "fusion_weights" in report.get(three, {}) and validation.get(three):
      # The fit keeps the share with the highest validation R@10.
      fitted.append((max(validation[three].values()), three))
  if not fitted:
    return None
  view_of = {**evaluate_lib.FUSED, **evaluate_lib.FUSED_WITH_MOBILENET}
  # A draw goes to the two-way entry (one model fewer), then to VIEWS' order.
  recall, entry = max(fitted, key=lambda found: (
      found[0], found[1] not in evaluate_lib.FUSED_WITH_MOBILENET,
      -VIEWS.index(view_of[found[1]])))
  meta, test = report["meta"], report[entry]
  three = entry in evaluate_lib.FUSED_WITH_MOBILENET
  view = view_of[entry]
  share = test["fusion_weights"]["item"] if three else test["fusion_weight"]
  command = (f"item-jax neighbours --workdir {meta.get('workdir', 'WORKDIR')} "
             f"--catalogue {catalogue}{f' --images {images}' if images else ''} "
             f"--modality {view} --rank-by hybrid"
             f"{' --with-mobilenet' if three else ''} --k 10 --output neighbours.csv")
  weights = (" / ".join(f"{w:.2f}" for w in test["fusion_weights"].values())
             + " (embedding / photos / words)" if three
             else f"{test['fusion_weight']:.1f}")
  return "\n".join([
      f"To rank a catalogue with the ITEm hybrid that fitted best on the "
      f"validation split ({LABELS[entry]}: macro R@10 {recall:.3f} there; on "
      f"the test split {test['macro_recall@10']:.3f}, macro MAP@10 "
      f"{test['macro_map@10']:.3f}):",
      f"```bash\n{command}\n```" if markdown else f"  {command}",
      f"(w = {weights} and the lexical side {meta.get('lexical', LEXICAL)} are "
      "read from this report.)",
      *([f"ITEm's fitted share is 0 here: this ranks by "
         f"{'MobileNetV2 and ' if three else ''}the words alone."] if share == 0 else []),
      *([f"The job's {view} view leaves out listings without {NEEDS[view]}; "
         "the report's row ranks them by what else they have."]
        if view in NEEDS else [])])


def unavailable_lines(report: dict) -> list[str]:
  """One line per entry the report could not compute, with the reason."""
  return [f"{LABELS[entry]}: not scored ({report[entry]['unavailable']})"
          for entry in ENTRIES
          if entry in report and "unavailable" in report[entry]]


def recipes_table(reports: dict, markdown: bool = True) -> str:
  """Several recipes' three views on one catalogue (and each fused with
  TF-IDF, and with MobileNetV2 and TF-IDF), then the baselines (of the first report: they do not depend on
  the recipe)."""
  own = (VIEWS + tuple(f"{view}+tfidf" for view in VIEWS)
         + tuple(evaluate_lib.FUSED_WITH_MOBILENET))
  rows = []
  for name, report in reports.items():
    for view in own:
      if view in scored_entries(report):
        rows.append([f"{name}: {entry_label(view, report)}",
                     *(report[view].get(metric) for metric in HEADLINE)])
  first = next(iter(reports.values()))
  for entry in scored_entries(first):
    if entry not in own:
      rows.append([entry_label(entry, first),
                   *(first[entry].get(metric) for metric in HEADLINE)])
  return format_table(["", *HEADLINE_NAMES.values()], rows, markdown)


def compare_table(reports: dict, markdown: bool = True) -> str:
  """The model's three views in several workdirs, side by side."""
  rows = []
  for workdir, report in reports.items():
    for view in ("both", "title", "image"):
      if view in scored_entries(report):
        rows.append([workdir, report["meta"]["step"], view,
                     *(report[view].get(name) for name in HEADLINE)])
  return format_table(["workdir", "step", "view", *HEADLINE_NAMES.values()],
                      rows, markdown)


def format_markdown(report: dict, plots: list[str], compare: dict | None) -> str:
  meta = report["meta"]
  retrieval_columns = [f"{prefix}{metric}@{k}" for prefix in ("", "macro_")
                       for metric in ("recall", "map") for k in RETRIEVAL_KS]
  classification_columns = ["knn_accuracy", "knn_macro_f1", "probe_accuracy",
                            "probe_macro_f1"]
  entries = scored_entries(report)
  attention_rows = [[LABELS[entry], report[entry]["image_attention_share"],
                     report[entry]["image_token_share"]]
                    for entry in ("both", "random_init") if entry in entries]
  kinds = meta.get("listings", {}).get("test")
  kinds_text = "" if not kinds else " (" + ", ".join(
      f"{count} {kind.replace('_', ' ')}" for kind, count in kinds.items()) + \
      "; an entry that reads only titles or only images scores the listings " \
      "that have them)"
  sections = [
      f"# ITEm evaluation: {meta['workdir']} at step {meta['step']}",
      f"Data `{meta['data']}`: {meta['num_test_listings']} test listings"
      f"{kinds_text} "
      f"(retrieval queries: {report['both']['num_queries']} listings whose "
      f"product has another test listing, in "
      f"{report['both'].get('num_query_categories', 0)} leaf categories), "
      f"{meta['num_train_listings']} training listings as the k-NN index "
      f"(k={meta['knn_k']}) and the linear probe's training set "
      f"({meta['probe_steps']} full-batch steps), {meta['num_categories']} "
      "categories.",
      "## Headline", headline_table(report), *unavailable_lines(report),
      "## Same-product retrieval (test split, cosine similarity)",
      "Recall@k: share of the query's other listings in the top k. AP@k: sum "
      "over hits in the top k of precision at the hit's rank, divided by "
      "min(k, number of the query's other listings). Plain: mean over queries; "
      "macro: mean of each leaf category's mean.",
      format_table(["", *retrieval_columns],
                   [[entry_label(e, report),
                     *(report[e].get(c) for c in retrieval_columns)]
                    for e in entries]),
      "Fused entries: w x the embedding's cosine + (1 - w) x TF-IDF's, w "
      "fitted on the validation split's same-product macro Recall@10 and "
      "applied here as it is; + MobileNetV2 + TF-IDF: ITEm's share a added "
      "to MobileNetV2 + TF-IDF as fitted, a fitted the same way (the weights "
      "shown are ITEm / MobileNetV2 / TF-IDF): what ITEm's embedding adds to "
      "the best hybrid built without it.",
      "## Leaf-category prediction (test split)",
      "Accuracy: over the labelled test listings; macro-F1: mean over "
      "categories. Fused entries: the probe on the embedding and the TF-IDF "
      "row side by side (no weight, no k-NN), on every labelled test listing "
      "(one without the embedding's input has a zero embedding row).",
      format_table(["", *classification_columns],
                   [[LABELS[e] if e in evaluate_lib.FUSED else entry_label(e, report),
                     *(report[e].get(c) for c in classification_columns)]
                    for e in entries if e not in evaluate_lib.FUSED_WITH_MOBILENET
                    and (e not in evaluate_lib.FUSED or "probe_accuracy" in report[e])]),
      *_tuned_words_line(report),
      "## What ITEm adds (test split)",
      "Each side's best row of the tables: ITEm's views, alone and fused, "
      "against the inputs a user has without it (TF-IDF, MiniLM, "
      "MobileNetV2, the colour histogram), alone and fused with TF-IDF "
      "(beside the fused probes, TF-IDF's probe with the words' weight chosen "
      "as theirs is). Macro: mean of each leaf category's mean; micro: over "
      "the test listings.",
      adds_table(report),
      *filter(None, [job_hint(report)]),
      "## Where [CLS] looks (last block, mean over heads and test listings)",
      "Share of [CLS] attention on image patches, beside the patches' share "
      "of the attended tokens (what uniform attention would give).",
      format_table(["", "attention on image", "image tokens"], attention_rows),
      *(f"![{plot}]({plot})" for plot in plots),
  ]
  if compare:
    sections += ["## Comparison", compare_table(compare)]
  return "\n\n".join(sections) + "\n"


def _tuned_words_line(report: dict) -> list[str]:
  """The fused probes' bar: TF-IDF alone with its weight chosen on the
  validation split as theirs is (absent without one)."""
  words = report.get("tfidf", {})
  if "probe_tuned_accuracy" not in words:
    return []
  return [f"The fused probes weigh the TF-IDF block by 1, 2, 4 or 8 as the "
          f"validation split prefers; TF-IDF alone, weighed the same way, "
          f"gives probe accuracy {words['probe_tuned_accuracy']:.3f} and "
          f"macro-F1 {words['probe_tuned_macro_f1']:.3f} (weight "
          f"{words['probe_tuned_weight']:g}): the bar for those rows."]


def _plot(report: dict, directory: epath.Path) -> list[str]:
  """headline.png (bars per entry) and recall_at_k.png; returns file names."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot

  entries = scored_entries(report)
  value = lambda entry, name: report[entry].get(name, float("nan"))
  figure, axes = pyplot.subplots(figsize=(11, 4))
  width = 0.8 / len(entries)
  for i, entry in enumerate(entries):
    axes.bar([x + i * width for x in range(len(HEADLINE))],
             [value(entry, name) for name in HEADLINE], width, label=LABELS[entry])
  axes.set_xticks([x + 0.4 - width / 2 for x in range(len(HEADLINE))],
                  list(HEADLINE_NAMES.values()))
  axes.set_ylim(0, 1)
  axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  axes.set_title(f"step {report['meta']['step']}")
  figure.tight_layout()
  figure.savefig(str(directory / "headline.png"), dpi=100)
  pyplot.close(figure)

  figure, axes = pyplot.subplots(figsize=(8, 4))
  for entry in entries:
    axes.plot(RETRIEVAL_KS, [value(entry, f"macro_recall@{k}") for k in RETRIEVAL_KS],
              marker="o", label=LABELS[entry])
  axes.set_xlabel("k")
  axes.set_ylabel("macro Recall@k")
  axes.set_ylim(0, 1)
  axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  figure.tight_layout()
  figure.savefig(str(directory / "recall_at_k.png"), dpi=100)
  pyplot.close(figure)
  return ["headline.png", "recall_at_k.png"]


def eval_command(workdir: str, data_dir: str, compare=(),
                 options: evaluate_lib.EvalOptions | None = None) -> tuple:
  """`item-jax eval`: evaluates `workdir` and writes its report; each `compare`
  workdir's report is read (or, when missing, evaluated and written first).
  Returns (report, paths written, {workdir: report} compared)."""
  options = options or evaluate_lib.EvalOptions()
  is_lead = jax.process_index() == 0
  report = evaluate_lib.evaluate(workdir, data_dir, options)
  compared = {}
  if compare:
    compared[str(workdir)] = report
    for other in compare:
      other_report = read_report(other)
      if other_report is None:
        other_report = evaluate_lib.evaluate(other, data_dir, options)
        if is_lead:
          write_report(other_report, other)
      compared[str(other)] = other_report
  paths = write_report(report, workdir, compared or None) if is_lead else {}
  return report, paths, compared
