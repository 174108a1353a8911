"""The ITEm model: one BERT-style encoder over [CLS] + title tokens + image patches.

`encode` runs the encoder; the five task heads are separate methods so that the
objectives gather masked positions first and project only those.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from item_jax.model.config import ModelConfig
from item_jax.model.mobilenet import MobileNetStem, to_imagenet_normalisation
from item_jax.model.layers import (ACTIVATION_AXES, Dense, EncoderBlock, LayerNorm,
                                   constrain, dropout, gelu, param)

TEXT_TYPE, IMAGE_TYPE = 0, 1
# The input pipeline's pixel normalisation, (x/255 - mean)/std
# (`item_jax.data.pipeline.IMAGE_MEAN/IMAGE_STD`): a convolutional stem
# undoes it for ImageNet's.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# log(1 / 0.07) and log(100): CLIP's initial and largest contrastive logit scale.
ITC_INITIAL_LOGIT_SCALE = 2.6592600369327779
ITC_MAX_LOGIT_SCALE = 4.605170185988092


class Encoded(NamedTuple):
  """Encoder outputs; a modality that was not given is None."""

  cls: jax.Array                    # (batch, hidden)
  title_states: jax.Array | None    # (batch, title_len, hidden)
  patch_states: jax.Array | None    # (batch, num_patches, hidden)


def patchify(image: jax.Array, patch_size: int) -> jax.Array:
  """(batch, H, W, C) -> (batch, num_patches, patch_size * patch_size * C).

  Patches are row-major over the grid; each patch's pixels are (row, col, channel).
  """
  batch, height, width, channels = image.shape
  rows, cols = height // patch_size, width // patch_size
  patches = image.reshape(batch, rows, patch_size, cols, patch_size, channels)
  patches = patches.transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(batch, rows * cols, patch_size * patch_size * channels)


def cell_pixel_mask(masked_patches: jax.Array, config: ModelConfig) -> jax.Array:
  """(batch, num_patches) bool -> (batch, image_size, image_size) bool: the
  pixels of each masked cell (cells row-major, as `patchify`)."""
  side, size = config.patches_per_side, config.patch_size
  grid = masked_patches.reshape(masked_patches.shape[0], side, side)
  return jnp.repeat(jnp.repeat(grid, size, axis=1), size, axis=2)


_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _call_layer(layer, x, token_mask, key):
  return layer(x, token_mask, key)


def _layer_runner(remat: str):
  """Calls one encoder block, rematerialised in the backward pass if asked."""
  if remat == "none":
    return _call_layer
  return nnx.remat(_call_layer, policy=_REMAT_POLICIES[remat])


class Embeddings(nnx.Module):
  """Word, title-position, image-position and modality-type embeddings."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    hidden, dtype = config.hidden_size, config.compute_dtype
    init = jax.nn.initializers.truncated_normal(config.initializer_range)
    self.word_embeddings = param(rngs, init, (config.vocab_size, hidden),
                                 ("vocab", "embed"))
    self.title_position_embeddings = param(
        rngs, init, (config.max_title_positions, hidden), ("position", "embed"))
    self.image_position_embeddings = param(
        rngs, init, (config.num_patches, hidden), ("position", "embed"))
    self.type_embeddings = param(rngs, init, (2, hidden), ("type", "embed"))
    self.cls_token = param(rngs, init, (hidden,), ("embed",))
    self.mask_patch_embedding = param(rngs, init, (hidden,), ("embed",))
    if config.image_stem == "mobilenet_v2":
      self.image_stem = MobileNetStem(config.patch_size, rngs=rngs)
    self.patch_embedding = Dense(config.image_token_input_dim, hidden,
                                 ("patch", "embed"),
                                 rngs=rngs, dtype=dtype,
                                 initializer_range=config.initializer_range)
    self.norm = LayerNorm(hidden, config.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.config = config

  def cls(self, batch: int) -> jax.Array:
    value = (self.cls_token[...] + self.title_position_embeddings[0]
             + self.type_embeddings[TEXT_TYPE])
    return jnp.broadcast_to(value, (batch, 1, value.shape[-1]))

  def title(self, title_ids: jax.Array) -> jax.Array:
    length = title_ids.shape[1]
    if length + 1 > self.config.max_title_positions:
      raise ValueError(f"title length {length} + [CLS] exceeds "
                       f"max_title_positions={self.config.max_title_positions}")
    words = jnp.take(self.word_embeddings[...], title_ids, axis=0)
    positions = self.title_position_embeddings[1:length + 1]
    return words + positions + self.type_embeddings[TEXT_TYPE]

  def image_tokens_input(self, image: jax.Array,
                         masked_patches: jax.Array | None,
                         present: jax.Array | None = None) -> jax.Array:
    """(batch, num_patches, image_token_input_dim): what the patch embedding
    projects. A convolutional stem sees a masked cell's pixels as ImageNet's
    mean colour (zero after its normalisation), so no token, the cell's own
    or a neighbour's, carries a masked cell's pixels. It runs only when some
    listing of the batch has a photo (`present`, (batch,) bool): a batch of
    titles alone costs it nothing (its tokens are zeros nobody attends to)."""
    if self.config.image_stem == "patches":
      return patchify(image, self.config.patch_size)
    pixels = to_imagenet_normalisation(image.astype(jnp.float32), IMAGE_MEAN,
                                       IMAGE_STD)
    if masked_patches is not None:
      pixels = jnp.where(cell_pixel_mask(masked_patches, self.config)[..., None],
                         0.0, pixels)
    pixels = pixels.astype(self.config.compute_dtype)
    if present is None:
      cells = self.image_stem(pixels)
    else:
      shape = jax.eval_shape(self.image_stem, pixels)
      cells = jax.lax.cond(jnp.any(present), self.image_stem,
                           lambda pixels: jnp.zeros(shape.shape, shape.dtype),
                           pixels)
    if self.config.freeze_image_stem:
      cells = jax.lax.stop_gradient(cells)
    batch, rows, cols, channels = cells.shape
    return cells.reshape(batch, rows * cols, channels)

  def image(self, image: jax.Array, masked_patches: jax.Array | None,
            present: jax.Array | None = None,
            tokens_input: jax.Array | None = None) -> jax.Array:
    inputs = (self.image_tokens_input(image, masked_patches, present)
              if tokens_input is None else tokens_input)
    patches = self.patch_embedding(inputs).astype(jnp.float32)
    if masked_patches is not None:
      patches = jnp.where(masked_patches[..., None],
                          self.mask_patch_embedding[...], patches)
    return (patches + self.image_position_embeddings[...]
            + self.type_embeddings[IMAGE_TYPE])


class ItemModel(nnx.Module):
  """ITEm: a joint title + image encoder with ITM, MLM, MIM, GMLM and GMIM heads
  and the ITC logit scale."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    hidden, dtype = config.hidden_size, config.compute_dtype
    dense = lambda n_in, n_out, axes: Dense(
        n_in, n_out, axes, rngs=rngs, dtype=dtype,
        initializer_range=config.initializer_range)
    norm = lambda: LayerNorm(hidden, config.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.config = config
    self.embeddings = Embeddings(config, rngs=rngs)
    self.layers = nnx.List([EncoderBlock(config, rngs=rngs)
                            for _ in range(config.num_layers)])
    # ITM: BERT's pooler (dense + tanh on [CLS]) then a 2-way classifier.
    self.pooler = dense(hidden, hidden, ("embed", "embed_out"))
    self.itm_classifier = dense(hidden, 2, ("embed", "classes"))
    # MLM: transform, then a decoder tied to the word embeddings.
    self.mlm_transform = dense(hidden, hidden, ("embed", "embed_out"))
    self.mlm_norm = norm()
    self.mlm_bias = param(rngs, jax.nn.initializers.zeros, (config.vocab_size,),
                          ("vocab",))
    # MIM: per-patch pixel regression from the patch's own output.
    self.mim_transform = dense(hidden, hidden, ("embed", "embed_out"))
    self.mim_norm = norm()
    self.mim_decoder = dense(hidden, config.patch_dim, ("embed", "patch"))
    # GMLM / GMIM: from [CLS] concatenated with the masked position's embedding.
    self.gmlm_transform = dense(2 * hidden, hidden, ("embed", "embed_out"))
    self.gmlm_norm = norm()
    self.gmlm_bias = param(rngs, jax.nn.initializers.zeros, (config.vocab_size,),
                           ("vocab",))
    self.gmim_transform = dense(2 * hidden, hidden, ("embed", "embed_out"))
    self.gmim_norm = norm()
    self.gmim_decoder = dense(hidden, config.patch_dim, ("embed", "patch"))
    # ITC: the learnable logit scale (inverse temperature, as a log) of the
    # image-text contrastive task, CLIP's start of 1 / 0.07. Shape (1,), not
    # (): safetensors stores no 0-d tensors.
    self.itc_logit_scale = param(
        rngs, jax.nn.initializers.constant(ITC_INITIAL_LOGIT_SCALE), (1,),
        ("scalar",))

  def encode(self, title_ids: jax.Array | None = None,
             image: jax.Array | None = None, *,
             title_mask: jax.Array | None = None,
             masked_patches: jax.Array | None = None,
             image_mask: jax.Array | None = None,
             dropout_key: jax.Array | None = None,
             num_layers: int | None = None,
             image_tokens_input: jax.Array | None = None) -> Encoded:
    """Runs the encoder on whichever modalities are given.

    Args:
      title_ids: (batch, title_len) int token ids, without [CLS].
      image: (batch, image_size, image_size, channels) normalised pixels.
      title_mask: (batch, title_len) bool, True for real tokens; defaults to
        `title_ids != pad_token_id`.
      masked_patches: (batch, num_patches) bool, patches replaced by the mask
        embedding.
      image_mask: (batch,) bool, False for a listing without an image: none
        of its patches is attended to (a title-only listing in a batch that
        has images). A listing without a title has an all-False title_mask.
      dropout_key: PRNG key enabling dropout (training); None disables it.
      num_layers: run only the first this many blocks (default all), e.g. to
        read the input of the last block when inspecting its attention.
      image_tokens_input: `Embeddings.image_tokens_input` of `image`, already
        computed (a convolutional stem's cells, shared by several passes of
        one step); masked_patches then only swaps in the mask vector.
    """
    if title_ids is None and image is None:
      raise ValueError("encode needs title_ids, image, or both")
    batch = (title_ids if title_ids is not None else image).shape[0]
    parts = [self.embeddings.cls(batch)]
    masks = [jnp.ones((batch, 1), bool)]
    if title_ids is not None:
      if title_mask is None:
        title_mask = title_ids != self.config.pad_token_id
      parts.append(self.embeddings.title(title_ids))
      masks.append(title_mask.astype(bool))
    if image is not None:
      present = (jnp.ones((batch,), bool) if image_mask is None
                 else image_mask.astype(bool))
      parts.append(self.embeddings.image(
          image, masked_patches, None if image_mask is None else present,
          image_tokens_input))
      masks.append(jnp.broadcast_to(present[:, None],
                                    (batch, self.config.num_patches)))
    token_mask = jnp.concatenate(masks, axis=1)
    keys = ([None] * (len(self.layers) + 1) if dropout_key is None
            else list(jax.random.split(dropout_key, len(self.layers) + 1)))
    x = self.embeddings.norm(jnp.concatenate(parts, axis=1))
    x = constrain(dropout(x, self.config.dropout_rate, keys[0]), ACTIVATION_AXES)
    run_layer = _layer_runner(self.config.remat)
    for layer, key in zip(self.layers[:num_layers], keys[1:]):
      x = run_layer(layer, x, token_mask, key)
    title_len = 0 if title_ids is None else title_ids.shape[1]
    return Encoded(
        cls=x[:, 0],
        title_states=None if title_ids is None else x[:, 1:1 + title_len],
        patch_states=None if image is None else x[:, 1 + title_len:])

  def embed(self, title_ids: jax.Array | None = None,
            image: jax.Array | None = None, *,
            title_mask: jax.Array | None = None,
            image_mask: jax.Array | None = None,
            image_tokens_input: jax.Array | None = None) -> jax.Array:
    """The listing embedding: the L2-normalised [CLS] output, float32.
    `image_tokens_input` as `encode` takes it (several views of one batch
    sharing one run of a convolutional stem)."""
    cls = self.encode(title_ids, image, title_mask=title_mask,
                      image_mask=image_mask,
                      image_tokens_input=image_tokens_input).cls
    cls = cls.astype(jnp.float32)
    return cls / jnp.maximum(jnp.linalg.norm(cls, axis=-1, keepdims=True), 1e-12)

  def itc_scale(self) -> jax.Array:
    """The contrastive logits' multiplier exp(logit scale), at most 100."""
    return jnp.exp(jnp.minimum(self.itc_logit_scale[0], ITC_MAX_LOGIT_SCALE))

  def itm_logits(self, cls: jax.Array) -> jax.Array:
    """(batch, hidden) -> (batch, 2) logits: [no match, match]."""
    pooled = jnp.tanh(self.pooler(cls))
    return self.itm_classifier(pooled).astype(jnp.float32)

  def _vocab_logits(self, hidden: jax.Array, bias: nnx.Param) -> jax.Array:
    words = self.embeddings.word_embeddings[...].astype(hidden.dtype)
    logits = jnp.einsum("...h,vh->...v", hidden, words)
    return logits.astype(jnp.float32) + bias[...]

  def mlm_logits(self, token_states: jax.Array) -> jax.Array:
    """Masked tokens' own outputs (..., hidden) -> (..., vocab) logits."""
    hidden = self.mlm_norm(gelu(self.mlm_transform(token_states)))
    return self._vocab_logits(hidden, self.mlm_bias)

  def mim_pixels(self, patch_states: jax.Array) -> jax.Array:
    """Masked patches' own outputs (..., hidden) -> (..., patch_dim) pixels."""
    hidden = self.mim_norm(gelu(self.mim_transform(patch_states)))
    return self.mim_decoder(hidden).astype(jnp.float32)

  def _global_input(self, cls: jax.Array, position_embeddings: jax.Array):
    # [CLS] (batch, hidden) beside each masked position's embedding
    # (batch, count, hidden): the position's own encoder output is never used.
    cls = jnp.broadcast_to(cls[:, None, :], position_embeddings.shape)
    return jnp.concatenate(
        [cls, position_embeddings.astype(cls.dtype)], axis=-1)

  def gmlm_logits(self, cls: jax.Array, title_indices: jax.Array) -> jax.Array:
    """[CLS] + title position embeddings -> (batch, count, vocab) logits.

    `title_indices` index title_ids (0-based); their positions are 1 + index
    since [CLS] holds position 0.
    """
    positions = jnp.take(self.embeddings.title_position_embeddings[...],
                         title_indices + 1, axis=0)
    hidden = self.gmlm_transform(self._global_input(cls, positions))
    hidden = self.gmlm_norm(gelu(hidden))
    return self._vocab_logits(hidden, self.gmlm_bias)

  def gmim_pixels(self, cls: jax.Array, patch_indices: jax.Array) -> jax.Array:
    """[CLS] + patch position embeddings -> (batch, count, patch_dim) pixels."""
    positions = jnp.take(self.embeddings.image_position_embeddings[...],
                         patch_indices, axis=0)
    hidden = self.gmim_transform(self._global_input(cls, positions))
    hidden = self.gmim_norm(gelu(hidden))
    return self.gmim_decoder(hidden).astype(jnp.float32)
