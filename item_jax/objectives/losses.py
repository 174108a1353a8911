"""The pre-training losses: the paper's five (ITM, MLM, MIM, GMLM, GMIM), the
image-text contrastive task (ITC), and their weighted sum.

`pretraining_loss` is pure and jittable: masks are drawn on device from
per-example keys (`mask_batch`), the model runs once on the masked, re-paired
batch, and each head sees only the positions it must predict. ITC adds one
title-only and one image-only pass over the clean listing (see
`contrastive_loss`).
"""

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from item_jax.model import ItemModel, ModelConfig, patchify
from item_jax.objectives import augment, masking

TASKS = ("itm", "mlm", "mim", "gmlm", "gmim", "itc")
# The paper's five; ITC is off unless its weight is set.
PAPER_TASKS = TASKS[:5]
# The [CLS] views ITC can contrast: the title-only pass, the image-only pass,
# the joint pass (title and image together), and the text pass: the
# listing's other text columns (`prepare --text-columns`, e.g. a
# description) read alone through the title segment, a second view of the
# listing's words that exists only in training (the embedding reads titles
# and photos as ever); and the crop view: the image-only pass over another
# look at the listing's photo (`augment.crop_view`: a random crop, mirrored
# half the time, brightness and contrast moved a little), also training only.
ITC_VIEWS = ("title", "image", "joint", "text", "crop")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Task weights (0 switches a task off) and masking settings."""

  itm_weight: float = 1.0
  mlm_weight: float = 1.0
  mim_weight: float = 1.0
  gmlm_weight: float = 1.0
  gmim_weight: float = 1.0
  # Image-text contrastive (InfoNCE, in-batch negatives both ways, learnable
  # temperature); 0 is the paper's recipe.
  itc_weight: float = 0.0
  # The pairs of [CLS] views ITC contrasts, "a:b" comma-separated, from
  # "title", "image", "joint" and "text" (e.g.
  # "title:image,joint:title,joint:image"; "title:text" needs a dataset
  # prepared with --text-columns, and config.data.max_text_len; "crop" reads
  # the photos' pixels, so not cached stem cells).
  itc_pairs: str = "title:image"
  # The crop view's smallest share of the photo's area (augment.CropSettings).
  crop_min_area: float = 0.4
  token_mask_rate: float = 0.15
  patch_mask_ratio: float = 0.4
  patch_mask_block_size: int = 2
  itm_negative_rate: float = 0.5
  # Regress per-patch normalised pixels (zero mean, unit variance per patch).
  normalize_patch_targets: bool = True
  # Modality dropout in the joint pass: the probability that a listing with
  # both inputs is seen there without its photo (joint_image_dropout) or
  # without its title (joint_title_dropout; never both), so that [CLS]
  # learns to stand on either input. The title and image views are never
  # dropped; a dropped input weighs nothing in the tasks that need it (ITM,
  # MLM/GMLM for a title, MIM/GMIM for a photo). 0 is the paper's recipe.
  joint_image_dropout: float = 0.0
  joint_title_dropout: float = 0.0
  # Stem neighbourhoods (a convolutional image stem only): the image view's
  # in-batch similarities are taught those of the frozen stem's pooled
  # features (`stem_neighbourhood_loss`), so that what ImageNet tells apart
  # stays apart; part of ITC's image view, so ITC must be on. 0 is off.
  stem_kd_weight: float = 0.0
  # Both softmaxes' temperature: 0.1 was chosen over 0.05 and 0.2 on the
  # hard synthetic split's validation listings (BENCHMARKS.md).
  stem_kd_temperature: float = 0.1

  def __post_init__(self):
    for task in TASKS:
      if getattr(self, f"{task}_weight") < 0:
        raise ValueError(f"objectives.{task}_weight must be >= 0")
    if not any(self.weight(task) for task in TASKS):
      raise ValueError("every objectives.*_weight is 0: nothing to train")
    if not 0.0 < self.token_mask_rate < 1.0:
      raise ValueError("objectives.token_mask_rate must be in (0, 1)")
    if not 0.0 <= self.itm_negative_rate < 1.0:
      raise ValueError("objectives.itm_negative_rate must be in [0, 1)")
    for name in ("joint_image_dropout", "joint_title_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"objectives.{name} must be in [0, 1)")
    self.itc_view_pairs()  # validates itc_pairs
    if not 0.0 < self.crop_min_area <= 1.0:
      raise ValueError("objectives.crop_min_area must be in (0, 1]")
    if self.stem_kd_weight < 0:
      raise ValueError("objectives.stem_kd_weight must be >= 0")
    if self.stem_kd_weight and not self.itc_weight:
      raise ValueError("objectives.stem_kd_weight needs ITC on "
                       "(objectives.itc_weight > 0): it teaches ITC's image view")
    if not self.stem_kd_temperature > 0:
      raise ValueError("objectives.stem_kd_temperature must be > 0")

  def itc_view_pairs(self) -> tuple[tuple[str, str], ...]:
    """`itc_pairs` parsed: ((view, view), ...)."""
    pairs = []
    for text in self.itc_pairs.split(","):
      views = tuple(part.strip() for part in text.split(":"))
      if (len(views) != 2 or views[0] == views[1]
          or not set(views) <= set(ITC_VIEWS)):
        raise ValueError(
            f"objectives.itc_pairs={self.itc_pairs!r}: each pair is two "
            f"different views of {ITC_VIEWS} as 'a:b', comma-separated")
      pairs.append(views)
    if len(set(pairs)) != len(pairs):
      raise ValueError(f"objectives.itc_pairs={self.itc_pairs!r} repeats a pair")
    return tuple(pairs)

  def weight(self, task: str) -> float:
    return getattr(self, f"{task}_weight")


@dataclasses.dataclass(frozen=True)
class TokenSpec:
  """What the masking must know of the tokenizer."""

  vocab_size: int
  mask_token_id: int
  special_token_ids: Sequence[int]


def normalized_patch_targets(image: jax.Array, patch_size: int,
                             normalize: bool) -> jax.Array:
  patches = patchify(image.astype(jnp.float32), patch_size)
  if not normalize:
    return patches
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + 1e-6)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


_EXCLUDED_LOGIT = -1e9


def _unit_rows(x: jax.Array) -> jax.Array:
  """Rows scaled to unit length in float32 (a zero row stays zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True),
                                       1e-24))


