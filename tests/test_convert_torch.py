"""The torch layout: the PyTorch reference ITEm <-> item-jax, both ways, every head."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from convert_helpers import random_torch_model  # noqa: E402
from helpers import tiny_batch, tiny_config  # noqa: E402
from item_jax.convert import ConversionError, model_from_params, torch_layout  # noqa: E402
from item_jax.convert.tensors import init_params  # noqa: E402
from item_jax.convert.torch_reference import ItemTorch  # noqa: E402

TOLERANCE = 1e-4


def outputs(model, torch_model, seed=0):
  """Every head of both models on the same batch: name -> (ours, torch)."""
  config = model.config
  batch = tiny_batch(seed=seed)
  masked = jax.random.bernoulli(jax.random.key(seed), 0.3, (4, config.num_patches))
  indices = jnp.array([[0, 2], [1, 3], [0, 1], [2, 2]])
  ours = model.encode(batch["title_ids"], batch["image"], masked_patches=masked)
  as_torch = lambda x: torch.from_numpy(np.array(x))
  with torch.no_grad():
    cls, titles, patches = torch_model.encode(
        as_torch(batch["title_ids"]).long(), as_torch(batch["image"]).permute(0, 3, 1, 2),
        masked_patches=as_torch(masked))
    theirs = {
        "cls": cls, "title_states": titles, "patch_states": patches,
        "itm": torch_model.itm_logits(cls), "mlm": torch_model.mlm_logits(titles),
        "mim": torch_model.mim_pixels(patches),
        "gmlm": torch_model.gmlm_logits(cls, as_torch(indices).long()),
        "gmim": torch_model.gmim_pixels(cls, as_torch(indices).long())}
  mine = {
      "cls": ours.cls, "title_states": ours.title_states,
      "patch_states": ours.patch_states, "itm": model.itm_logits(ours.cls),
      "mlm": model.mlm_logits(ours.title_states),
      "mim": model.mim_pixels(ours.patch_states),
      "gmlm": model.gmlm_logits(ours.cls, indices),
      "gmim": model.gmim_pixels(ours.cls, indices)}
  return {name: (np.asarray(mine[name]), theirs[name].numpy()) for name in mine}


def test_torch_to_item_jax_gives_the_same_outputs_on_every_head():
  config = tiny_config()
  torch_model = random_torch_model(config)
  params, report = torch_layout.from_torch(torch_model.state_dict(), config)
  assert not report.unset and not report.ignored
  for name, (ours, theirs) in outputs(model_from_params(params, config),
                                      torch_model).items():
    assert ours.shape == theirs.shape, name
    assert np.abs(ours - theirs).max() <= TOLERANCE, name


def test_item_jax_to_torch_gives_the_same_outputs_and_round_trips():
  config = tiny_config()
  params = init_params(config, seed=3)
  tensors, report = torch_layout.to_torch(params, config)
  assert not report.ignored
  torch_model = ItemTorch(config).eval()
  torch_model.load_state_dict({name: torch.from_numpy(value)
                               for name, value in tensors.items()}, strict=True)
  for name, (ours, theirs) in outputs(model_from_params(params, config),
                                      torch_model, seed=1).items():
    assert np.abs(ours - theirs).max() <= TOLERANCE, name
  back, _ = torch_layout.from_torch(torch_model.state_dict(), config)
  assert all(np.array_equal(back[name], params[name]) for name in params)


def test_a_missing_or_misshaped_tensor_is_named():
  config = tiny_config()
  state = random_torch_model(config).state_dict()
  state.pop("cls.itm.bias")
  state["bert.pooler.dense.weight"] = state["bert.pooler.dense.weight"][:, :3]
  state["bert.extra.weight"] = torch.zeros(2)
  with pytest.raises(ConversionError) as error:
    torch_layout.from_torch(state, config)
  message = str(error.value)
  assert "not set: itm_classifier.bias (cls.itm.bias is not in the source)" in message
  assert "bert.pooler.dense.weight (64, 3) -> pooler.kernel" in message
  assert "not used: bert.extra.weight" in message
