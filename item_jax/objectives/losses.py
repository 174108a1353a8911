"""The five pre-training losses (ITM, MLM, MIM, GMLM, GMIM) and their weighted sum.

`pretraining_loss` is pure and jittable: masks are drawn on device from
per-example keys (`mask_batch`), the model runs once on the masked, re-paired
batch, and each head sees only the positions it must predict.
"""

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from item_jax.model import ItemModel, ModelConfig, patchify
from item_jax.objectives import masking

TASKS = ("itm", "mlm", "mim", "gmlm", "gmim")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Task weights (0 switches a task off) and masking settings."""

  itm_weight: float = 1.0
  mlm_weight: float = 1.0
  mim_weight: float = 1.0
  gmlm_weight: float = 1.0
  gmim_weight: float = 1.0
  token_mask_rate: float = 0.15
  patch_mask_ratio: float = 0.4
  patch_mask_block_size: int = 2
  itm_negative_rate: float = 0.5
  # Regress per-patch normalised pixels (zero mean, unit variance per patch).
  normalize_patch_targets: bool = True

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
  tokens: masking.TokenMasking | None    # when MLM or GMLM is on
  patches: masking.PatchMasking | None   # when MIM or GMIM is on


def mask_batch(config: ModelConfig, batch: dict, keys: jax.Array,
               objectives: ObjectiveConfig, tokens: TokenSpec) -> MaskedBatch:
  """Draws a batch's ITM pairing, token and patch masks from per-example keys."""
  title_ids, image = batch["title_ids"], batch["image"]
  valid = batch.get("valid")
  example_weight = (jnp.ones(title_ids.shape[0], jnp.float32) if valid is None
                    else valid.astype(jnp.float32))
  # One key per task, the same whichever other tasks are switched on.
  task_keys = jax.vmap(lambda key: jax.random.split(key, 3))(keys)
  pair_keys, token_keys, patch_keys = (task_keys[:, i] for i in range(3))
  active = {task for task in TASKS if objectives.weight(task) > 0}

  if "itm" in active:
    pairing = masking.pair_for_itm(pair_keys,
                                   negative_rate=objectives.itm_negative_rate,
                                   product_ids=batch.get("product_id"))
    image = jnp.take(image, pairing.image_source, axis=0)
    matched = pairing.matched
  else:
    matched = jnp.ones(title_ids.shape[0], bool)

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
  return MaskedBatch(input_ids, title_ids != config.pad_token_id, image,
                     matched, example_weight, token_masking, patch_masking)


def pretraining_loss(model: ItemModel, batch: dict, keys: jax.Array,
                     objectives: ObjectiveConfig, tokens: TokenSpec,
                     dropout_key: jax.Array | None = None):
  """Total weighted loss and per-task metrics for one batch.

  Args:
    model: the ITEm model.
    batch: `title_ids` (batch, len) int, `image` (batch, H, W, C) float, and
      optionally `valid` (batch,) bool (padding examples weigh nothing) and
      `product_id` (batch,) int (ITM: same-product pairs count as matched).
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

  encoded = model.encode(
      masked.input_ids, image, title_mask=masked.title_mask,
      masked_patches=None if patch_masking is None else patch_masking.masked,
      dropout_key=dropout_key)

  losses = {}
  if "itm" in active:
    logits = model.itm_logits(encoded.cls)
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits, matched.astype(jnp.int32))
    losses["itm"] = _weighted_mean(per_example, example_weight)
    losses["itm_accuracy"] = _weighted_mean(
        (jnp.argmax(logits, -1) == matched).astype(jnp.float32), example_weight)
  if token_masking is not None:
    token_weight = token_masking.weights * reconstruction_weight[:, None]
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
    patch_weight = jnp.broadcast_to(reconstruction_weight[:, None],
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
