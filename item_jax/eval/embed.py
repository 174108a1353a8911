"""Embeddings of a prepared split: the model from a training workdir (or freshly
initialised), one jitted pass sharded over the mesh's batch axes (with the
[CLS] attention share on image patches), and the `item-jax embed` output files.

Every process reads the whole split and holds every result: evaluation sets
are small next to training, and metrics need all listings in one place.
The model's attention (`item_jax.model.layers.attention`, or cuDNN's fused
kernel) returns no weights, so the last block's [CLS] attention is recomputed
here from that block's input and its own query and key projections.
"""

import dataclasses
import json
import logging
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from item_jax.data import pipeline
from item_jax.errors import (MissingDependencyError, MissingInputError, UserError,
                             no_training_run)
from item_jax.eval.outputs import photos_path
from item_jax.eval.search import fetch_global, progress_line, put_global
from item_jax.model import ItemModel
from item_jax.model.mobilenet import FEATURE_DIM as MOBILENET_DIM
from item_jax.train import image_stem
from item_jax.train import checkpoint as checkpoint_lib
from item_jax.train import sharding
from item_jax.train.config import (TrainSettings, base_config, validate,
                                   validate_without_data)
from item_jax.train.optimizer import make_optimizer

# "both": the joint pass's [CLS] (title and image together, the paper's);
# "title", "image": a pass over one input; "concat": the title and image
# passes side by side (`concat_views`), one more way to embed both inputs.
VIEWS = ("both", "title", "image", "concat")
ATTENTION_OUTPUTS = ("image_attention_share", "image_token_share")


def concat_views(title: jax.Array, image: jax.Array, has_title: jax.Array,
                 has_image: jax.Array) -> jax.Array:
  """(batch, 2 x hidden): the title view beside the image view (unit rows,
  as `ItemModel.embed` gives them), both scaled by 1 / sqrt(2), so that the
  cosine of two listings is the mean of their title views' cosine and
  their image views' cosine. A listing without one input has the other's
  view in its place (ITC's title:image pair puts both in one space), so
  its scores stay on the scale of the others'."""
  title_half = jnp.where(has_title[:, None], title, image)
  image_half = jnp.where(has_image[:, None], image, title)
  return jnp.concatenate([title_half, image_half], axis=-1) / jnp.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model's pure parts, placed on a mesh, and the settings it trained with."""

  graphdef: nnx.GraphDef
  params: nnx.State
  param_shardings: nnx.State
  settings: TrainSettings
  mesh: jax.sharding.Mesh
  step: int     # the checkpoint's step; 0 for a freshly initialised model


def load_model(workdir: str, step: int | None = None, data_dir: str | None = None,
               devices=None, initialise: bool = False,
               vocab_size: int | None = None) -> LoadedModel:
  """The model of a training workdir at `step` (default: its latest checkpoint).

  `data_dir` replaces the config's data.dir (its tokenizer must be the one the
  model trained with). The mesh keeps the run's fsdp/model axes where they
  divide the devices present and puts the rest on `data`. `initialise` gives
  the same model as the run started from (same config and seed), untrained.
  `vocab_size` (the run's tokenizer's, for listings that are no prepared
  split) builds the settings without reading any dataset.json, so the
  training data need not be there.
  """
  workdir = epath.Path(workdir)
  if not (workdir / "config.json").exists():
    raise MissingInputError(no_training_run(workdir))
  config = base_config()
  config.update(ml_collections.ConfigDict(
      json.loads((workdir / "config.json").read_text())).to_dict())
  if data_dir is not None:
    _check_same_tokenizer(config.data.dir, data_dir)
    config.data.dir = str(data_dir)
  devices = devices or jax.devices()
  if len(devices) % (config.mesh.fsdp * config.mesh.model):
    config.mesh.fsdp, config.mesh.model = 1, 1
  config.mesh.data = -1
  batch_shards = len(devices) // config.mesh.model
  config.global_batch_size = batch_shards
  config.grad_accumulation_steps = 1
  config.eval_every_steps = 0
  if vocab_size is None:
    settings = validate(config, len(devices), jax.process_count())
  else:
    settings = validate_without_data(config, vocab_size, len(devices),
                                     jax.process_count())
  mesh = sharding.make_mesh(settings.mesh_shape, devices)
  optimizer = make_optimizer(settings.optimizer)
  if initialise:
    graphdef, state, shardings = sharding.create_train_state(
        settings.model, optimizer, mesh, config.seed)
    # Untrained as training starts: a convolutional stem is ImageNet's.
    params = image_stem.with_pretrained_stem(state.params, settings.model, workdir,
                                             write=False)
    return LoadedModel(graphdef, params, shardings.params, settings, mesh, 0)
  graphdef, abstract_state, shardings = sharding.abstract_train_state(
      settings.model, optimizer, mesh, config.seed)
  checkpointer = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", config.checkpoint_every_steps, config.keep_checkpoints)
  try:
    state, meta = checkpointer.restore(checkpoint_lib.abstract_with_shardings(
        abstract_state, shardings), step)
  finally:
    checkpointer.close()
  return LoadedModel(graphdef, state.params, shardings.params, settings, mesh,
                     int(meta["step"]))


