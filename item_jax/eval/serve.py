"""Embeddings of listings that are no prepared split: a raw catalogue file
(`item-jax embed --catalogue`) and listings held in memory (`CatalogueEmbedder`).

Both preprocess exactly as training did. Titles go through the run's own
tokenizer (`run_inputs`: the one in its data.dir's dataset.json, else the one
a converted run keeps in the workdir) cut at config.data.max_title_len;
images through `prepare`'s normal form (`item_jax.data.images`: upright RGB
JPEG, larger side at most the training data's max_side) and then
`pipeline.preprocess_image` at the run's image_size and resize. A listing
may lack its title or its image (not both): it is embedded with what it
has, as the `Embedder` does for prepared splits.

A catalogue file goes through `prepare` itself (its reader, column
renaming and checks), into one shard of one split in a temporary folder
beside the output, and then through `embed_to_files`; rows that `prepare`
refuses are named in OUTPUT.skipped.json, and the embeddings follow the
catalogue's order of the kept rows (`prepare` writes records in catalogue
order, and one shard is read back in file order).
"""

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath

from item_jax.data import images as images_lib
from item_jax.data import pipeline
from item_jax.data import prepare as prepare_lib
from item_jax.data import tokenizer as tokenizer_lib
from item_jax.errors import MissingInputError, UserError, no_training_run
from item_jax.eval.embed import (VIEWS, Embedder, LoadedModel, embed_to_files,
                                 eval_batch_size, load_model,
                                 load_photo_model)
from item_jax.eval.outputs import photos_path

# What a listing of a catalogue file must have to be embedded: "any" keeps
# title-only and image-only listings (each embedded with what it has), so
# that a catalogue loses only the rows with neither.
DEFAULT_MODALITIES = "any"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # a converted run's


@dataclasses.dataclass(frozen=True)
class RunInputs:
  """How a run's listings were preprocessed, as far as the data decides it."""
  tokenizer_path: str
  max_image_side: int   # the larger side of the images the run trained on


def run_inputs(workdir: str) -> RunInputs:
  """The run's tokenizer file and image size limit: from
  `<config.data.dir>/dataset.json` when that is readable, else the tokenizer
  file a converted run keeps in the workdir (and `prepare`'s default size
  limit); a UserError when there is neither."""
  workdir = epath.Path(workdir)
  config_file = workdir / "config.json"
  if not config_file.exists():
    raise MissingInputError(no_training_run(workdir))
  config = json.loads(config_file.read_text())
  data_dir = (config.get("data") or {}).get("dir")
  if data_dir and (epath.Path(data_dir) / prepare_lib.DATASET_INFO_FILE).exists():
    info = pipeline.load_dataset_info(data_dir)
    tokenizer = epath.Path(data_dir) / info["tokenizer"]
    if tokenizer.exists():
      max_side = (info.get("image") or {}).get("max_side", prepare_lib.MAX_IMAGE_SIDE)
      return RunInputs(str(tokenizer), int(max_side))
  for name in TOKENIZER_FILES:
    if (workdir / name).exists():
      return RunInputs(str(workdir / name), prepare_lib.MAX_IMAGE_SIDE)
  where = (f"its config.data.dir {data_dir} has no readable dataset.json and "
           "tokenizer" if data_dir else "its config.json sets no data.dir")
  raise MissingInputError(
      f"no tokenizer for the run in {workdir}: {where}, and the workdir holds "
      f"no {' or '.join(TOKENIZER_FILES)}; copy the tokenizer the run trained "
      f"with into {workdir}")


def load_for_embedding(workdir: str, step: int | None = None, devices=None
                       ) -> tuple[LoadedModel, RunInputs, object]:
  """(model, run inputs, tokenizer) of a run, its training data not needed."""
  inputs = run_inputs(workdir)
  tokenizer = tokenizer_lib.load_tokenizer(inputs.tokenizer_path)
  loaded = load_model(workdir, step, devices=devices,
                      vocab_size=tokenizer.vocab_size)
  if loaded.settings.model.vocab_size < tokenizer.vocab_size:
    raise UserError(f"the tokenizer {inputs.tokenizer_path} has "
                    f"{tokenizer.vocab_size} ids but the model in {workdir} "
                    f"only {loaded.settings.model.vocab_size}: not the run's tokenizer")
  return loaded, inputs, tokenizer


def output_paths(output: str) -> dict:
  """The files `embed` writes for OUTPUT (or OUTPUT.npy)."""
  base = os.fspath(output).removesuffix(".npy")
  return {"array": base + ".npy", "ids": base + ".ids.json",
          "skipped": base + ".skipped.json"}


