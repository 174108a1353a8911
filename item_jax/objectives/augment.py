"""A second look at each listing's photo for ITC's "crop" view: a random
crop resized back to the model's size, a mirror image half the time, and a
little brightness and contrast, drawn on device from the example's key.

The photo view and the crop view of one listing are a positive pair that
shares no title: the image side learns what tells one photo from the
batch's others (colour, pattern, shape) under the changes a seller's camera
makes, not only what the title says. Hue and saturation are never changed:
in a catalogue the colour is part of the product.
"""

import dataclasses

import jax
import jax.numpy as jnp

from item_jax.model.item import IMAGE_MEAN, IMAGE_STD

# Folded into each example's key for its crop, so that switching the view on
# leaves every other task's masks as they were (losses._MODALITY_DROPOUT_FOLD
# is 3).
CROP_FOLD = 4


@dataclasses.dataclass(frozen=True)
class CropSettings:
  """The crop's share of the photo's area is drawn from [min_area, 1], its
  aspect ratio log-uniformly from [1 / max_aspect, max_aspect] (clipped to
  the photo); brightness moves by up to `brightness` of the pixel range,
  contrast (about each photo's mean) by a factor within 1 +- `contrast`."""

  min_area: float = 0.4
  max_aspect: float = 4 / 3
  flip: bool = True
  brightness: float = 0.1
  contrast: float = 0.2

  def __post_init__(self):
    if not 0.0 < self.min_area <= 1.0:
      raise ValueError(f"crop min_area={self.min_area} must be in (0, 1]")
    if self.max_aspect < 1.0:
      raise ValueError(f"crop max_aspect={self.max_aspect} must be >= 1")
    if not 0.0 <= self.brightness < 1.0 or not 0.0 <= self.contrast < 1.0:
      raise ValueError("crop brightness and contrast must be in [0, 1)")


def crop_boxes(keys: jax.Array, size: int, settings: CropSettings) -> jax.Array:
  """(batch, 4) float boxes (top, left, height, width) in pixels of a
  `size` x `size` photo, one per key."""

  def box(key):
    area_key, aspect_key, top_key, left_key = jax.random.split(key, 4)
    area = jax.random.uniform(area_key, (), minval=settings.min_area, maxval=1.0)
    log_aspect = jnp.log(settings.max_aspect)
    aspect = jnp.exp(jax.random.uniform(aspect_key, (), minval=-log_aspect,
                                        maxval=log_aspect))
    height = jnp.clip(jnp.sqrt(area / aspect), 0.0, 1.0) * size
    width = jnp.clip(jnp.sqrt(area * aspect), 0.0, 1.0) * size
    top = jax.random.uniform(top_key, ()) * (size - height)
    left = jax.random.uniform(left_key, ()) * (size - width)
    return jnp.stack([top, left, height, width])

  return jax.vmap(box)(keys)


def crop_and_resize(image: jax.Array, box: jax.Array) -> jax.Array:
  """One (H, W, C) photo's `box` (top, left, height, width), resized to
  (H, W) with antialiased bilinear sampling."""
  height, width = image.shape[0], image.shape[1]
  scale = jnp.stack([height / box[2], width / box[3]])
  translation = -box[:2] * scale
  return jax.image.scale_and_translate(
      image.astype(jnp.float32), image.shape, (0, 1), scale, translation,
      method="linear", antialias=True)


def crop_view(images: jax.Array, keys: jax.Array,
              settings: CropSettings = CropSettings()) -> jax.Array:
  """(batch, H, W, C) photos, normalised as the readers give them
  ((x / 255 - IMAGE_MEAN) / IMAGE_STD) -> their crop views, normalised the
  same way. `keys`: (batch,) per-example keys (folded with CROP_FOLD here)."""
  keys = jax.vmap(lambda key: jax.random.fold_in(key, CROP_FOLD))(keys)
  box_keys, flip_keys, light_keys = (
      jax.vmap(lambda key: jax.random.split(key, 3))(keys)[:, i] for i in range(3))
  boxes = crop_boxes(box_keys, images.shape[1], settings)
  crops = jax.vmap(crop_and_resize)(images, boxes)
  if settings.flip:
    flip = jax.vmap(lambda key: jax.random.bernoulli(key))(flip_keys)
    crops = jnp.where(flip[:, None, None, None], crops[:, :, ::-1], crops)
  mean = jnp.asarray(IMAGE_MEAN, jnp.float32)
  std = jnp.asarray(IMAGE_STD, jnp.float32)
  pixels = crops * std + mean                       # [0, 1]
  draws = jax.vmap(lambda key: jax.random.uniform(key, (2,), minval=-1.0,
                                                  maxval=1.0))(light_keys)
  shift = (settings.brightness * draws[:, 0])[:, None, None, None]
  factor = (1.0 + settings.contrast * draws[:, 1])[:, None, None, None]
  centre = jnp.mean(pixels, axis=(1, 2, 3), keepdims=True)
  pixels = jnp.clip((pixels - centre) * factor + centre + shift, 0.0, 1.0)
  return ((pixels - mean) / std).astype(images.dtype)
