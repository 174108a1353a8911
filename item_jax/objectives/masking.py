"""On-device masking for pre-training: title tokens, image patches, ITM pairings.

Every function takes one PRNG key per example and draws that example's mask
from its own key, so a mask depends only on (key, example) and never on the
batch it travels in, the batch size, or the device mesh. Each example makes a
single uniform draw that is sliced into its parts: every threefry call costs
compile time, so one draw instead of several keeps the step quick to compile.
"""

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


class TokenMasking(NamedTuple):
  input_ids: jax.Array   # (batch, title_len) ids after 80/10/10 corruption
  indices: jax.Array     # (batch, max_predictions) title indices to predict
  labels: jax.Array      # (batch, max_predictions) original ids there
  weights: jax.Array     # (batch, max_predictions) 1.0 for real predictions


class PatchMasking(NamedTuple):
  masked: jax.Array      # (batch, num_patches) bool
  indices: jax.Array     # (batch, num_masked) patch indices, all masked


class ItmPairing(NamedTuple):
  image_source: jax.Array  # (batch,) which example's image each title is paired with
  matched: jax.Array       # (batch,) bool: the pair is the listing's own image


def example_keys(key: jax.Array, example_index: jax.Array) -> jax.Array:
  """One key per example, folded from its global index (mesh-independent)."""
  return jax.vmap(lambda index: jax.random.fold_in(key, index))(example_index)


def max_predictions(title_len: int, rate: float) -> int:
  """Prediction slots per title: enough that stochastic rounding never caps."""
  return max(1, math.ceil(title_len * rate))


def mask_tokens(keys: jax.Array, title_ids: jax.Array, *, vocab_size: int,
                mask_token_id: int, special_token_ids: Sequence[int],
                rate: float = 0.15,
                num_predictions: int | None = None) -> TokenMasking:
  """BERT masking: `rate` of the maskable tokens, replaced 80/10/10.

  Special tokens (padding, [SEP], ...) are never chosen. The count per title is
  rate * maskable count, stochastically rounded so its expectation is exact.
  Random replacements are drawn above the largest special id (special and
  reserved ids sit at the bottom of both sentencepiece and WordPiece vocabularies).
  """
  title_len = title_ids.shape[1]
  slots = num_predictions or max_predictions(title_len, rate)
  special = jnp.asarray(tuple(special_token_ids), title_ids.dtype)
  first_regular_id = max(special_token_ids) + 1
  if first_regular_id >= vocab_size:
    raise ValueError(f"vocab_size={vocab_size} leaves no regular tokens above "
                     f"the special ids {tuple(special_token_ids)}")

  def one(key, ids):
    draw = jax.random.uniform(key, (title_len + 2 * slots + 1,))
    choose, kind = draw[:title_len], draw[title_len:title_len + slots]
    random_draw, rounding = draw[title_len + slots:-1], draw[-1]
    maskable = ~jnp.isin(ids, special)
    count = jnp.sum(maskable)
    num_masked = jnp.floor(rate * count + rounding)
    num_masked = jnp.minimum(num_masked, slots).astype(jnp.int32)
    scores = jnp.where(maskable, choose, -1.0)
    _, indices = jax.lax.top_k(scores, slots)
    valid = (jnp.arange(slots) < num_masked) & maskable[indices]
    labels = ids[indices]
    random_ids = first_regular_id + jnp.floor(
        random_draw * (vocab_size - first_regular_id)).astype(ids.dtype)
    random_ids = jnp.minimum(random_ids, vocab_size - 1)
    replaced = jnp.where(kind < 0.8, jnp.asarray(mask_token_id, ids.dtype),
                         jnp.where(kind < 0.9, random_ids, labels))
    input_ids = ids.at[indices].set(jnp.where(valid, replaced, labels))
    return TokenMasking(input_ids, indices.astype(jnp.int32), labels,
                        valid.astype(jnp.float32))

  return jax.vmap(one)(keys, title_ids)


def num_masked_patches(num_patches: int, ratio: float) -> int:
  return max(1, round(num_patches * ratio))


def mask_patches(keys: jax.Array, patches_per_side: int, *, ratio: float,
                 block_size: int = 1) -> PatchMasking:
  """Masks round(ratio * num_patches) patches per image.

  block_size 1 masks patches independently; block_size b > 1 masks whole b x b
  blocks of a randomly offset grid (the last block chosen may be partial), which
  makes reconstruction from immediate neighbours harder.
  """
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"patch mask ratio {ratio} must be in (0, 1)")
  if block_size < 1:
    raise ValueError(f"patch mask block_size {block_size} must be >= 1")
  num_patches = patches_per_side ** 2
  count = num_masked_patches(num_patches, ratio)
  blocks_per_side = -(-patches_per_side // block_size) + 1

  num_blocks = blocks_per_side ** 2

  def one(key):
    draw = jax.random.uniform(key, (num_blocks + num_patches + 2,))
    block_scores = draw[:num_blocks].reshape(blocks_per_side, blocks_per_side)
    grid = jnp.repeat(jnp.repeat(block_scores, block_size, 0), block_size, 1)
    offset = jnp.floor(draw[-2:] * block_size).astype(jnp.int32)
    grid = jax.lax.dynamic_slice(grid, offset, (patches_per_side, patches_per_side))
    # Ties inside a block are broken randomly, far below the gap between blocks.
    ties = draw[num_blocks:num_blocks + num_patches] * 1e-4
    scores = grid.reshape(-1) + ties
    _, indices = jax.lax.top_k(scores, count)
    masked = jnp.zeros((num_patches,), bool).at[indices].set(True)
    return PatchMasking(masked, indices.astype(jnp.int32))

  return jax.vmap(one)(keys)


def pair_for_itm(keys: jax.Array, *, negative_rate: float = 0.5,
                 product_ids: jax.Array | None = None) -> ItmPairing:
  """Pairs each title with another listing's image with probability negative_rate.

  The other image comes from a random other position of the batch. When
  product ids are given, a pair whose image shows the same product counts as
  matched (another seller's photo of the same item is not a negative).
  """
  batch = keys.shape[0]
  if batch < 2 and negative_rate > 0:
    raise ValueError("ITM negatives need a batch of at least 2 listings")

  def one(key, position):
    negative_draw, shift_draw = jax.random.uniform(key, (2,))
    negative = negative_draw < negative_rate
    # A shift in 1..batch-1 never lands on the listing itself.
    shift = 1 + jnp.minimum(jnp.floor(shift_draw * (batch - 1)),
                            batch - 2).astype(jnp.int32)
    return jnp.where(negative, (position + shift) % batch, position)

  source = jax.vmap(one)(keys, jnp.arange(batch)).astype(jnp.int32)
  if product_ids is None:
    matched = source == jnp.arange(batch)
  else:
    matched = product_ids[source] == product_ids
  return ItmPairing(source, matched)
