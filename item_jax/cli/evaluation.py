"""`item-jax eval` (retrieval, category prediction and baselines -> a report)
and `item-jax categorize` (top-k categories from a probe fitted once)."""

from item_jax.cli.common import (add_distributed_flags, at_least,
                                 initialize_distributed, need_prepared, need_run)


def register(commands):
  evaluate = commands.add_parser(
      "eval", help="retrieval, category prediction and baselines -> "
      "WORKDIR/eval/report.{json,md}")
  evaluate.add_argument("--workdir", required=True, help="a training workdir")
  evaluate.add_argument("--data", required=True, help="a `prepare` output folder")
  evaluate.add_argument("--compare", nargs="*", default=[], metavar="WORKDIR",
                        help="other workdirs (ablations) for a side-by-side table")
  evaluate.add_argument("--step", type=int, default=None)
  evaluate.add_argument("--batch-size", type=int, default=None)
  evaluate.add_argument("--knn-k", type=int, default=10)
  evaluate.add_argument("--probe-steps", type=int, default=300,
                        help="the linear probe's L-BFGS iterations at most")
  evaluate.add_argument("--baselines", default="all",
                        help="comma-separated subset of tfidf, minilm, "
                        "image_baseline, mobilenet, random_init (default all; "
                        "minilm and mobilenet need their wheels installed)")
  evaluate.add_argument("--max-train-examples", type=int, default=None,
                        help="cap the training listings used as the k-NN "
                        "index and the probe's training set")
  evaluate.add_argument("--mobilenet-image-size", type=int, default=224,
                        help="the side MobileNetV2 sees each photo resized to "
                        "(ImageNet's 224; less costs less CPU)")
  evaluate.add_argument("--lexical-text", choices=["title", "title+text"],
                        default="title",
                        help="what TF-IDF (and every entry fused with it) reads: "
                        "the title, or the title and the other text columns "
                        "`prepare --text-columns` kept (e.g. a description)")
  evaluate.add_argument("--lexical", default="char:2-4",
                        help="the lexical side's n-grams, ANALYZER:LOW-HIGH: "
                        "char (across words, the TF-IDF baseline's: char:2-4, "
                        "the default) or char_wb (within words, e.g. "
                        "char_wb:3-3: cheaper, and better on the catalogues "
                        "in BENCHMARKS.md); neighbours --rank-by hybrid reads "
                        "it with the fitted weights")
  evaluate.add_argument("--retrieval-only", default="",
                        help="photo baselines (image_baseline, mobilenet) scored "
                        "on same-product retrieval only, without k-NN or probe: "
                        "their features of the training split are not "
                        "computed (the demo's mobilenet)")
  evaluate.add_argument("--no-fusion", dest="fusion", action="store_false",
                        help="skip the entries fused with TF-IDF (they embed "
                        "the validation split to fit their weights)")
  add_distributed_flags(evaluate)
  evaluate.set_defaults(run=_eval)

  categorize = commands.add_parser(
      "categorize", help="top-k leaf categories of every listing, from a "
      "linear probe (or k-NN) fitted once on a labelled split and saved in "
      "WORKDIR/categorizer/")
  categorize.add_argument("--workdir", required=True, help="a training workdir")
  listings = categorize.add_mutually_exclusive_group(required=True)
  listings.add_argument("--data", default=None,
                        help="a `prepare` output folder: categorize its --split")
  listings.add_argument("--embeddings", default=None, metavar="OUTPUT",
                        help="an `item-jax embed` output (OUTPUT.npy + "
                        "OUTPUT.ids.json) of this workdir")
  categorize.add_argument("--split", default="test")
  categorize.add_argument("--output", required=True,
                          help="CSV item_id,rank,category,probability")
  categorize.add_argument("--k", type=int, default=3, help="categories per listing")
  categorize.add_argument("--method", choices=["probe", "knn"], default="probe")
  categorize.add_argument("--features", choices=["embedding", "hybrid"],
                          default="embedding",
                          help="what the probe reads: the embedding, or the "
                          "embedding and the title's TF-IDF row side by side")
  categorize.add_argument("--fit-split", default="train",
                          help="the labelled split the categorizer is fitted on")
  categorize.add_argument("--fit-data", default=None,
                          help="the prepared folder it is fitted on (default: "
                          "--data, else the saved categorizer's, else the "
                          "run's data.dir)")
  categorize.add_argument("--refit", action="store_true",
                          help="fit again even when the saved categorizer matches")
  categorize.add_argument("--modality", choices=["both", "title", "image", "concat"],
                          default=None,
                          help="the view (default: the embeddings' modality, or both)")
  categorize.add_argument("--step", type=int, default=None,
                          help="checkpoint step (default: the latest)")
  categorize.add_argument("--knn-k", type=int, default=10,
                          help="neighbours that vote (--method knn)")
  categorize.add_argument("--probe-steps", type=int, default=300,
                          help="the probe's L-BFGS iterations at most")
  categorize.add_argument("--batch-size", type=int, default=None,
                          help="global batch for embedding (default: 64 per "
                          "batch shard)")
  categorize.set_defaults(run=_categorize)