def catalogue_source(workdir: str, catalogue: str, images: str, view: str,
                     modalities: str, columns: dict | None,
                     mobilenet_image_size: int | None = None) -> dict:
  """What embeddings of a catalogue were made from (kept in OUTPUT.ids.json):
  a rerun with the same source and checkpoint step may reuse them."""
  local = "://" not in str(catalogue)
  stat = os.stat(catalogue) if local else None
  real = lambda path: os.path.realpath(path) if "://" not in str(path) else str(path)
  return {"workdir": real(workdir), "catalogue": real(catalogue),
          "catalogue_bytes": stat.st_size if stat else None,
          "catalogue_mtime_ns": stat.st_mtime_ns if stat else None,
          "images": real(images), "modality": view, "modalities": modalities,
          "columns": dict(columns or {}),
          **({} if mobilenet_image_size is None else
             {"mobilenet_image_size": int(mobilenet_image_size)})}


def embed_catalogue(workdir: str, catalogue: str, output: str,
                    images: str | None = None, step: int | None = None,
                    view: str = "both", modalities: str = DEFAULT_MODALITIES,
                    columns: dict | None = None, batch_size: int | None = None,
                    num_workers: int | None = None,
                    mobilenet_image_size: int | None = None) -> dict:
  """`item-jax embed --catalogue`: `view` embeddings of every usable row of a
  catalogue CSV/JSONL file (images relative to `images`, default the file's
  folder), read and checked by `prepare` with the run's tokenizer.

  Writes OUTPUT.npy and OUTPUT.ids.json as `write_embeddings` does (rows in
  catalogue order) and OUTPUT.skipped.json: the rows `prepare` refused
  (`skipped`: row, item_id, reason) and the kept listings whose image it
  refused (`without_image`, with `modalities="any"`). The model is restored
  before any image is read, so a workdir without a checkpoint fails at once.
  `num_workers` image processes as in `prepare` (0: this process).
  With `mobilenet_image_size`, MobileNetV2's photo features of the same
  listings too (OUTPUT.mobilenet.npy; `embed.embed_to_files`).
  """
  if view not in VIEWS:
    raise UserError(f"modality must be one of {VIEWS}, got {view!r}")
  images = images or os.path.dirname(os.path.abspath(catalogue))
  loaded, inputs, _ = load_for_embedding(workdir, step)
  # Missing weights fail before any image is read.
  photo_model = (None if mobilenet_image_size is None
                 else load_photo_model(mobilenet_image_size))
  paths = output_paths(output)
  parent = os.path.dirname(os.path.abspath(paths["array"]))
  if "://" not in str(output):
    os.makedirs(parent, exist_ok=True)
  else:
    parent = None
  # Each process prepares its own copy (no shared folder needed); a name of
  # its own keeps processes sharing the output folder apart.
  prepared = tempfile.mkdtemp(prefix=".item-jax-embed-", dir=parent)
  try:
    info = prepare_lib.prepare(
        catalogue, images, prepared, num_shards=1, columns=columns,
        tokenizer_model=inputs.tokenizer_path, split_fractions=(0.0, 0.0, 1.0),
        max_image_side=inputs.max_image_side, num_workers=num_workers,
        modalities=modalities)
    source = catalogue_source(workdir, catalogue, images, view, modalities,
                              columns, mobilenet_image_size)
    summary = embed_to_files(loaded, prepared, "test", output, view, batch_size, {
        "workdir": str(workdir), "catalogue": str(catalogue),
        "images": str(images), "modalities": modalities,
        "skipped": info["num_skipped"], "source": source}, photo_model)
    reports = {name: list(prepare_lib.report_rows(prepared, name))
               for name in ("skipped", "without_image")}
  finally:
    shutil.rmtree(prepared, ignore_errors=True)
  read, written = sum(summary["listings"].values()), sum(info["listings"].values())
  if read != written:  # prepare wrote only images that decode: a bug or the disk
    raise RuntimeError(f"embed: read back {read} of the {written} listings "
                       f"prepared from {catalogue}")
  skipped = {
      "catalogue": str(catalogue), "images": str(images),
      "modalities": modalities, "rows": written + info["num_skipped"],
      "listings": info["listings"], "skipped_reasons": info["skipped_reasons"],
      "skipped": reports["skipped"], "images_dropped": info["images_dropped"],
      "without_image": reports["without_image"]}
  if jax.process_index() == 0:
    epath.Path(paths["skipped"]).write_text(
        json.dumps(skipped, indent=1, ensure_ascii=False))
    summary["paths"] = [*summary["paths"], paths["skipped"]]
  return {**summary, "skipped": info["num_skipped"],
          "without_image": info["num_without_image"], "reused": False}