def contrastive_loss(a: jax.Array, b: jax.Array, scale: jax.Array,
                     weight: jax.Array,
                     product_ids: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE between rows of `a` and `b` (row i of each is a pair).

  Both are L2-normalised; the logits are scale * cosine. Each row of `a` picks
  its partner among all rows of `b` and the other way round (the mean of both
  cross-entropies). Rows of weight 0 (padding) are neither queries nor
  candidates. With `product_ids`, another listing of the same product is not
  counted as a negative. Inside a jitted step over a sharded batch, the
  (batch x batch) similarity covers the global batch.

  Args:
    a, b: (batch, dim) the two views' embeddings.
    scale: scalar multiplier of the cosine similarities (1 / temperature).
    weight: (batch,) float, 0 for rows that take no part.
    product_ids: optional (batch,) int.
  """
  a, b = _unit_rows(a), _unit_rows(b)
  logits = scale * jnp.einsum("id,jd->ij", a, b)
  batch = a.shape[0]
  # Candidates (columns, both ways) of weight 0 are excluded; a row's own
  # partner never is, so every cross-entropy is finite.
  excluded = (weight[None, :] <= 0) & ~jnp.eye(batch, dtype=bool)
  if product_ids is not None:
    same = product_ids[:, None] == product_ids[None, :]
    excluded = excluded | (same & ~jnp.eye(batch, dtype=bool))
  labels = jnp.arange(batch)
  a_to_b = optax.softmax_cross_entropy_with_integer_labels(
      jnp.where(excluded, _EXCLUDED_LOGIT, logits), labels)
  b_to_a = optax.softmax_cross_entropy_with_integer_labels(
      jnp.where(excluded, _EXCLUDED_LOGIT, logits.T), labels)
  per_example = jnp.where(weight > 0, 0.5 * (a_to_b + b_to_a), 0.0)
  return _weighted_mean(per_example, weight)


def stem_neighbourhood_loss(student: jax.Array, teacher: jax.Array,
                            temperature: float,
                            weight: jax.Array) -> jax.Array:
  """KL divergence from the teacher's in-batch neighbour distribution to the
  student's (relational distillation; no projection, so any widths).

  Each row's distribution over the batch's other rows is the softmax of its
  cosines / temperature; the teacher's is the target. A row's own column and
  rows of weight 0 are no neighbours; rows of weight 0 ask nothing.

  Args:
    student: (batch, dim) the image view's [CLS].
    teacher: (batch, channels) the frozen stem's pooled features.
    temperature: the softmax temperature of both.
    weight: (batch,) float.
  """
  batch = student.shape[0]
  excluded = (weight[None, :] <= 0) | jnp.eye(batch, dtype=bool)
  def logits(x):
    x = _unit_rows(x)
    return jnp.where(excluded, _EXCLUDED_LOGIT,
                     jnp.einsum("id,jd->ij", x, x) / temperature)
  target = jax.nn.softmax(jax.lax.stop_gradient(logits(teacher)), -1)
  per_row = -jnp.sum(target * jax.nn.log_softmax(logits(student), -1), -1)
  # The target's own entropy makes a perfect student score 0.
  per_row = per_row + jnp.sum(target * jnp.log(jnp.maximum(target, 1e-30)), -1)
  per_row = jnp.where((weight > 0) & (jnp.sum(weight > 0) > 1), per_row, 0.0)
  return _weighted_mean(per_row, weight)


def _gather(states: jax.Array, indices: jax.Array) -> jax.Array:
  """(batch, length, hidden), (batch, count) -> (batch, count, hidden)."""
  return jnp.take_along_axis(states, indices[..., None], axis=1)


class MaskedBatch(NamedTuple):
  """One batch after ITM pairing and masking: what the encoder sees and the
  heads must predict."""

  input_ids: jax.Array              # (batch, title_len) ids after token masking
  title_mask: jax.Array             # (batch, title_len) bool, the titles' real tokens
  image: jax.Array                  # (batch, H, W, C) the image paired with each title
  matched: jax.Array                # (batch,) bool: the pair is a match
  example_weight: jax.Array         # (batch,) float, 0 for padding examples
  has_title: jax.Array              # (batch,) bool: the example has a title
  image_present: jax.Array          # (batch,) bool: the paired image exists
  tokens: masking.TokenMasking | None    # when MLM or GMLM is on
  patches: masking.PatchMasking | None   # when MIM or GMIM is on
  image_source: jax.Array | None = None  # (batch,) the batch row of each image (ITM)


def mask_batch(config: ModelConfig, batch: dict, keys: jax.Array,
               objectives: ObjectiveConfig, tokens: TokenSpec) -> MaskedBatch:
  """Draws a batch's ITM pairing, token and patch masks from per-example keys.

  A listing without a title or without an image (batch["has_title"],
  batch["has_image"]) keeps its own pairing: it is never an ITM negative.
  """
  title_ids, image = batch["title_ids"], _image(batch)
  valid = batch.get("valid")
  example_weight = (jnp.ones(title_ids.shape[0], jnp.float32) if valid is None
                    else valid.astype(jnp.float32))
  has_title, has_image = presence(batch)
  # One key per task, the same whichever other tasks are switched on.
  task_keys = jax.vmap(lambda key: jax.random.split(key, 3))(keys)
  pair_keys, token_keys, patch_keys = (task_keys[:, i] for i in range(3))
  active = {task for task in TASKS if objectives.weight(task) > 0}

  if "itm" in active:
    pairing = masking.pair_for_itm(pair_keys,
                                   negative_rate=objectives.itm_negative_rate,
                                   product_ids=batch.get("product_id"))
    complete = has_title & has_image
    image_source = jnp.where(complete, pairing.image_source,
                             jnp.arange(title_ids.shape[0]))
    image = jnp.take(image, image_source, axis=0)
    matched = pairing.matched | ~complete
    image_present = jnp.take(has_image, image_source, axis=0)
  else:
    image_source = None
    matched = jnp.ones(title_ids.shape[0], bool)
    image_present = has_image

  token_masking = patch_masking = None
  input_ids = title_ids
  if active & {"mlm", "gmlm"}:
    token_masking = masking.mask_tokens(
        token_keys, title_ids, vocab_size=tokens.vocab_size,
        mask_token_id=tokens.mask_token_id,
        special_token_ids=tokens.special_token_ids,
        rate=objectives.token_mask_rate)
    input_ids = token_masking.input_ids
  if active & {"mim", "gmim"}:
    patch_masking = masking.mask_patches(
        patch_keys, config.patches_per_side, ratio=objectives.patch_mask_ratio,
        block_size=objectives.patch_mask_block_size)
  has_title, image_present = _drop_modalities(keys, objectives, has_title,
                                              image_present)
  title_mask = (title_ids != config.pad_token_id) & has_title[:, None]
  return MaskedBatch(input_ids, title_mask, image, matched, example_weight,
                     has_title, image_present, token_masking, patch_masking,
                     image_source)


# Folded into each example's key for modality dropout, so that switching it
# on leaves every other task's masks as they were.
_MODALITY_DROPOUT_FOLD = 3


def _drop_modalities(keys: jax.Array, objectives: ObjectiveConfig,
                     has_title: jax.Array, image_present: jax.Array):
  """(has_title, image_present) of the joint pass after modality dropout:
  only a listing that has both loses one, the photo first."""
  if not (objectives.joint_image_dropout or objectives.joint_title_dropout):
    return has_title, image_present
  draws = jax.vmap(lambda key: jax.random.uniform(
      jax.random.fold_in(key, _MODALITY_DROPOUT_FOLD), (2,)))(keys)
  both = has_title & image_present
  drop_image = both & (draws[:, 0] < objectives.joint_image_dropout)
  drop_title = both & ~drop_image & (draws[:, 1] < objectives.joint_title_dropout)
  return has_title & ~drop_title, image_present & ~drop_image


def _stem_cells(model: ItemModel, batch: dict) -> jax.Array | None:
  """A convolutional stem's cells of the batch's clean photos, computed once
  for every pass of the step that reads them (none when no listing has a
  photo); None for the patch embedding, which costs nothing to redo."""
  if "image_cells" in batch:
    return batch["image_cells"]
  if model.config.image_stem == "patches":
    return None
  return model.embeddings.image_tokens_input(batch["image"], None,
                                             presence(batch)[1])


def _image(batch: dict) -> jax.Array:
  """The batch's photos: pixels, or a frozen stem's cached cells
  (`image_cells`, data.stem_cells="cached"), which stand in for them; the
  encoder then reads only their rows, as `image_tokens_input`."""
  return batch["image_cells"] if "image_cells" in batch else batch["image"]


def presence(batch: dict) -> tuple[jax.Array, jax.Array]:
  """(has_title, has_image) bool (batch,) of a batch; all True when absent."""
  ones = jnp.ones(batch["title_ids"].shape[0], bool)
  return (batch.get("has_title", ones).astype(bool),
          batch.get("has_image", ones).astype(bool))


def pretraining_loss(model: ItemModel, batch: dict, keys: jax.Array,
                     objectives: ObjectiveConfig, tokens: TokenSpec,
                     dropout_key: jax.Array | None = None):
  """Total weighted loss and per-task metrics for one batch.

  Args:
    model: the ITEm model.
    batch: `title_ids` (batch, len) int, `image` (batch, H, W, C) float, and
      optionally `valid` (batch,) bool (padding examples weigh nothing),
      `has_title` / `has_image` (batch,) bool (each task counts only the
      examples that have its inputs: ITM both, MLM/GMLM a title, MIM/GMIM
      an image, each ITC view its own; each loss is the mean over those),
      and `product_id` (batch,) int (ITM: same-product pairs count as
      matched; ITC: another listing of the same product is no negative).
    keys: (batch,) per-example PRNG keys (see masking.example_keys).
    dropout_key: enables dropout when given.
  Returns:
    (total_loss, metrics) where metrics holds each active task's loss.
  """
  config = model.config
  active = {task for task in TASKS if objectives.weight(task) > 0}
  masked = mask_batch(config, batch, keys, objectives, tokens)
  token_masking, patch_masking = masked.tokens, masked.patches
  image, matched, example_weight = masked.image, masked.matched, masked.example_weight
  # Reconstruction is learnt on matched pairs only.
  reconstruction_weight = example_weight * matched.astype(jnp.float32)
  # The joint pass keeps the step's dropout key; ITC's passes fold in theirs.
  itc_dropout_keys = ((None, None) if dropout_key is None else
                      tuple(jax.random.fold_in(dropout_key, i) for i in (1, 2)))

  cells = _stem_cells(model, batch)
  encoded = None
  if active - {"itc"}:
    # The clean photos' cells, re-paired as ITM re-paired the photos; a
    # masked batch's cells are computed from its masked pixels.
    main_cells = None
    if cells is not None and patch_masking is None:
      main_cells = (cells if masked.image_source is None
                    else jnp.take(cells, masked.image_source, axis=0))
    encoded = model.encode(
        masked.input_ids, image, title_mask=masked.title_mask,
        masked_patches=None if patch_masking is None else patch_masking.masked,
        image_mask=masked.image_present, dropout_key=dropout_key,
        image_tokens_input=main_cells)

  losses = {}
  if "itc" in active:
    losses.update(_itc_losses(model, batch, objectives, encoded, masked,
                              reconstruction_weight, example_weight,
                              dropout_key, itc_dropout_keys, cells, keys))
  if "itm" in active:
    logits = model.itm_logits(encoded.cls)
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits, matched.astype(jnp.int32))
    itm_weight = example_weight * (masked.has_title & masked.image_present)
    losses["itm"] = _weighted_mean(per_example, itm_weight)
    losses["itm_accuracy"] = _weighted_mean(
        (jnp.argmax(logits, -1) == matched).astype(jnp.float32), itm_weight)
  if token_masking is not None:
    token_weight = token_masking.weights * (
        reconstruction_weight * masked.has_title)[:, None]
    for task, logits_fn in (
        ("mlm", lambda: model.mlm_logits(
            _gather(encoded.title_states, token_masking.indices))),
        ("gmlm", lambda: model.gmlm_logits(encoded.cls, token_masking.indices))):
      if task in active:
        per_token = optax.softmax_cross_entropy_with_integer_labels(
            logits_fn(), token_masking.labels)
        losses[task] = _weighted_mean(per_token, token_weight)
  if patch_masking is not None:
    targets = _gather(
        normalized_patch_targets(image, config.patch_size,
                                 objectives.normalize_patch_targets),
        patch_masking.indices)
    patch_weight = jnp.broadcast_to(
        (reconstruction_weight * masked.image_present)[:, None],
        patch_masking.indices.shape)
    for task, pixels_fn in (
        ("mim", lambda: model.mim_pixels(
            _gather(encoded.patch_states, patch_masking.indices))),
        ("gmim", lambda: model.gmim_pixels(encoded.cls, patch_masking.indices))):
      if task in active:
        per_patch = jnp.mean(jnp.square(pixels_fn() - targets), axis=-1)
        losses[task] = _weighted_mean(per_patch, patch_weight)

  total = sum(objectives.weight(task) * losses[task] for task in TASKS
              if task in active)
  return total, {"loss": total, **losses}


def _itc_losses(model: ItemModel, batch: dict, objectives: ObjectiveConfig,
                encoded, joint_masks: MaskedBatch, joint_weight: jax.Array,
                example_weight: jax.Array, joint_dropout_key,
                dropout_keys, cells: jax.Array | None = None,
                keys: jax.Array | None = None) -> dict:
  """ITC over `objectives.itc_pairs`: the mean of each pair's InfoNCE.

  The title-only and image-only views are extra passes over the clean title
  and image; the text view one over `text_ids` alone through the title
  segment, weighted by `has_text` (dropout key: the title view's folded with
  3); the crop view one over each photo's crop view (`augment.crop_view`,
  drawn from the example `keys`; dropout key: the image view's folded with
  1). With `objectives.stem_kd_weight`, the image view's stem
  neighbourhood loss (reported as `stem_kd`) is added to ITC's at
  stem_kd_weight / itc_weight. The joint view is the main (masked, ITM
  re-paired) pass's [CLS] when another task runs it, counting only matched
  pairs; otherwise a clean joint pass (either way with `joint_masks`'
  modality dropout). Each view counts only the listings that have its
  inputs (the joint view: either), and a pair only those that have both its
  views:
  for a title-only listing, joint:title contrasts its masked title (the main
  pass) with its clean one, which still teaches the title side.
  """
  pairs = objectives.itc_view_pairs()
  needed = {view for pair in pairs for view in pair}
  if objectives.stem_kd_weight:
    needed.add("image")
  title_ids, image = batch["title_ids"], _image(batch)
  has_title, has_image = presence(batch)
  title_mask = (title_ids != model.config.pad_token_id) & has_title[:, None]
  views, weights = {}, {}
  if "title" in needed:
    views["title"] = model.encode(title_ids, None, title_mask=title_mask,
                                  dropout_key=dropout_keys[0]).cls
    weights["title"] = example_weight * has_title
  if "text" in needed:
    text_ids = batch["text_ids"]
    has_text = batch["has_text"].astype(bool)
    views["text"] = model.encode(
        text_ids, None,
        title_mask=(text_ids != model.config.pad_token_id) & has_text[:, None],
        dropout_key=(None if dropout_keys[0] is None
                     else jax.random.fold_in(dropout_keys[0], 3))).cls
    weights["text"] = example_weight * has_text
  if "image" in needed:
    views["image"] = model.encode(None, image, image_mask=has_image,
                                  dropout_key=dropout_keys[1],
                                  image_tokens_input=cells).cls
    weights["image"] = example_weight * has_image
  if "crop" in needed:
    crops = augment.crop_view(batch["image"], keys, augment.CropSettings(
        min_area=objectives.crop_min_area))
    views["crop"] = model.encode(
        None, crops, image_mask=has_image,
        dropout_key=(None if dropout_keys[1] is None
                     else jax.random.fold_in(dropout_keys[1], 1))).cls
    weights["crop"] = example_weight * has_image
  if "joint" in needed:
    if encoded is None:
      views["joint"] = model.encode(title_ids, image,
                                    title_mask=joint_masks.title_mask,
                                    image_mask=joint_masks.image_present,
                                    dropout_key=joint_dropout_key,
                                    image_tokens_input=cells).cls
      weights["joint"] = example_weight * (has_title | has_image)
    else:
      views["joint"] = encoded.cls
      weights["joint"] = joint_weight * (has_title | has_image)
  scale = model.itc_scale()
  per_pair = [contrastive_loss(views[a], views[b], scale,
                               jnp.minimum(weights[a], weights[b]),
                               batch.get("product_id"))
              for a, b in pairs]
  losses = {"itc": sum(per_pair) / len(per_pair), "itc_temperature": 1.0 / scale}
  if objectives.stem_kd_weight:
    if cells is None:
      raise ValueError("objectives.stem_kd_weight needs a convolutional image "
                       "stem (model.image_stem): the patch embedding has no "
                       "pretrained features to keep")
    losses["stem_kd"] = stem_neighbourhood_loss(
        views["image"], jnp.mean(cells.astype(jnp.float32), axis=1),
        objectives.stem_kd_temperature, example_weight * has_image)
    # Weighted inside ITC's loss, so that every task's weight stays as it was.
    losses["itc"] += objectives.stem_kd_weight / objectives.itc_weight * losses["stem_kd"]
  return losses
