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

  def __post_init__(self):
    if self.decay not in ("cosine", "linear"):
      raise ValueError(f"optimizer.decay={self.decay!r}: expected 'cosine' or 'linear'")
    if self.total_steps <= 0:
      raise ValueError("optimizer.total_steps must be > 0")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError("optimizer.warmup_steps must be in [0, total_steps]")
    if self.learning_rate <= 0:
      raise ValueError("optimizer.learning_rate must be > 0")


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


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  adamw = optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                      eps=config.eps, weight_decay=config.weight_decay,
                      mask=weight_decay_mask)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
  return adamw