def latest_step(workdir: str) -> int | None:
  """The highest complete checkpoint step of a local workdir, from its folder
  names (orbax writes a step under a temporary name and renames it)."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return None
  steps = [int(name) for name in os.listdir(folder) if name.isdigit()]
  return max(steps, default=None)


def reusable_embeddings(output: str, source: dict, step: int | None) -> bool:
  """Whether OUTPUT's files were made from `source` at checkpoint `step`
  (default: the workdir's latest), so that a rerun may keep them."""
  paths = output_paths(output)
  if "mobilenet_image_size" in source:
    paths["photos"] = photos_path(output)
  if not all(os.path.isfile(path) for path in paths.values()):
    return False
  step = latest_step(source["workdir"]) if step is None else step
  try:
    with open(paths["ids"], encoding="utf-8") as file:
      ids = json.load(file)
  except (OSError, ValueError):
    return False
  return (isinstance(ids, dict) and ids.get("source") == source
          and step is not None and ids.get("step") == step)


def embed_catalogue_once(workdir: str, catalogue: str, output: str,
                         images: str | None = None, step: int | None = None,
                         view: str = "both",
                         modalities: str = DEFAULT_MODALITIES,
                         columns: dict | None = None,
                         batch_size: int | None = None,
                         num_workers: int | None = None,
                         mobilenet_image_size: int | None = None) -> dict:
  """`embed_catalogue`, unless OUTPUT already holds embeddings of the same
  catalogue file (path, size, modification time), images folder, flags and
  checkpoint step: then those are kept (`reused`), so that a neighbour
  search over them can resume. Several processes follow process 0's
  decision and read its files, so OUTPUT's folder must be shared."""
  images = images or os.path.dirname(os.path.abspath(catalogue))
  source = catalogue_source(workdir, catalogue, images, view, modalities, columns,
                            mobilenet_image_size)
  reuse = reusable_embeddings(output, source, step)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    reuse = bool(multihost_utils.broadcast_one_to_all(np.int32(reuse)))
  if reuse:
    ids = json.loads(epath.Path(output_paths(output)["ids"]).read_text())
    logging.info("embed: keeping %s (the same catalogue, flags and checkpoint "
                 "step %s)", output_paths(output)["array"], ids["step"])
    return {"count": len(ids["item_id"]), "step": ids["step"],
            "paths": list(output_paths(output).values()),
            "skipped": ids.get("skipped"), "reused": True}
  summary = embed_catalogue(workdir, catalogue, output, images, step, view,
                            modalities, columns, batch_size, num_workers,
                            mobilenet_image_size)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("item-jax embed: files written")
    if not os.path.isfile(output_paths(output)["ids"]):
      raise UserError(f"process {jax.process_index()} cannot see "
                      f"{output_paths(output)['ids']}, which process 0 wrote: "
                      "with several processes the output folder must be shared")
  return summary


class CatalogueEmbedder:
  """A run's embeddings of listings held in memory, preprocessed as in training.

    embedder = CatalogueEmbedder.from_workdir("runs/catalogue")
    vectors = embedder.embed(["Red kettle 1.7 l", None], [jpeg_bytes, "b.jpg"])

  Rows are L2-normalised float32, one per listing, in the order given. With
  several processes (`jax.distributed`) every process must call `embed` with
  the same listings.
  """

  def __init__(self, loaded: LoadedModel, tokenizer, max_image_side: int,
               batch_size: int | None = None):
    import tensorflow as tf
    self.loaded = loaded
    self.tokenizer = tokenizer
    self.max_image_side = int(max_image_side)
    config = loaded.settings.config
    self.max_title_len = int(config.data.max_title_len)
    self.image_size = int(loaded.settings.model.image_size)
    self._batch_size = batch_size
    self._embedders = {}
    size, resize = self.image_size, config.data.resize
    self._preprocess = tf.function(
        lambda jpeg: pipeline.preprocess_image(jpeg, size, resize,
                                               pipeline.IMAGE_MEAN,
                                               pipeline.IMAGE_STD),
        input_signature=[tf.TensorSpec([], tf.string)])

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   batch_size: int | None = None, devices=None
                   ) -> "CatalogueEmbedder":
    """The run in `workdir` at `step` (default: its latest checkpoint), with
    its tokenizer (`run_inputs`); `batch_size` listings per forward pass
    (default: 64 per batch shard of the devices)."""
    loaded, inputs, tokenizer = load_for_embedding(workdir, step, devices)
    return cls(loaded, tokenizer, inputs.max_image_side, batch_size)

  @property
  def step(self) -> int:
    return self.loaded.step

  @property
  def dim(self) -> int:
    return int(self.loaded.settings.model.hidden_size)

  def embed(self, titles: Sequence[str | None] | None = None,
            images: Sequence | None = None, view: str = "both") -> np.ndarray:
    """(listings, dim) float32 embeddings, L2-normalised.

    Args:
      titles: one title per listing, None (or blank) for a listing without one;
        None for no titles at all.
      images: one image per listing, None for a listing without one: the
        bytes of an image file, a path to one, a PIL image, or a uint8 array
        (height, width[, 1, 3 or 4 channels]); None for no images at all.
        Files and bytes take exactly `prepare`'s path; PIL images and arrays
        are first made upright RGB and stored losslessly, then the same.
      view: "both" (each listing with what it has), "title" or "image"
        (every listing must have that input), or "concat" (the title and
        image views side by side, 2 x dim; `embed.concat_views`).

    Raises:
      ValueError naming the listing's position: one with neither a title nor
      an image, one lacking the view's input, or an image that is refused
      (undecodable, truncated, empty, missing file).
    """
    if view not in VIEWS:
      raise ValueError(f"view {view!r}: expected one of {VIEWS}")
    if titles is None and images is None:
      raise ValueError("give titles, images or both")
    count = len(titles if titles is not None else images)
    titles = [None] * count if titles is None else list(titles)
    images = [None] * count if images is None else list(images)
    if len(titles) != len(images):
      raise ValueError(f"{len(titles)} titles but {len(images)} images: one "
                       "of each (or None) per listing")
    texts, has_title = [], np.zeros(count, bool)
    for position, title in enumerate(titles):
      if title is not None and not isinstance(title, str):
        raise ValueError(f"listing {position}: a title is a str or None, got "
                         f"{type(title).__name__}")
      texts.append(title or "")
      has_title[position] = bool((title or "").strip())
    jpegs = [self._jpeg(image, position) for position, image in enumerate(images)]
    has_image = np.asarray([jpeg is not None for jpeg in jpegs], bool)
    for position in range(count):
      if not (has_title[position] or has_image[position]):
        raise ValueError(f"listing {position} has neither a title nor an image")
    needs = {"title": has_title, "image": has_image}.get(view)
    if needs is not None and not needs.all():
      lacking = np.flatnonzero(~needs)
      raise ValueError(f"the {view} view needs every listing's {view}; listing "
                       f"{int(lacking[0])} has none ({len(lacking)} in all)")
    embedder = self._embedder(view)
    batch = eval_batch_size(embedder, self._batch_size)
    rows = []
    for start in range(0, count, batch):
      stop = min(start + batch, count)
      rows.append(embedder(self.loaded.params, self._batch(
          texts[start:stop], jpegs[start:stop], has_title[start:stop],
          has_image[start:stop], batch))[view])
    if not rows:
      return np.zeros((0, self.dim * (2 if view == "concat" else 1)), np.float32)
    return np.concatenate(rows).astype(np.float32)

  def _embedder(self, view: str) -> Embedder:
    if view not in self._embedders:
      self._embedders[view] = Embedder.of(self.loaded, views=(view,))
    return self._embedders[view]

  def _batch(self, texts, jpegs, has_title, has_image, size: int) -> dict:
    """A host batch as `pipeline.make_dataset` gives it, padded to `size`."""
    count = len(texts)
    image = np.zeros((size, self.image_size, self.image_size, 3), np.float32)
    for row, jpeg in enumerate(jpegs):
      if jpeg is not None:
        image[row] = self._preprocess(jpeg).numpy()
    title_ids = np.zeros((size, self.max_title_len), np.int32)
    title_ids[:count] = self.tokenizer.encode_batch(texts, self.max_title_len)
    pad = lambda flags: np.concatenate([flags, np.zeros(size - count, bool)])
    return {"title_ids": title_ids, "image": image, "has_title": pad(has_title),
            "has_image": pad(has_image),
            "valid": pad(np.ones(count, bool))}

  def _jpeg(self, image, position: int) -> bytes | None:
    """The stored form of one listing's image (None: no image)."""
    if image is None:
      return None
    if isinstance(image, (bytes, bytearray, memoryview)):
      jpeg, reason, _ = images_lib.encode_bytes(bytes(image), self.max_image_side)
    elif isinstance(image, (str, os.PathLike)):
      jpeg, reason, _ = images_lib.read_and_encode(os.fspath(image),
                                                   self.max_image_side)
    else:
      jpeg, reason, _ = images_lib.encode_bytes(_lossless(image, position),
                                                self.max_image_side)
    if reason:
      raise ValueError(f"listing {position}: image refused ({reason})")
    return jpeg


def _lossless(image, position: int) -> bytes:
  """A PIL image or uint8 pixel array as PNG bytes, upright RGB."""
  import io
  from PIL import Image
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
      raise ValueError(f"listing {position}: an image array must be uint8 of "
                       "shape (height, width) or (height, width, 1|3|4), got "
                       f"{image.dtype} {image.shape}")
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1
                            else image)
  elif not isinstance(image, Image.Image):
    raise ValueError(f"listing {position}: an image is bytes, a path, a PIL "
                     f"image or a uint8 array, got {type(image).__name__}")
  buffer = io.BytesIO()
  images_lib.to_rgb(image).save(buffer, "PNG")
  return buffer.getvalue()
