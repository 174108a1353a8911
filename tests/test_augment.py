"""ITC's crop view: the crops, mirrors and lighting it draws, and the view in
the loss, the FLOP counter and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TOKENS, tiny_batch, tiny_config
from item_jax.model import ItemModel
from item_jax.objectives import (ObjectiveConfig, contrastive_loss, example_keys,
                                 pretraining_loss)
from item_jax.objectives.augment import (CropSettings, crop_and_resize, crop_boxes,
                                         crop_view)
from item_jax.objectives.flops import training_flops_per_example

from flax import nnx


def _photos(batch=4, size=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)),
                     jnp.float32)


def _keys(count, seed=0):
  return jax.random.split(jax.random.key(seed), count)


def test_a_whole_photo_box_is_the_photo_and_a_quadrant_is_it_enlarged():
  photo = _photos(1, 16)[0]
  assert np.array_equal(crop_and_resize(photo, jnp.array([0.0, 0.0, 16.0, 16.0])), photo)
  quadrant = crop_and_resize(photo, jnp.array([8.0, 0.0, 8.0, 8.0]))
  expected = jax.image.resize(photo[8:, :8], (16, 16, 3), "linear")
  # Inside; on its edges the crop samples its neighbours outside the box,
  # the resize of the cut-out quadrant its own edge.
  np.testing.assert_allclose(quadrant[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-5)


def test_boxes_stay_inside_the_photo_with_the_area_asked_for():
  boxes = np.asarray(crop_boxes(_keys(256), 64, CropSettings(min_area=0.5)))
  top, left, height, width = boxes.T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + height <= 64 + 1e-4).all() and (left + width <= 64 + 1e-4).all()
  area = height * width / 64 ** 2
  # The aspect ratio's clip to the photo can only shrink a box.
  assert area.max() <= 1 + 1e-5 and area.min() >= 0.5 * 0.75 - 1e-5
  assert np.median(area) > 0.6 and len(np.unique(top.round(3))) > 200


def test_without_crop_or_lighting_the_view_is_the_photo_or_its_mirror():
  photos = _photos(16)
  views = np.asarray(crop_view(photos, _keys(16), CropSettings(
      min_area=1.0, max_aspect=1.0, brightness=0.0, contrast=0.0)))
  same = [np.allclose(v, p, atol=1e-5) for v, p in zip(views, photos)]
  mirrored = [np.allclose(v, p[:, ::-1], atol=1e-5) for v, p in zip(views, photos)]
  assert all(a or b for a, b in zip(same, mirrored))
  assert 0 < sum(same) < 16   # both occur
  unflipped = crop_view(photos, _keys(16), CropSettings(
      min_area=1.0, max_aspect=1.0, flip=False, brightness=0.0, contrast=0.0))
  np.testing.assert_allclose(unflipped, photos, atol=1e-5)


def test_lighting_moves_each_photo_within_its_bounds_and_keeps_colour_order():
  photos = _photos(32, seed=1) * 0.5   # inside the range: no clipping
  views = np.asarray(crop_view(photos, _keys(32, seed=1), CropSettings(
      min_area=1.0, max_aspect=1.0, flip=False, brightness=0.1, contrast=0.2)))
  # In [0, 1] pixels: a shift of at most 0.1 of the mean, one factor for
  # every pixel and channel (no hue or saturation change).
  before, after = photos * 0.5 + 0.5, views * 0.5 + 0.5
  shift = after.mean(axis=(1, 2, 3)) - before.mean(axis=(1, 2, 3))
  assert np.abs(shift).max() <= 0.1 + 1e-4 and np.abs(shift).max() > 0.02
  centred = lambda x: x - x.mean(axis=(1, 2, 3), keepdims=True)
  factor = (centred(after).std(axis=(1, 2, 3)) / centred(before).std(axis=(1, 2, 3)))
  assert factor.min() >= 0.8 - 1e-4 and factor.max() <= 1.2 + 1e-4
  np.testing.assert_allclose(centred(after), centred(before) * factor[:, None, None, None],
                             atol=1e-4)


def test_views_are_drawn_from_the_keys():
  photos = _photos(4)
  first, again = (crop_view(photos, _keys(4, seed=7)) for _ in range(2))
  other = crop_view(photos, _keys(4, seed=8))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert first.shape == photos.shape and first.dtype == photos.dtype


def test_the_crop_view_is_the_image_pass_over_the_crops_and_leaves_other_tasks_alone():
  # A wide initialisation, so that untrained [CLS] outputs differ.
  model = ItemModel(tiny_config(initializer_range=0.5), rngs=nnx.Rngs(0))
  batch = tiny_batch(batch=8, seed=2)
  keys = example_keys(jax.random.key(3), jnp.arange(8))
  common = dict(itm_weight=0.0, mim_weight=0.0, gmim_weight=0.0, itc_weight=1.0)
  loss = jax.jit(lambda objectives: pretraining_loss(model, batch, keys, objectives,
                                                     TOKENS)[1], static_argnums=0)
  plain = loss(ObjectiveConfig(itc_pairs="title:image", **common))
  both = loss(ObjectiveConfig(itc_pairs="title:image,image:crop", crop_min_area=0.3,
                              **common))
  # The masks are the same draws: MLM and GMLM do not move.
  for task in ("mlm", "gmlm"):
    assert float(both[task]) == pytest.approx(float(plain[task]), rel=1e-6)
  crops = crop_view(batch["image"], keys, CropSettings(min_area=0.3))
  scale = model.itc_scale()
  weight = jnp.ones(8)

  @jax.jit
  def expected_loss(crops):
    image, crop = (model.encode(None, photos).cls for photos in (batch["image"], crops))
    title = model.encode(batch["title_ids"], None,
                         title_mask=batch["title_ids"] != 0).cls
    return 0.5 * (contrastive_loss(title, image, scale, weight)
                  + contrastive_loss(image, crop, scale, weight))

  expected = expected_loss(crops)
  assert float(both["itc"]) == pytest.approx(float(expected), rel=1e-5)
  assert float(both["itc"]) != pytest.approx(float(plain["itc"]), rel=1e-2)


def test_the_flop_counter_counts_the_crop_pass_as_one_more_image_pass():
  config = tiny_config()
  common = dict(itm_weight=0.0, mlm_weight=0.0, mim_weight=0.0, gmlm_weight=0.0,
                gmim_weight=0.0, itc_weight=1.0)
  flops = {pairs: training_flops_per_example(config, 8, ObjectiveConfig(
      itc_pairs=pairs, **common)) for pairs in ("title:image", "image:crop",
                                                "title:image,image:crop")}
  image_pass = flops["image:crop"]["total"] / 2
  assert flops["title:image,image:crop"]["total"] == flops["title:image"]["total"] + image_pass


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_a_bad_smallest_crop_is_refused(value):
  with pytest.raises(ValueError, match="crop_min_area"):
    ObjectiveConfig(itc_weight=1.0, itc_pairs="image:crop", crop_min_area=value)
