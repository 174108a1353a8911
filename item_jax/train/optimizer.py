"""AdamW with linear warmup then cosine or linear decay, clipping, and a decay mask.

Weight decay applies to matrices only (dense kernels, embedding tables): never
to biases, LayerNorm scales/offsets, or the 1-D [CLS] and mask vectors.
"""

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-4
  warmup_steps: int = 1000
  total_steps: int = 100_000
  decay: str = "cosine"          # "cosine" or "linear", to end_learning_rate
  end_learning_rate: float = 0.0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-6
  grad_clip_norm: float = 1.0    # 0 disables clipping
  # Multiplies the learning rate of the text side a BERT checkpoint sets
  # (TEXT_SIDE: word, title-position and type embeddings, [CLS], the
  # embedding LayerNorm, every encoder layer, the pooler, the MLM head)
  # against the rest (the image side, ITEm's other heads): below 1 keeps a
  # converted text side while the fresh image side learns at the full rate.
  # 1 adds nothing to the optimizer state; another value adds an empty state
  # entry, so convert with the recipe's config (`convert hf-bert --config`)
  # to resume a converted workdir under it.
  text_learning_rate_scale: float = 1.0
  # Multiplies the learning rate of a convolutional image stem
  # (`embeddings.image_stem`, model.image_stem="mobilenet_v2") when it is
  # fine-tuned (model.freeze_image_stem=False); a frozen stem is always 0:
  # its parameters stay exactly as loaded, weight decay included.
  image_stem_learning_rate_scale: float = 1.0

  def __post_init__(self):
    if self.decay not in ("cosine", "linear"):
      raise ValueError(f"optimizer.decay={self.decay!r}: expected 'cosine' or 'linear'")
    if self.total_steps <= 0:
      raise ValueError("optimizer.total_steps must be > 0")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError("optimizer.warmup_steps must be in [0, total_steps]")
    if self.learning_rate <= 0:
      raise ValueError("optimizer.learning_rate must be > 0")
    if self.text_learning_rate_scale <= 0:
      raise ValueError("optimizer.text_learning_rate_scale must be > 0")
    if self.image_stem_learning_rate_scale < 0:
      raise ValueError("optimizer.image_stem_learning_rate_scale must be >= 0 "
                       "(0: frozen)")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  decay_steps = max(config.total_steps - config.warmup_steps, 1)
  if config.decay == "cosine":
    decay = optax.cosine_decay_schedule(
        config.learning_rate, decay_steps,
        alpha=config.end_learning_rate / config.learning_rate)
  else:
    decay = optax.linear_schedule(config.learning_rate, config.end_learning_rate,
                                  decay_steps)
  warmup = optax.linear_schedule(0.0, config.learning_rate,
                                 max(config.warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def weight_decay_mask(params):
  """True for parameters that take weight decay: those with 2+ dimensions."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


# Parameter-name prefixes of the text side (what `convert hf-bert` sets).
TEXT_SIDE = ("embeddings.word_embeddings", "embeddings.title_position_embeddings",
             "embeddings.type_embeddings", "embeddings.cls_token",
             "embeddings.norm", "layers", "pooler", "mlm_")


def _path_name(path) -> str:
  keys = [str(getattr(key, "key", getattr(key, "idx", key))) for key in path]
  return ".".join(key for key in keys if key not in ("", "value"))


def is_text_side(name: str) -> bool:
  return any(name == prefix or name.startswith(prefix if prefix.endswith("_")
                                                else prefix + ".")
             for prefix in TEXT_SIDE)


# Parameter-name prefix of a convolutional image stem.
IMAGE_STEM = "embeddings.image_stem"


def is_image_stem(name: str) -> bool:
  return name == IMAGE_STEM or name.startswith(IMAGE_STEM + ".")


def scale_parts(text: float = 1.0, image_stem: float = 1.0
                ) -> optax.GradientTransformation:
  """Multiplies the updates of TEXT_SIDE parameters by `text` and those of
  the image stem by `image_stem` (stateless; 0 leaves them unchanged)."""
  def factor(name: str) -> float:
    if is_image_stem(name):
      return image_stem
    return text if is_text_side(name) else 1.0

  def scale(path, update):
    multiplier = factor(_path_name(path))
    return update if multiplier == 1.0 else update * multiplier

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                      eps=config.eps, weight_decay=config.weight_decay,
                      mask=weight_decay_mask)
  parts = [adamw]
  if config.text_learning_rate_scale != 1.0 or \
      config.image_stem_learning_rate_scale != 1.0:
    parts.append(scale_parts(config.text_learning_rate_scale,
                             config.image_stem_learning_rate_scale))
  if config.grad_clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)
