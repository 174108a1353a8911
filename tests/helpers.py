"""Small shared fixtures for the model and objective tests."""

import jax
import jax.numpy as jnp
from flax import nnx

from item_jax.model import ItemModel, model_config
from item_jax.objectives import TokenSpec

SPECIAL_TOKEN_IDS = (0, 1, 2, 3, 4)
TOKENS = TokenSpec(vocab_size=100, mask_token_id=4,
                   special_token_ids=SPECIAL_TOKEN_IDS)


def tiny_config(**overrides):
  fields = dict(vocab_size=100, image_size=32, patch_size=8, dropout_rate=0.0)
  return model_config("tiny", **{**fields, **overrides})


def tiny_model(seed=0, **overrides):
  return ItemModel(tiny_config(**overrides), rngs=nnx.Rngs(seed))


def tiny_batch(batch=4, title_len=10, image_size=32, seed=0):
  """Titles of varying length ending in [SEP] (id 3), padded with 0."""
  key_ids, key_image = jax.random.split(jax.random.key(seed))
  ids = jax.random.randint(key_ids, (batch, title_len), 5, 100)
  lengths = jnp.arange(batch) % (title_len - 3) + 3
  positions = jnp.arange(title_len)[None, :]
  ids = jnp.where(positions < lengths[:, None] - 1, ids, 0)
  ids = jnp.where(positions == lengths[:, None] - 1, 3, ids)
  image = jax.random.normal(key_image, (batch, image_size, image_size, 3))
  return {"title_ids": ids.astype(jnp.int32), "image": image}
