"""Stem neighbourhoods (objectives.stem_kd_weight): the image view's in-batch
neighbours taught those of the frozen stem's pooled features; the loss, its
place in ITC, the FLOP counter and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import TOKENS, tiny_batch, tiny_config
from item_jax.errors import UserError
from item_jax.model import ItemModel
from item_jax.objectives import ObjectiveConfig, example_keys, pretraining_loss
from item_jax.objectives.flops import training_flops_per_example
from item_jax.objectives.losses import stem_neighbourhood_loss

STEM = dict(image_stem="mobilenet_v2", image_size=32, patch_size=8)


def _reference(student, teacher, temperature, weight):
  """The loss row by row: KL(teacher's neighbours || student's), over the
  other rows of weight > 0, weighted mean over the rows of weight > 0."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  s, t = unit(np.asarray(student, np.float64)), unit(np.asarray(teacher, np.float64))
  total = 0.0
  for i in np.flatnonzero(weight > 0):
    others = [j for j in np.flatnonzero(weight > 0) if j != i]
    p = np.exp(t[others] @ t[i] / temperature)
    p /= p.sum()
    q = np.exp(s[others] @ s[i] / temperature)
    q /= q.sum()
    total += weight[i] * np.sum(p * np.log(p / q))
  return total / weight.sum()


def test_the_loss_is_the_kl_of_the_neighbour_distributions():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(6, 5)), rng.normal(size=(6, 20))
  weight = np.array([1.0, 1.0, 0.0, 1.0, 2.0, 1.0])
  got = stem_neighbourhood_loss(jnp.asarray(student), jnp.asarray(teacher), 0.3,
                                jnp.asarray(weight))
  assert float(got) == pytest.approx(_reference(student, teacher, 0.3, weight), rel=1e-5)


def test_the_same_neighbourhoods_cost_nothing_whatever_the_widths_and_scales():
  rng = np.random.default_rng(1)
  teacher = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
  weight = jnp.ones(8)
  assert abs(float(stem_neighbourhood_loss(3.0 * teacher, teacher, 0.05, weight))) < 1e-5
  # A rotation keeps every cosine, so every neighbour.
  rotation, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  rotated = teacher @ jnp.asarray(rotation, jnp.float32)
  assert abs(float(stem_neighbourhood_loss(rotated, teacher, 0.05, weight))) < 1e-4
  shuffled = teacher[jnp.asarray(rng.permutation(8))]
  assert float(stem_neighbourhood_loss(shuffled, teacher, 0.05, weight)) > 0.5


def test_a_student_learns_the_teachers_neighbours():
  rng = np.random.default_rng(2)
  teacher = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
  student = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  weight = jnp.ones(16)
  loss = lambda student: stem_neighbourhood_loss(student, teacher, 0.1, weight)
  optimizer = optax.adam(0.05)
  state = optimizer.init(student)

  @jax.jit
  def step(student, state):
    value, grad = jax.value_and_grad(loss)(student)
    updates, state = optimizer.update(grad, state)
    return optax.apply_updates(student, updates), state, value

  first = float(loss(student))
  for _ in range(300):
    student, state, _ = step(student, state)
  assert float(loss(student)) < 0.2 * first
  # Its nearest neighbours are now the teacher's.
  unit = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
  nearest = lambda x: np.argsort(-np.asarray(unit(x) @ unit(x).T - 9 * jnp.eye(16)), 1)[:, 0]
  assert np.mean(nearest(student) == nearest(teacher)) >= 0.8