def _check_same_tokenizer(trained_on: str | None, data_dir: str):
  info = pipeline.load_dataset_info(data_dir)
  if not trained_on or not (epath.Path(trained_on) / "dataset.json").exists():
    logging.warning("cannot check that %s uses the training data's tokenizer "
                    "(%s is not readable)", data_dir, trained_on)
    return
  trained_info = pipeline.load_dataset_info(trained_on)
  ours = (epath.Path(data_dir) / info["tokenizer"]).read_bytes()
  theirs = (epath.Path(trained_on) / trained_info["tokenizer"]).read_bytes()
  if ours != theirs:
    raise UserError(f"{data_dir} was prepared with another tokenizer than the "
                    f"training data {trained_on}; run `item-jax prepare "
                    f"--tokenizer {trained_on}/{trained_info['tokenizer']}`")


def last_layer_cls_attention(model: ItemModel, title_ids: jax.Array,
                             image: jax.Array, title_mask: jax.Array | None = None,
                             image_mask: jax.Array | None = None,
                             image_tokens_input: jax.Array | None = None) -> jax.Array:
  """(batch, heads, 1 + title_len + num_patches) float32 attention
  probabilities of [CLS] in the last block, over [CLS], title tokens, patches."""
  if title_mask is None:
    title_mask = title_ids != model.config.pad_token_id
  if image_mask is None:
    image_mask = jnp.ones(title_ids.shape[0], bool)
  before_last = model.encode(title_ids, image, title_mask=title_mask,
                             image_mask=image_mask,
                             num_layers=len(model.layers) - 1,
                             image_tokens_input=image_tokens_input)
  inputs = jnp.concatenate([before_last.cls[:, None], before_last.title_states,
                            before_last.patch_states], axis=1)
  batch, length, _ = inputs.shape
  attention = model.layers[-1].attention
  heads, head_dim = attention.num_heads, attention.head_dim
  query = attention.query(inputs[:, :1]).reshape(batch, heads, head_dim)
  key = attention.key(inputs).reshape(batch, length, heads, head_dim)
  logits = jnp.einsum("bhd,bkhd->bhk", query.astype(jnp.float32),
                      key.astype(jnp.float32)) / jnp.sqrt(jnp.float32(head_dim))
  num_patches = before_last.patch_states.shape[1]
  token_mask = jnp.concatenate(
      [jnp.ones((batch, 1), bool), title_mask.astype(bool),
       jnp.broadcast_to(image_mask[:, None], (batch, num_patches))], axis=1)
  logits = jnp.where(token_mask[:, None, :], logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def image_attention_share(model: ItemModel, title_ids: jax.Array,
                          image: jax.Array, title_mask: jax.Array | None = None,
                          image_mask: jax.Array | None = None,
                          image_tokens_input: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """Per listing: (the share of [CLS]'s last-block attention, averaged over
  heads, that lands on image patches; the share image patches have among the
  attended tokens, which is what uniform attention would give)."""
  if title_mask is None:
    title_mask = title_ids != model.config.pad_token_id
  if image_mask is None:
    image_mask = jnp.ones(title_ids.shape[0], bool)
  probabilities = last_layer_cls_attention(model, title_ids, image, title_mask,
                                           image_mask, image_tokens_input)
  first_patch = 1 + title_ids.shape[1]
  share = probabilities[..., first_patch:].sum(axis=-1).mean(axis=-1)
  num_patches = (probabilities.shape[-1] - first_patch) * image_mask
  attended = 1 + title_mask.sum(axis=-1) + num_patches
  return share, num_patches / attended.astype(jnp.float32)


class Embedder:
  """A jitted forward pass giving each view's embedding (and, optionally, the
  [CLS] attention share) for one global batch; inputs are split over the
  mesh's batch axes, outputs come back whole to every process.

  Each listing is embedded with what it has (batch["has_title"],
  batch["has_image"]): "both" of a title-only listing is its title alone. A
  view whose input a listing lacks ("image" of a title-only listing) is the
  [CLS] of what remains; evaluation scores each view only on the listings
  that have its inputs (`SplitEmbeddings.has`). "concat" runs the title and
  image passes (`concat_views`)."""

  def __init__(self, graphdef: nnx.GraphDef, param_shardings, mesh,
               views=VIEWS, attention: bool = False):
    if not set(views) <= set(VIEWS):
      raise ValueError(f"views {views}: expected some of {VIEWS}")

    def forward(params, title_ids, image, has_title, has_image):
      with sharding.activation_shardings(mesh):
        return _forward(params, title_ids, image, has_title, has_image)

    def _forward(params, title_ids, image, has_title, has_image):
      model = nnx.merge(graphdef, params)
      title_mask = (title_ids != model.config.pad_token_id) & has_title[:, None]
      # One run of the image stem for every pass over the photos: XLA does
      # not share it across the stem's skip-without-photos conditional. With
      # the image view it runs as that view always did (no skip); the joint
      # view and the attention share mask the tokens of listings without one.
      passes = set(views) - {"concat"}
      if "concat" in views:
        passes |= {"title", "image"}
      tokens = None
      if sum((*(view in passes for view in ("both", "image")), attention)) > 1:
        tokens = model.embeddings.image_tokens_input(
            image, None, None if "image" in passes else has_image)
      inputs = {"both": dict(title_ids=title_ids, image=image, title_mask=title_mask,
                             image_mask=has_image, image_tokens_input=tokens),
                "title": dict(title_ids=title_ids, title_mask=title_mask),
                "image": dict(image=image, image_tokens_input=tokens)}
      embedded = {view: model.embed(**inputs[view]) for view in VIEWS if view in passes}
      if "concat" in views:
        embedded["concat"] = concat_views(embedded["title"], embedded["image"],
                                          has_title, has_image)
      outputs = {view: embedded[view] for view in views}
      if attention:
        outputs.update(zip(ATTENTION_OUTPUTS, image_attention_share(
            model, title_ids, image, title_mask, has_image, tokens)))
      return outputs

    self.batch_sharding = sharding.batch_sharding(mesh)
    self.batch_multiple = math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES)
    self._forward = jax.jit(
        forward, in_shardings=(param_shardings, *[self.batch_sharding] * 4),
        out_shardings=sharding.replicated(mesh))

  @classmethod
  def of(cls, loaded: LoadedModel, views=VIEWS, attention: bool = False):
    return cls(loaded.graphdef, loaded.param_shardings, loaded.mesh, views,
               attention)

  def __call__(self, params, batch: dict) -> dict:
    """{output: numpy (valid rows, ...)} for a host batch every process holds."""
    everything = np.ones(len(batch["valid"]), bool)
    outputs = self._forward(params, *[
        put_global(batch.get(name, everything), self.batch_sharding)
        for name in ("title_ids", "image", "has_title", "has_image")])
    return {name: fetch_global(value)[batch["valid"]]
            for name, value in outputs.items()}


@dataclasses.dataclass
class SplitEmbeddings:
  """Everything evaluation reads about a split's listings, row-aligned."""

  item_ids: np.ndarray          # str
  product_ids: np.ndarray       # str
  category_ids: np.ndarray      # int, -1 without a category
  titles: list[str]
  outputs: dict                 # (run, output) -> (num_listings, ...) array
  has_title: np.ndarray         # bool
  has_image: np.ndarray         # bool
  # The records' other text columns (`prepare --text-columns`), "" without.
  texts: list[str] = dataclasses.field(default_factory=list)

  def has(self, view: str) -> np.ndarray:
    """Which listings have the inputs of `view` (a VIEWS name, "title" or
    "image"): "both" is every listing, each embedded with what it has."""
    if view == "title":
      return self.has_title
    if view == "image":
      return self.has_image
    return np.ones(len(self.item_ids), bool)

  def kinds(self) -> dict:
    """How many listings have both inputs, only a title, only an image."""
    return {"title_and_image": int(np.sum(self.has_title & self.has_image)),
            "title_only": int(np.sum(self.has_title & ~self.has_image)),
            "image_only": int(np.sum(~self.has_title & self.has_image))}


def read_split(data_dir: str, split: str, settings: TrainSettings,
               batch_size: int, max_examples: int | None = None):
  """Host batches of `split` (or its first `max_examples` listings), padded
  with invalid rows to `batch_size`; every process reads all of them."""
  config = settings.config
  dataset = pipeline.make_dataset(
      data_dir, split, batch_size, settings.model.image_size,
      config.data.max_title_len, training=False, process_index=0,
      process_count=1, resize=config.data.resize, keep_titles=True)
  remaining = math.inf if max_examples is None else max_examples
  for batch in dataset.as_numpy_iterator():
    if remaining <= 0:
      return
    batch["valid"] = batch["valid"] & (np.cumsum(batch["valid"]) <= remaining)
    remaining -= int(batch["valid"].sum())
    yield batch


def own_products(product_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
  """Product ids with each empty one replaced by one of the listing's own
  ("item:<item_id>"), as `prepare` splits them: a listing without a product
  id has no same-product partner, and must not join the others that lack one."""
  empty = np.char.str_len(product_ids.astype(str)) == 0
  if not empty.any():
    return product_ids
  return np.where(empty, np.char.add("item:", item_ids.astype(str)), product_ids)


def split_count(data_dir: str, split: str, limit: int | None = None) -> int:
  """How many listings `split` of `data_dir` holds (at most `limit`)."""
  count = int(pipeline.load_dataset_info(data_dir)["splits"][split]["count"])
  return count if limit is None else min(count, limit)


def embed_split(batches, runs: dict, host_features: dict | None = None,
                total: int | None = None, log_every_batches: int = 20
                ) -> SplitEmbeddings:
  """Runs every `runs[name] = (embedder, params)` on each batch.

  Outputs are keyed (run name, output name); `host_features[key]` maps a host
  batch to (valid rows, ...) features computed on the host, stored under key.
  With `total` (listings), progress with an ETA is logged every
  `log_every_batches` batches.
  """
  started, done = time.perf_counter(), 0
  parts = {"item_id": [], "product_id": [], "category_id": [], "title": [],
           "has_title": [], "has_image": []}
  outputs = {}
  for batch in batches:
    valid = batch["valid"]
    if "text" in batch and not done:
      parts.setdefault("text", [])
    for name in parts:
      parts[name].append(batch[name][valid])
    for run, (embedder, params) in runs.items():
      for output, value in embedder(params, batch).items():
        outputs.setdefault((run, output), []).append(value)
    for key, features in (host_features or {}).items():
      outputs.setdefault(key, []).append(features(batch))
    done += int(valid.sum())
    if total and len(parts["item_id"]) % log_every_batches == 0:
      logging.info(progress_line("embed", "listings", done, total, 0,
                                 time.perf_counter() - started))
  text = lambda values: np.asarray([v.decode("utf-8") for v in values], dtype=str)
  joined = {name: np.concatenate(values) for name, values in parts.items()}
  return SplitEmbeddings(
      item_ids=text(joined["item_id"]), product_ids=text(joined["product_id"]),
      category_ids=joined["category_id"].astype(np.int64),
      titles=list(text(joined["title"])),
      outputs={key: np.concatenate(values) for key, values in outputs.items()},
      has_title=joined["has_title"].astype(bool),
      has_image=joined["has_image"].astype(bool),
      texts=list(text(joined["text"])) if "text" in joined else [""] * len(joined["item_id"]))


def on_images(features, dim: int):
  """A host feature of a batch's valid listings that have an image (`dim`
  columns); zero rows for the others (evaluation leaves them out), and for
  a whole batch without an image."""

  def compute(batch):
    valid = batch["valid"]
    has_image = batch.get("has_image", np.ones_like(valid))[valid]
    images = batch["image"][valid]
    out = np.zeros((len(images), dim), np.float32)
    if has_image.any():
      out[has_image] = features(images[has_image])
    return out

  return compute


def eval_batch_size(embedder: Embedder, requested: int | None = None,
                    per_device: int = 64) -> int:
  """`requested` (default `per_device` per batch shard) rounded up to split
  evenly over the mesh's batch axes."""
  multiple = embedder.batch_multiple
  return math.ceil((requested or per_device * multiple) / multiple) * multiple


def write_embeddings(output: str, embeddings: np.ndarray, split: SplitEmbeddings,
                     meta: dict) -> tuple[str, str]:
  """OUTPUT.npy (float32 rows) and OUTPUT.ids.json (item, product and category
  id of each row, plus `meta`); returns both paths."""
  base = str(output).removesuffix(".npy")
  array_path, ids_path = base + ".npy", base + ".ids.json"
  epath.Path(array_path).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(array_path).open("wb") as file:
    np.save(file, np.asarray(embeddings, np.float32))
  epath.Path(ids_path).write_text(json.dumps({
      **meta, "item_id": split.item_ids.tolist(),
      "product_id": split.product_ids.tolist(),
      "category_id": split.category_ids.tolist(),
      "has_title": split.has_title.tolist(), "has_image": split.has_image.tolist(),
      "title": list(split.titles)}))
  return array_path, ids_path


def embed_command(workdir: str, data_dir: str, split: str, output: str,
                  step: int | None = None, view: str = "both",
                  batch_size: int | None = None,
                  mobilenet_image_size: int | None = None) -> dict:
  """`item-jax embed`: one view's embeddings of every listing of `split` that
  has the view's inputs ("both": every listing, with what it has); with
  `mobilenet_image_size`, ImageNet MobileNetV2's photo features too
  (`embed_to_files`)."""
  photo_model = (None if mobilenet_image_size is None
                 else load_photo_model(mobilenet_image_size))
  loaded = load_model(workdir, step, data_dir)
  return embed_to_files(loaded, data_dir, split, output, view, batch_size,
                        {"workdir": str(workdir), "split": split}, photo_model)


def load_photo_model(image_size: int):
  """ImageNet MobileNetV2 at `image_size`, as `item-jax eval`'s baseline
  runs it; a MissingDependencyError naming what to install without it."""
  from item_jax.eval.mobilenet import load_mobilenet
  model, why = load_mobilenet(image_size=image_size)
  if model is None:
    raise MissingDependencyError(f"MobileNetV2's photo features: {why}")
  return model


def embed_to_files(loaded: LoadedModel, data_dir: str, split: str, output: str,
                   view: str = "both", batch_size: int | None = None,
                   meta: dict | None = None, photo_model=None) -> dict:
  """`loaded`'s `view` embeddings of `split` of `data_dir` written as
  `write_embeddings` does (process 0 writes), `meta` added to the ids file;
  returns embed_command's summary.

  With `photo_model` (`load_photo_model`: every process loads it, before
  any listing is read, so a missing one fails them all alike), the same
  batches also go through ImageNet MobileNetV2 at its size, exactly as
  `item-jax eval`'s baseline (and so its fused "VIEW + MobileNetV2 +
  TF-IDF" entries) reads them, on process 0, the one that writes, into
  OUTPUT.mobilenet.npy (`photos_path`): one unit row per embedding row, a
  zero row for a listing without a photo."""
  writer = jax.process_index() == 0
  embedder = Embedder.of(loaded, views=(view,))
  batches = read_split(data_dir, split, loaded.settings,
                       eval_batch_size(embedder, batch_size))
  host_features = ({} if photo_model is None or not writer else
                   {("mobilenet", "image"): on_images(photo_model.embed, MOBILENET_DIM)})
  result = embed_split(batches, {"model": (embedder, loaded.params)}, host_features,
                       total=split_count(data_dir, split))
  kinds = result.kinds()
  keep = result.has(view)
  if not keep.all():
    logging.warning("embed: %d listings of %s have no %s and are left out of "
                    "the %s view (listings: %s)", int((~keep).sum()), split, view,
                    view, kinds)
    result = _rows(result, keep)
  embeddings = result.outputs[("model", view)]
  paths = ()
  photo_meta = ({} if photo_model is None else
                {"mobilenet_image_size": int(photo_model.image_size)})
  if writer:
    # The photo features first, the ids file last: an ids file names only
    # what is complete, and an earlier run's photo file never outlives it.
    photos = epath.Path(photos_path(output))
    if photo_model is not None:
      photos.parent.mkdir(parents=True, exist_ok=True)
      with photos.open("wb") as file:
        np.save(file, np.asarray(result.outputs[("mobilenet", "image")], np.float32))
    elif photos.exists():
      photos.unlink()
    paths = write_embeddings(output, embeddings, result, {
        **(meta or {}), "step": loaded.step, "modality": view, "listings": kinds,
        "left_out": int((~keep).sum()), **photo_meta})
    if photo_model is not None:
      paths = (*paths, str(photos))
  return {"count": len(embeddings), "dim": int(embeddings.shape[1]),
          "step": loaded.step, "paths": list(paths), "listings": kinds,
          "left_out": int((~keep).sum()), **photo_meta}


def _rows(split: SplitEmbeddings, keep: np.ndarray) -> SplitEmbeddings:
  """The listings of `split` where `keep` is True."""
  return SplitEmbeddings(
      item_ids=split.item_ids[keep], product_ids=split.product_ids[keep],
      category_ids=split.category_ids[keep],
      titles=[title for title, kept in zip(split.titles, keep) if kept],
      outputs={key: value[keep] for key, value in split.outputs.items()},
      has_title=split.has_title[keep], has_image=split.has_image[keep])
