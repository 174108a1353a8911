"""Optimizer schedule and decay mask, the pure train step, the random-data run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOKENS, tiny_batch, tiny_config
from item_jax.objectives import ObjectiveConfig
from item_jax.train.optimizer import (OptimizerConfig, learning_rate_schedule,
                                      make_optimizer, weight_decay_mask)
from item_jax.train.step import init_model, init_train_state, make_train_step


def test_schedule_warms_up_linearly_then_decays_to_the_end_rate():
  for decay in ("cosine", "linear"):
    schedule = learning_rate_schedule(OptimizerConfig(
        learning_rate=1.0, warmup_steps=10, total_steps=110, decay=decay,
        end_learning_rate=0.1))
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(110)) == pytest.approx(0.1)
    assert float(schedule(60)) == pytest.approx(0.55, abs=1e-6)


def test_weight_decay_skips_biases_norms_and_vectors():
  _, params = init_model(tiny_config(), seed=0)
  mask = weight_decay_mask(params)
  assert mask["layers"][0]["intermediate"]["kernel"].value
  assert mask["embeddings"]["word_embeddings"].value
  assert not mask["layers"][0]["intermediate"]["bias"].value
  assert not mask["layers"][0]["output_norm"]["scale"].value
  assert not mask["embeddings"]["norm"]["bias"].value
  assert not mask["embeddings"]["cls_token"].value


def test_decay_leaves_norms_alone_when_gradients_are_zero():
  _, params = init_model(tiny_config(), seed=0)
  optimizer = make_optimizer(OptimizerConfig(
      learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  assert float(jnp.abs(updates["embeddings"]["norm"]["scale"].value).max()) == 0.0
  assert float(jnp.abs(updates["layers"][0]["intermediate"]["kernel"].value).max()) > 0


@pytest.mark.parametrize("field, value, message", [
    ("decay", "step", "optimizer.decay"),
    ("warmup_steps", 20, "optimizer.warmup_steps"),
    ("learning_rate", 0.0, "optimizer.learning_rate"),
])
def test_bad_optimizer_settings_are_named(field, value, message):
  with pytest.raises(ValueError, match=message):
    OptimizerConfig(**{"total_steps": 10, "warmup_steps": 0, field: value})


def test_train_step_is_deterministic_and_counts_steps():
  config = tiny_config(dropout_rate=0.1)
  graphdef, params = init_model(config, seed=0)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1,
                                             total_steps=10))
  step = jax.jit(make_train_step(graphdef, optimizer, ObjectiveConfig(), TOKENS,
                                 seed=3))
  batch = dict(tiny_batch(batch=4), index=jnp.arange(4, dtype=jnp.int32))
  first, metrics_a = step(init_train_state(params, optimizer), batch)
  again, metrics_b = step(init_train_state(params, optimizer), batch)
  assert int(first.step) == 1
  assert float(metrics_a["loss"]) == float(metrics_b["loss"])
  np.testing.assert_array_equal(
      first.params["mlm_bias"].value, again.params["mlm_bias"].value)
  second, metrics_c = step(first, batch)
  assert int(second.step) == 2
  assert float(metrics_c["loss"]) != float(metrics_a["loss"])
  assert np.isfinite(float(metrics_a["grad_norm"]))


def test_gradient_accumulation_matches_the_whole_batch():
  # MIM alone (no ITM re-pairing, which depends on the batch) weighs every
  # example equally, so two half-batch means average to the whole-batch mean
  # and the accumulated update equals the full one.
  graphdef, params = init_model(tiny_config(), seed=0)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0,
                                             total_steps=10))
  objectives = ObjectiveConfig(itm_weight=0.0, mlm_weight=0.0, gmlm_weight=0.0,
                               gmim_weight=0.0)
  batch = dict(tiny_batch(batch=8), index=jnp.arange(8, dtype=jnp.int32))
  results = {}
  for accumulation in (1, 2):
    step = jax.jit(make_train_step(graphdef, optimizer, objectives, TOKENS, seed=0,
                                   accumulation_steps=accumulation))
    results[accumulation] = step(init_train_state(params, optimizer), batch)
  (whole, whole_metrics), (accumulated, accumulated_metrics) = results[1], results[2]
  assert float(accumulated_metrics["loss"]) == pytest.approx(
      float(whole_metrics["loss"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_non_finite_step_applies_no_update():
  graphdef, params = init_model(tiny_config(), seed=0)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0,
                                             total_steps=10))
  step = jax.jit(make_train_step(graphdef, optimizer, ObjectiveConfig(), TOKENS, seed=0))
  batch = dict(tiny_batch(batch=4), index=jnp.arange(4, dtype=jnp.int32))
  poisoned = dict(batch, image=jnp.full_like(batch["image"], jnp.nan))
  state = init_train_state(params, optimizer)
  after, metrics = step(state, poisoned)
  assert float(metrics["nonfinite"]) == 1.0 and int(after.nonfinite_streak) == 1
  assert int(after.step) == 1
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(after.opt_state)):
    np.testing.assert_array_equal(a, b)
  again, _ = step(after, poisoned)
  assert int(again.nonfinite_streak) == 2
  recovered, metrics = step(again, batch)
  assert int(recovered.nonfinite_streak) == 0 and float(metrics["nonfinite"]) == 0.0


def test_activations_stay_split_over_the_batch_axes_under_fsdp():
  from jax.sharding import NamedSharding, PartitionSpec
  from item_jax.model.layers import ACTIVATION_AXES, constrain
  from item_jax.train import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1}, jax.devices()[:8])
  # The hidden dimension is sharded on the way in, as FSDP's weights would
  # leave it; the constraint puts the batch split back.
  x = jax.device_put(jnp.ones((8, 5, 16)),
                     NamedSharding(mesh, PartitionSpec(None, None, "fsdp")))

  def pinned(x):
    with sharding.activation_shardings(mesh):
      return constrain(x * 2, ACTIVATION_AXES)

  out = jax.jit(pinned)(x)
  batch_split = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  assert out.sharding.is_equivalent_to(batch_split, 3)
  np.testing.assert_array_equal(out, 2 * np.ones((8, 5, 16)))
  # Outside the context it changes nothing; a batch the axes don't divide stays whole.
  assert constrain(x, ACTIVATION_AXES) is x
  odd = jax.jit(pinned)(jnp.ones((3, 5, 16)))
  assert odd.sharding.is_fully_replicated


def test_state_init_lowers_threefry_to_the_gpu_kernel_only_inside_its_block():
  from item_jax.train import sharding
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1,
                                             total_steps=10))
  init = sharding._state_initializer(tiny_config(), optimizer, seed=0)
  lower_for_gpu = lambda: jax.jit(init).trace().lower(
      lowering_platforms=("cuda",)).as_text()
  unrolled = lower_for_gpu()
  with sharding._threefry_kernel_on_gpu():
    kernel = lower_for_gpu()
  # The unrolled hash is 20 rounds of shifts; the kernel is one custom call.
  assert "cu_threefry2x32" not in unrolled and unrolled.count("shift_left") >= 40
  assert "cu_threefry2x32" in kernel and kernel.count("shift_left") == 0
  # The option is back as it was, also when the block raises.
  option = "jax_threefry_gpu_kernel_lowering"
  before = getattr(jax.config, option)
  with pytest.raises(RuntimeError, match="inside"):
    with sharding._threefry_kernel_on_gpu():
      raise RuntimeError("inside")
  assert getattr(jax.config, option) == before is False


def test_prefetch_sends_the_next_batches_ahead_in_order():
  from item_jax.train import sharding
  from item_jax.train.loop import prefetch_to_devices
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1}, jax.devices()[:8])
  pulled = []

  def local_batches():
    for i in range(5):
      pulled.append(i)
      yield {"x": np.full((8, 3), i, np.float32)}

  batches = prefetch_to_devices(local_batches(), mesh, size=2)
  first = next(batches)
  # The first batch comes back once two more are already on their way.
  assert pulled == [0, 1, 2]
  assert first["x"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 2)
  rest = [int(batch["x"][0, 0]) for batch in batches]
  assert [int(first["x"][0, 0])] + rest == [0, 1, 2, 3, 4]


def test_itc_negatives_span_the_global_batch_on_eight_devices():
  """The sharded step's ITC loss (and update) equals the one-device step's,
  and differs from the mean of per-device losses: every listing meets the
  whole global batch as negatives, not only its device's share."""
  from item_jax.objectives import contrastive_loss
  from item_jax.train import sharding
  config = tiny_config()
  import optax
  # Plain SGD at rate 1: the update is the gradient itself (Adam's first
  # step would turn round-off in near-zero gradients into whole steps).
  optimizer = optax.sgd(1.0)
  objectives = ObjectiveConfig(itc_weight=1.0, mim_weight=0.5, itm_weight=0.0,
                               mlm_weight=0.0, gmlm_weight=0.0, gmim_weight=0.0)
  step_fn = make_train_step(init_model(config, 0)[0], optimizer, objectives,
                            TOKENS, seed=0)
  host_batch = {name: np.asarray(value)
                for name, value in tiny_batch(batch=16, seed=4).items()}
  host_batch["index"] = np.arange(16, dtype=np.int32)
  results = {}
  for devices in (1, 8):
    mesh = sharding.make_mesh({"data": devices, "fsdp": 1, "model": 1},
                              jax.devices()[:devices])
    graphdef, state, shardings = sharding.create_train_state(config, optimizer,
                                                             mesh, 0)
    step = sharding.jit_train_step(step_fn, shardings, mesh)
    after, metrics = step(state, sharding.global_batch(host_batch, mesh))
    results[devices] = (jax.device_get(after.params), jax.device_get(metrics))
  (params_1, metrics_1), (params_8, metrics_8) = results[1], results[8]
  assert float(metrics_8["itc"]) == pytest.approx(float(metrics_1["itc"]), rel=1e-5)
  assert float(metrics_8["loss"]) == pytest.approx(float(metrics_1["loss"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # What per-device negatives would give: 8 contrastive losses over 2 rows.
  graphdef, params = init_model(config, 0)
  from flax import nnx
  model = nnx.merge(graphdef, params)
  title = model.encode(host_batch["title_ids"], None).cls
  image = model.encode(None, host_batch["image"]).cls
  scale = model.itc_scale()
  local = np.mean([float(contrastive_loss(title[i:i + 2], image[i:i + 2], scale,
                                          jnp.ones(2))) for i in range(0, 16, 2)])
  whole = float(contrastive_loss(title, image, scale, jnp.ones(16)))
  assert float(metrics_1["itc"]) == pytest.approx(whole, rel=1e-5)
  assert abs(whole - local) > 0.5


def test_task_gradient_norms_are_each_tasks_own_gradient_on_due_steps():
  import optax
  from flax import nnx
  from item_jax.objectives import example_keys, pretraining_loss
  from item_jax.train.step import step_keys
  config = tiny_config()
  graphdef, params = init_model(config, seed=0)
  optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=0,
                                             total_steps=10))
  objectives = ObjectiveConfig(itc_weight=1.0, mlm_weight=2.0, itm_weight=0.0,
                               mim_weight=0.0, gmim_weight=0.0)
  step = jax.jit(make_train_step(graphdef, optimizer, objectives, TOKENS, seed=0,
                                 task_gradient_every=2))
  batch = dict(tiny_batch(batch=8), index=jnp.arange(8, dtype=jnp.int32))
  state = init_train_state(params, optimizer)
  first, metrics = step(state, batch)
  mask_key, _ = step_keys(0, 0)
  keys = example_keys(mask_key, batch["index"])
  tasks = ("mlm", "gmlm", "itc")

  @jax.jit
  def expected_norms(params):
    norms = {}
    for task in tasks:
      loss = lambda p, task=task: objectives.weight(task) * pretraining_loss(
          nnx.merge(graphdef, p), batch, keys, objectives, TOKENS)[1][task]
      norms[task] = optax.global_norm(jax.grad(loss)(params))
    return norms

  for task, expected in expected_norms(params).items():
    assert float(metrics[f"grad_norm_{task}"]) == pytest.approx(float(expected),
                                                                rel=1e-4), task
  # Step 2 (state.step 1) is due, step 3 is not: zeros there.
  second, due = step(first, batch)
  _, not_due = step(second, batch)
  assert float(due["grad_norm_itc"]) > 0
  assert all(float(not_due[f"grad_norm_{t}"]) == 0 for t in ("itc", "mlm"))
  assert "grad_norm_itm" not in metrics and "grad_norm_mim" not in metrics


def test_text_learning_rate_scale_slows_only_the_text_side():
  from item_jax.train.optimizer import _path_name, is_text_side
  graphdef, params = init_model(tiny_config(), seed=0)
  grads = jax.tree.map(jnp.ones_like, params)
  moved = {}
  for scale in (1.0, 0.1):
    optimizer = make_optimizer(OptimizerConfig(
        learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.0,
        text_learning_rate_scale=scale))
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    moved[scale] = {_path_name(path): np.abs(u).max()
                    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]}
  assert is_text_side("layers.0.attention.key.kernel")
  assert is_text_side("mlm_bias") and not is_text_side("gmlm_bias")
  assert not is_text_side("embeddings.patch_embedding.kernel")
  for name, full in moved[1.0].items():
    expected = full * (0.1 if is_text_side(name) else 1.0)
    assert moved[0.1][name] == pytest.approx(expected, rel=1e-5), name
  assert sum(map(is_text_side, moved[1.0])) > 10
  with pytest.raises(ValueError, match="text_learning_rate_scale"):
    OptimizerConfig(text_learning_rate_scale=0.0)