def _eval(args):
  need_run("--workdir", args.workdir)
  need_prepared("--data", args.data, ["test", "train"])
  at_least(args, step=0, batch_size=1, knn_k=1, probe_steps=1,
           max_train_examples=1, num_processes=1, process_id=0,
           mobilenet_image_size=32)
  from item_jax.eval.evaluate import BASELINES, EvalOptions
  from item_jax.eval.report import (adds_table, compare_table, eval_command,
                                    headline_table, job_hint, unavailable_lines)
  baselines = BASELINES if args.baselines == "all" else tuple(
      name.strip() for name in args.baselines.split(",") if name.strip())
  # A bad value fails here, before any model is loaded.
  options = EvalOptions(step=args.step, batch_size=args.batch_size,
                        knn_k=args.knn_k, probe_steps=args.probe_steps,
                        max_train_examples=args.max_train_examples,
                        baselines=baselines,
                        mobilenet_image_size=args.mobilenet_image_size,
                        fusion=args.fusion, lexical_text=args.lexical_text,
                        lexical=args.lexical,
                        retrieval_only=tuple(name.strip() for name in
                                             args.retrieval_only.split(",")
                                             if name.strip()))
  initialize_distributed(args)
  report, paths, compared = eval_command(args.workdir, args.data, args.compare,
                                         options)
  print(headline_table(report, markdown=False))
  for line in unavailable_lines(report):
    print(line)
  print("\nWhat ITEm adds (each side's best entry, alone and fused; macro: "
        "over leaf categories, micro: over test listings)")
  print(adds_table(report, markdown=False))
  hint = job_hint(report, markdown=False)
  if hint:
    print("\n" + hint)
  if compared:
    print("\n" + compare_table(compared, markdown=False))
  if paths:
    print(f"report: {paths['markdown']}")


def _categorize(args):
  need_run("--workdir", args.workdir)
  if args.data is not None:
    need_prepared("--data", args.data, [args.split], split_flag="--split")
  if args.fit_data is not None:
    need_prepared("--fit-data", args.fit_data, [args.fit_split],
                  split_flag="--fit-split")
  at_least(args, k=1, step=0, knn_k=1, probe_steps=1, batch_size=1)
  from item_jax.eval.categorize import categorize_command
  summary = categorize_command(
      args.workdir, args.output, data_dir=args.data, split=args.split,
      embeddings=args.embeddings, k=args.k, fit_split=args.fit_split,
      method=args.method, refit=args.refit, view=args.modality, step=args.step,
      fit_data=args.fit_data, knn_k=args.knn_k, probe_steps=args.probe_steps,
      batch_size=args.batch_size, features=args.features)
  validation = summary["validation"]
  print(f"categorized {summary['count']} listings (top {summary['k']}, "
        f"{summary['method']}, {summary['features']}, {summary['view']} view, "
        f"step {summary['step']}; "
        f"categorizer {'fitted' if summary['fitted'] else 'reused'}"
        + (f", validation accuracy {validation['accuracy']:.4f}" if validation else "")
        + f"): {summary['output']}")