def test_in_the_step_it_teaches_the_image_view_from_the_pooled_cells():
  model = ItemModel(tiny_config(initializer_range=0.5, **STEM), rngs=nnx.Rngs(0))
  batch = tiny_batch(batch=8, seed=2, image_size=32)
  batch["has_image"] = jnp.arange(8) != 5
  keys = example_keys(jax.random.key(3), jnp.arange(8))
  common = dict(itm_weight=0.0, mim_weight=0.0, gmim_weight=0.0, itc_weight=0.5,
                itc_pairs="joint:title")
  loss = jax.jit(lambda objectives: pretraining_loss(model, batch, keys, objectives,
                                                     TOKENS)[1], static_argnums=0)
  plain = loss(ObjectiveConfig(**common))
  taught = loss(ObjectiveConfig(stem_kd_weight=2.0, stem_kd_temperature=0.2, **common))

  @jax.jit
  def expected():
    cells = model.embeddings.image_tokens_input(batch["image"], None)
    image = model.encode(None, batch["image"], image_mask=batch["has_image"]).cls
    return stem_neighbourhood_loss(image, cells.mean(1), 0.2,
                                   batch["has_image"].astype(jnp.float32))

  assert float(taught["stem_kd"]) == pytest.approx(float(expected()), rel=1e-5)
  assert float(taught["stem_kd"]) > 0.01
  # Inside ITC at stem_kd_weight / itc_weight, so the total weighs it stem_kd_weight.
  assert float(taught["itc"]) == pytest.approx(
      float(plain["itc"]) + 4.0 * float(taught["stem_kd"]), rel=1e-5)
  assert float(taught["loss"] - plain["loss"]) == pytest.approx(
      2.0 * float(taught["stem_kd"]), rel=1e-4)
  for task in ("mlm", "gmlm"):
    assert float(taught[task]) == pytest.approx(float(plain[task]), rel=1e-6)


def test_the_flop_counter_counts_its_image_pass():
  config = tiny_config(**STEM)
  common = dict(itm_weight=0.0, mim_weight=0.0, gmim_weight=0.0, itc_weight=1.0)
  flops = lambda **fields: training_flops_per_example(
      config, 8, ObjectiveConfig(**common, **fields))["total"]
  assert flops(itc_pairs="joint:title", stem_kd_weight=1.0) == flops(
      itc_pairs="joint:title,title:image")
  assert flops(itc_pairs="title:image", stem_kd_weight=1.0) == flops(
      itc_pairs="title:image")


@pytest.mark.parametrize("fields, message", [
    (dict(stem_kd_weight=-1.0), "stem_kd_weight must be >= 0"),
    (dict(stem_kd_weight=1.0, itc_weight=0.0), "needs ITC on"),
    (dict(stem_kd_weight=1.0, stem_kd_temperature=0.0), "stem_kd_temperature"),
])
def test_bad_settings_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    ObjectiveConfig(**{"itc_weight": 1.0, **fields})


def test_the_patch_embedding_is_refused_before_any_compute(caplog):
  from item_jax.train.config import base_config, validate_without_data
  config = base_config()
  config.model.size = "tiny"
  config.mesh.data = 1
  config.mesh.fsdp = 1
  config.objectives.itc_weight = 1.0
  config.objectives.stem_kd_weight = 1.0
  with pytest.raises(UserError, match="stem_kd_weight=1.0 needs a convolutional"):
    validate_without_data(config, vocab_size=100, num_devices=1)
  config.model.image_stem = "mobilenet_v2"
  config.model.image_size = 32
  config.model.patch_size = 8
  assert validate_without_data(config, vocab_size=100,
                               num_devices=1).objectives.stem_kd_weight == 1.0
  # A stem cut before its end teaches intermediate features: said, not refused.
  assert "stride 8: the teacher is MobileNetV2's intermediate features" in caplog.text


def test_the_224_recipe_keeps_the_neighbourhoods_on_cached_cells(prepared_catalogue):
  from item_jax.train.config import load_config, validate
  config = load_config("configs/item_hybrid.py:224",
                       [f"--config.data.dir={prepared_catalogue[1]}"])
  settings = validate(config, num_devices=8)
  assert (settings.model.image_size, settings.model.patch_size) == (224, 32)
  assert settings.objectives.stem_kd_weight == 1.0
  assert config.data.stem_cells == "cached"
  assert config.total_steps == 3000
  # The default is the demo's 64 px recipe, without it.
  assert load_config("configs/item_hybrid.py").objectives.stem_kd_weight == 0.0
  with pytest.raises(ValueError, match="unknown variant 'gpu'"):
    load_config("configs/item_hybrid.py:gpu")
