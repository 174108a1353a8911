"""The PyTorch reference's losses (the five and ITC) and gradients equal item-jax's
on the same masks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from convert_helpers import random_torch_model  # noqa: E402
from helpers import TOKENS, tiny_batch, tiny_config  # noqa: E402
from item_jax.convert import model_from_params, torch_layout  # noqa: E402
from item_jax.convert.tensors import flatten_params  # noqa: E402
from item_jax.convert.torch_reference import item_losses, loss_inputs  # noqa: E402
from item_jax.objectives import (TASKS, ObjectiveConfig, augment,  # noqa: E402
                                 example_keys, mask_batch, pretraining_loss)

TOLERANCE = 1e-4


@pytest.mark.parametrize("objectives", [
    ObjectiveConfig(mlm_weight=2.0, gmim_weight=0.5),
    ObjectiveConfig(itm_weight=0.0, mim_weight=0.0, normalize_patch_targets=False),
    ObjectiveConfig(itc_weight=1.5, itc_pairs="title:image,joint:title,joint:image"),
    ObjectiveConfig(itm_weight=0.0, mlm_weight=0.0, mim_weight=0.0, gmlm_weight=0.0,
                    gmim_weight=0.0, itc_weight=1.0, itc_pairs="title:image,joint:image"),
    ObjectiveConfig(itm_weight=0.0, mim_weight=0.0, gmim_weight=0.0, itc_weight=1.0,
                    itc_pairs="title:text,joint:text"),
    ObjectiveConfig(itm_weight=0.0, mim_weight=0.0, gmim_weight=0.0, itc_weight=1.0,
                    itc_pairs="title:image,image:crop", crop_min_area=0.5),
], ids=["all", "no-itm-no-mim", "all-and-itc", "itc-only", "itc-text", "itc-crop"])
def test_torch_losses_and_gradients_match_item_jax(objectives):
  _check_parity(tiny_config(), objectives)


def test_torch_matches_with_the_stem_neighbourhoods():
  """The stem's pooled cells teach the image view's neighbours (stem_kd)."""
  _check_parity(tiny_config(image_stem="mobilenet_v2", image_size=32, patch_size=8),
                ObjectiveConfig(itm_weight=0.0, mim_weight=0.0, gmim_weight=0.0,
                                itc_weight=0.5, itc_pairs="joint:title",
                                stem_kd_weight=2.0, stem_kd_temperature=0.2))


def _check_parity(config, objectives):
  torch_model = random_torch_model(config, seed=1).train()
  params, _ = torch_layout.from_torch(torch_model.state_dict(), config)
  graphdef, state = nnx.split(model_from_params(params, config))
  batch = tiny_batch(batch=8, seed=2)
  batch["valid"] = jnp.arange(8) < 7
  batch["text_ids"] = tiny_batch(batch=8, seed=5)["title_ids"]
  batch["has_text"] = jnp.arange(8) % 3 != 0
  keys = example_keys(jax.random.key(3), jnp.arange(8))

  @jax.jit
  def jax_side(state):
    loss_fn = lambda state: pretraining_loss(nnx.merge(graphdef, state), batch,
                                             keys, objectives, TOKENS)
    return (jax.value_and_grad(loss_fn, has_aux=True)(state),
            mask_batch(config, batch, keys, objectives, TOKENS))

  ((total, metrics), grads), masked = jax_side(state)
  crops = augment.crop_view(batch["image"], keys, augment.CropSettings(
      min_area=objectives.crop_min_area))
  inputs = {name: torch.from_numpy(value)
            for name, value in loss_inputs(masked, batch, crops).items()}
  torch_total, losses = item_losses(
      torch_model, inputs, {task: objectives.weight(task) for task in TASKS},
      objectives.normalize_patch_targets, objectives.itc_view_pairs(),
      (objectives.stem_kd_weight, objectives.stem_kd_temperature))
  torch_total.backward()

  active = [task for task in TASKS if objectives.weight(task) > 0]
  assert sorted(losses) == sorted(active)
  for task in active:
    assert losses[task].item() == pytest.approx(float(metrics[task]),
                                                rel=TOLERANCE), task
  assert torch_total.item() == pytest.approx(float(total), rel=TOLERANCE)
  expected, _ = torch_layout.to_torch(flatten_params(grads), config)
  scale = max(np.abs(value).max() for value in expected.values())
  for name, parameter in torch_model.named_parameters():
    grad = (np.zeros(parameter.shape, np.float32) if parameter.grad is None
            else parameter.grad.numpy())
    assert np.abs(grad - expected[name]).max() <= TOLERANCE * scale, name
