"""Model hyper-parameters: one frozen dataclass and the size presets.

Model code never reads a training config: `ModelConfig` is built once (from a
preset plus overrides) and passed to the modules' constructors.
"""

import dataclasses

import jax.numpy as jnp

from item_jax.errors import UserError
from item_jax.model.mobilenet import STRIDE_CUTS

IMAGE_STEMS = ("patches", "mobilenet_v2")
# A MobileNetV2 stem's output stride -> its channels there.
STEM_STRIDES = {stride: channels for stride, (_, channels) in STRIDE_CUTS.items()}

# Transformer sizes: (num_layers, hidden_size, num_heads, mlp_dim).
# `base` is BERT-base (the paper's model); `small` is ViT-S's width.
SIZE_PRESETS = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, mlp_dim=256),
    "small": dict(num_layers=12, hidden_size=384, num_heads=6, mlp_dim=1536),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, mlp_dim=3072),
    "large": dict(num_layers=24, hidden_size=1024, num_heads=16, mlp_dim=4096),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the ITEm model's parameters and forward pass."""

  num_layers: int = 12
  hidden_size: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  vocab_size: int = 30522
  # Title positions: position 0 is [CLS], titles use 1..max_title_positions-1.
  max_title_positions: int = 512
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  pad_token_id: int = 0
  layer_norm_eps: float = 1e-12
  # Dropout on embeddings and residual branches (BERT's hidden dropout).
  # Fused attention has no dropout on attention probabilities.
  dropout_rate: float = 0.1
  initializer_range: float = 0.02
  # Compute dtype of activations and matmuls; parameters stay float32.
  dtype: str = "float32"
  # Attention (`layers.attention`): None or "xla" (XLA ops, hand-written
  # backward pass) or "cudnn" (`jax.nn.dot_product_attention`'s cuDNN kernel).
  attention_implementation: str | None = None
  # Rematerialisation of encoder blocks in the backward pass: "none", "block"
  # (keep the blocks' matmul outputs, recompute the rest) or "full" (keep
  # only each block's input).
  remat: str = "none"
  # How image tokens are made. "patches": the paper's linear embedding of
  # patch_size x patch_size pixel patches. "mobilenet_v2": the ViT paper's
  # hybrid input, ImageNet MobileNetV2's convolutional layers cut at output
  # stride patch_size (8, 16 or 32), one token per cell of that feature map,
  # projected to the hidden size (`item_jax.model.mobilenet`).
  image_stem: str = "patches"
  # A convolutional stem's parameters get no gradient (and the optimizer
  # leaves them as they are): the pretrained features stay ImageNet's.
  freeze_image_stem: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise UserError(
          f"model.hidden_size={self.hidden_size} is not divisible by "
          f"model.num_heads={self.num_heads}")
    if self.image_size % self.patch_size:
      raise UserError(
          f"model.image_size={self.image_size} is not divisible by "
          f"model.patch_size={self.patch_size}")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise UserError(f"model.dtype={self.dtype!r}: expected float32, "
                      "bfloat16 or float16")
    if self.remat not in ("none", "block", "full"):
      raise UserError(f"model.remat={self.remat!r}: expected 'none', 'block' "
                      "or 'full'")
    if self.image_stem not in IMAGE_STEMS:
      raise UserError(f"model.image_stem={self.image_stem!r}: expected one of "
                      f"{list(IMAGE_STEMS)}")
    if self.image_stem != "patches" and self.patch_size not in STEM_STRIDES:
      raise UserError(
          f"model.patch_size={self.patch_size} with model.image_stem="
          f"{self.image_stem!r}: a MobileNetV2 stem's cells are 8, 16 or 32 "
          "pixels wide (its output stride)")
    if self.image_stem != "patches" and self.num_channels != 3:
      raise UserError(f"model.num_channels={self.num_channels}: the "
                      f"{self.image_stem} stem reads RGB images")
    if self.attention_implementation not in (None, "xla", "cudnn"):
      raise UserError("model.attention_implementation="
                      f"{self.attention_implementation!r}: expected None, "
                      "'xla' or 'cudnn'")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.patches_per_side ** 2

  @property
  def patch_dim(self) -> int:
    """Pixels in one patch: the width of the MIM/GMIM regression targets."""
    return self.patch_size * self.patch_size * self.num_channels

  @property
  def image_token_input_dim(self) -> int:
    """Width of what the patch embedding projects: a patch's pixels, or a
    convolutional stem's channels."""
    if self.image_stem == "patches":
      return self.patch_dim
    return STEM_STRIDES[self.patch_size]

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def model_config(size: str = "base", **overrides) -> ModelConfig:
  """A preset's config with any field overridden (e.g. vocab_size, image_size)."""
  if size not in SIZE_PRESETS:
    raise UserError(f"model.size={size!r}: expected one of "
                    f"{sorted(SIZE_PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise UserError(f"unknown model field(s) {unknown}; known: {sorted(fields)}")
  return ModelConfig(**{**SIZE_PRESETS[size], **overrides})
