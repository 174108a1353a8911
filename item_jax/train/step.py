"""The pure training step: masks from a step-folded key, the weighted task
losses, AdamW update.

Parameters cross the JAX boundary as a plain `nnx.State` pytree (`nnx.split`),
so the same trees go to jit, orbax and conversion. A step whose loss or
gradient is not finite applies no update; the streak of such steps is kept in
the state so that the loop can stop a diverged run.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from item_jax.model import ItemModel, ModelConfig
from item_jax.objectives import (TASKS, ObjectiveConfig, TokenSpec,
                                 example_keys, pretraining_loss)


class TrainState(NamedTuple):
  step: jax.Array               # int32 scalar: steps taken (applied or skipped)
  params: Any                   # nnx.State of the model's parameters
  opt_state: Any                # optax state
  nonfinite_streak: jax.Array   # int32 scalar: consecutive non-finite steps


def init_model(config: ModelConfig, seed: int):
  """(graphdef, params) of a freshly initialised model."""
  return nnx.split(ItemModel(config, rngs=nnx.Rngs(params=seed)))


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
  # Two arrays, not one shared zero: the state is donated to the step.
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                    jnp.zeros((), jnp.int32))


def step_keys(seed: int, step) -> jax.Array:
  """A step's (mask key, dropout key): fold_in(key(seed), step), split in two."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), step))


def apply_update(optimizer: optax.GradientTransformation, grads, params,
                 opt_state, finite: jax.Array):
  """(params, opt_state) after one optimizer update, or as they were when
  `finite` (a boolean scalar) is False.

  A branch, not a select per array: selecting between the new and the old
  values would read the whole state once more every step (1.3x the update's
  time for `small` on CPU; benchmarks/optimizer_update.py).
  """
  def update(operands):
    params, opt_state = operands
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.lax.cond(finite, update, lambda operands: operands,
                      (params, opt_state))


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    objectives: ObjectiveConfig, tokens: TokenSpec, seed: int,
                    accumulation_steps: int = 1, task_gradient_every: int = 0):
  """Returns train_step(state, batch) -> (state, metrics), ready for jax.jit.

  Masks are drawn from fold_in(fold_in(seed, step), global example index), so
  they are identical whatever the batch layout or device mesh. `batch` holds
  `title_ids`, `image` and `index` (global example indices), optionally
  `valid`. With accumulation_steps > 1 the batch is split into that many
  micro-batches whose gradients are averaged before one update.

  With task_gradient_every = N > 0, every N-th step (and the first) also
  reports `grad_norm_<task>`: the global norm of each active task's weighted
  gradient alone, before clipping (one extra backward pass per task on those
  steps only; 0 on the others). Their ratios say which task the clipped
  update follows.
  """
  active = [task for task in TASKS if objectives.weight(task) > 0]

  def make_loss_fn(batch, mask_key, dropout_key):
    keys = example_keys(mask_key, batch["index"])

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      return pretraining_loss(model, batch, keys, objectives, tokens,
                              dropout_key=dropout_key)
    return loss_fn

  def loss_and_grads(params, batch, mask_key, dropout_key):
    loss_fn = make_loss_fn(batch, mask_key, dropout_key)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return metrics, grads

  def task_gradient_norms(params, batch, mask_key, dropout_key):
    loss_fn = make_loss_fn(batch, mask_key, dropout_key)
    norms = {}
    for task in active:
      task_loss = lambda params, task=task: (
          objectives.weight(task) * loss_fn(params)[1][task])
      norms[f"grad_norm_{task}"] = optax.global_norm(jax.grad(task_loss)(params))
    return norms

  def accumulated(params, batch, mask_key, dropout_key):
    micro = jax.tree.map(
        lambda x: x.reshape(accumulation_steps, -1, *x.shape[1:]), batch)

    def body(carry, inputs):
      index, micro_batch = inputs
      metrics, grads = loss_and_grads(params, micro_batch, mask_key,
                                      jax.random.fold_in(dropout_key, index))
      return jax.tree.map(jnp.add, carry, (metrics, grads)), None

    zeros = jax.tree.map(
        jnp.zeros_like,
        jax.eval_shape(loss_and_grads, params,
                       jax.tree.map(lambda x: x[0], micro), mask_key, dropout_key))
    total, _ = jax.lax.scan(body, zeros,
                            (jnp.arange(accumulation_steps), micro))
    return jax.tree.map(lambda x: x / accumulation_steps, total)

  def train_step(state: TrainState, batch: dict):
    mask_key, dropout_key = step_keys(seed, state.step)
    if accumulation_steps > 1:
      metrics, grads = accumulated(state.params, batch, mask_key, dropout_key)
    else:
      metrics, grads = loss_and_grads(state.params, batch, mask_key, dropout_key)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    params, opt_state = apply_update(optimizer, grads, state.params,
                                     state.opt_state, finite)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    metrics["grad_norm"] = grad_norm
    if task_gradient_every:
      due = (state.step % task_gradient_every == task_gradient_every - 1) | (
          state.step == 0)
      zeros = {f"grad_norm_{task}": jnp.zeros((), jnp.float32) for task in active}
      metrics.update(jax.lax.cond(
          due, lambda: task_gradient_norms(state.params, batch, mask_key,
                                           dropout_key),
          lambda: zeros))
    metrics["nonfinite"] = (~finite).astype(jnp.float32)
    metrics["nonfinite_streak"] = streak
    return TrainState(state.step + 1, params, opt_state, streak), metrics

  return train_step
