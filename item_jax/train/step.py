"""The pure training step: masks from a step-folded key, five losses, AdamW update.

Parameters cross the JAX boundary as a plain `nnx.State` pytree (`nnx.split`),
so the same trees go to jit, orbax and conversion.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from item_jax.model import ItemModel, ModelConfig
from item_jax.objectives import (ObjectiveConfig, TokenSpec, example_keys,
                                 pretraining_loss)


class TrainState(NamedTuple):
  step: jax.Array       # int32 scalar: updates applied so far
  params: Any           # nnx.State of the model's parameters
  opt_state: Any        # optax state


def init_model(config: ModelConfig, seed: int):
  """(graphdef, params) of a freshly initialised model."""
  return nnx.split(ItemModel(config, rngs=nnx.Rngs(params=seed)))


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    objectives: ObjectiveConfig, tokens: TokenSpec, seed: int):
  """Returns train_step(state, batch) -> (state, metrics), ready for jax.jit.

  Masks are drawn from fold_in(fold_in(seed, step), global example index), so
  they are identical whatever the batch layout or device mesh. `batch` holds
  `title_ids`, `image` and `index` (global example indices), optionally `valid`.
  """
  base_key = jax.random.key(seed)

  def train_step(state: TrainState, batch: dict):
    step_key = jax.random.fold_in(base_key, state.step)
    mask_key, dropout_key = jax.random.split(step_key)
    keys = example_keys(mask_key, batch["index"])

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      return pretraining_loss(model, batch, keys, objectives, tokens,
                              dropout_key=dropout_key)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step
