"""hf-vit: a random transformers ViT (built locally) -> our image side: the same
patch embeddings, before and with position embeddings, and resized positions."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from convert_helpers import write_vit  # noqa: E402
from item_jax.convert import ConversionError, convert_hf_vit, model_from_params  # noqa: E402
from item_jax.convert.tensors import complete_params  # noqa: E402
from item_jax.model import model_config, patchify  # noqa: E402
from item_jax.model.item import IMAGE_TYPE  # noqa: E402


def our_model(directory, image_size=32):
  config = model_config("tiny", vocab_size=100, image_size=image_size, patch_size=8,
                        dropout_rate=0.0)
  image_side, report = convert_hf_vit(directory, config)
  return model_from_params(complete_params(image_side, config, seed=0), config), report


def test_patch_embeddings_equal_vit_before_and_with_positions(tmp_path):
  vit = write_vit(tmp_path / "vit")
  model, report = our_model(tmp_path / "vit")
  assert set(report.set) == {"embeddings.patch_embedding.kernel",
                             "embeddings.patch_embedding.bias",
                             "embeddings.image_position_embeddings",
                             "embeddings.mask_patch_embedding"}
  assert "encoder.layer.0.attention.attention.query.weight" in report.ignored
  image = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  pixel_values = torch.from_numpy(np.array(image)).permute(0, 3, 1, 2)
  masked = np.zeros((2, 16), bool)
  masked[0, [1, 5, 6]] = masked[1, [0, 15]] = True
  with torch.no_grad():
    theirs_patches = vit.vit.embeddings.patch_embeddings(pixel_values).numpy()
    theirs = vit.vit.embeddings(pixel_values)[:, 1:].numpy()
    theirs_masked = vit.vit.embeddings(
        pixel_values, bool_masked_pos=torch.from_numpy(masked))[:, 1:].numpy()
  embeddings = model.embeddings
  # Before position embeddings: the patch projection alone.
  ours_patches = np.asarray(embeddings.patch_embedding(patchify(image, 8)))
  assert np.abs(ours_patches - theirs_patches).max() <= 1e-5
  # With position embeddings (our modality-type embedding taken off again).
  image_type = np.asarray(embeddings.type_embeddings[IMAGE_TYPE])
  ours = np.asarray(embeddings.image(image, None)) - image_type
  assert np.abs(ours - theirs).max() <= 1e-5
  ours_masked = np.asarray(embeddings.image(image, jnp.asarray(masked))) - image_type
  assert np.abs(ours_masked - theirs_masked).max() <= 1e-5


@pytest.mark.parametrize("image_size", [48, 16])
def test_positions_are_resized_bilinearly_for_another_image_size(tmp_path, image_size):
  vit = write_vit(tmp_path / "vit")
  config = model_config("tiny", vocab_size=100, image_size=image_size, patch_size=8)
  image_side, _ = convert_hf_vit(tmp_path / "vit", config)
  side = image_size // 8
  grid = vit.vit.embeddings.position_embeddings[0, 1:].detach().reshape(1, 4, 4, -1)
  expected = torch.nn.functional.interpolate(
      grid.permute(0, 3, 1, 2), size=(side, side), mode="bilinear",
      align_corners=False).permute(0, 2, 3, 1).reshape(side * side, -1).numpy()
  ours = image_side["embeddings.image_position_embeddings"]
  assert ours.shape == (side * side, 64)
  assert np.abs(ours - expected).max() <= 1e-5


def test_another_patch_size_or_width_is_refused(tmp_path):
  write_vit(tmp_path / "vit", patch_size=16)
  config = model_config("tiny", vocab_size=100, image_size=32, patch_size=8)
  with pytest.raises(ConversionError,
                     match="projection.weight .* -> embeddings.patch_embedding.kernel"):
    convert_hf_vit(tmp_path / "vit", config)
  write_vit(tmp_path / "wide", hidden=32)
  with pytest.raises(ConversionError, match="hidden_size=32"):
    convert_hf_vit(tmp_path / "wide", config)
