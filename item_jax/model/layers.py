"""Building blocks of the encoder: dense, layer norm, BERT's post-LN block.

Every parameter is an `nnx.Param` carrying `logical_axes` (one name per array
dimension, e.g. ("embed", "mlp")); `item_jax.train` maps those names to mesh axes.
Activations name theirs too (`constrain`), so that under a mesh the batch stays
split over the batch axes whatever the parameters' sharding.
Parameters are float32; computation runs in the dtype each module is given.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

# While tracing under a mesh: (logical axes, shape) -> the activation's sharding.
_ACTIVATION_SHARDING = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(sharding_of):
  """Within this block, `constrain` pins activations to
  `sharding_of(logical_axes, shape)`. Enter it around the traced function
  (inside `jax.jit`), e.g. the train step."""
  token = _ACTIVATION_SHARDING.set(sharding_of)
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """`with_sharding_constraint` by logical axis names; the identity outside
  `activation_sharding`."""
  sharding_of = _ACTIVATION_SHARDING.get()
  if sharding_of is None:
    return x
  return jax.lax.with_sharding_constraint(x, sharding_of(logical_axes, x.shape))


def param(rngs: nnx.Rngs, initializer, shape, logical_axes) -> nnx.Param:
  """A float32 parameter tagged with one logical axis name per dimension."""
  if len(shape) != len(logical_axes):
    raise ValueError(f"shape {shape} and logical axes {logical_axes} differ in rank")
  return nnx.Param(initializer(rngs.params(), shape, jnp.float32),
                   logical_axes=tuple(logical_axes))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `key` is None (evaluation)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def gelu(x: jax.Array) -> jax.Array:
  # BERT's exact (erf) GELU, so that converted checkpoints reproduce BERT.
  return jax.nn.gelu(x, approximate=False)


# An encoder activation's logical axes: (batch, tokens, hidden).
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis."""

  def __init__(self, in_features: int, out_features: int, logical_axes,
               *, rngs: nnx.Rngs, dtype, initializer_range: float = 0.02,
               use_bias: bool = True):
    init = jax.nn.initializers.truncated_normal(initializer_range)
    self.kernel = param(rngs, init, (in_features, out_features), logical_axes)
    self.bias = (param(rngs, jax.nn.initializers.zeros, (out_features,),
                       logical_axes[-1:]) if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32 whatever the compute dtype."""

  def __init__(self, features: int, eps: float, *, rngs: nnx.Rngs, dtype):
    self.scale = param(rngs, jax.nn.initializers.ones, (features,), ("norm",))
    self.bias = param(rngs, jax.nn.initializers.zeros, (features,), ("norm",))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class SelfAttention(nnx.Module):
  """Multi-head self-attention through `jax.nn.dot_product_attention`."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    hidden, dtype = config.hidden_size, config.compute_dtype
    dense = lambda axes: Dense(hidden, hidden, axes, rngs=rngs, dtype=dtype,
                               initializer_range=config.initializer_range)
    self.query = dense(("embed", "heads"))
    self.key = dense(("embed", "heads"))
    self.value = dense(("embed", "heads"))
    self.output = dense(("heads", "embed"))
    self.num_heads = config.num_heads
    self.head_dim = config.head_dim
    self.implementation = config.attention_implementation

  def __call__(self, x: jax.Array, token_mask: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    split = lambda y: constrain(
        y.reshape(batch, length, self.num_heads, self.head_dim),
        ("activation_batch", "activation_length", "activation_heads", None))
    query, key, value = split(self.query(x)), split(self.key(x)), split(self.value(x))
    # Padding is masked on the key side; padded queries produce values that
    # nothing downstream reads.
    mask = token_mask[:, None, None, :]
    implementation = None if self.implementation == "xla" else self.implementation
    attended = jax.nn.dot_product_attention(
        query, key, value, mask=mask, implementation=implementation)
    return self.output(attended.reshape(batch, length, -1))


class EncoderBlock(nnx.Module):
  """One BERT layer: post-LN attention and GELU MLP, each with a residual."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    hidden, dtype = config.hidden_size, config.compute_dtype
    init_range = config.initializer_range
    self.attention = SelfAttention(config, rngs=rngs)
    self.attention_norm = LayerNorm(hidden, config.layer_norm_eps, rngs=rngs,
                                    dtype=dtype)
    self.intermediate = Dense(hidden, config.mlp_dim, ("embed", "mlp"),
                              rngs=rngs, dtype=dtype, initializer_range=init_range)
    self.mlp_output = Dense(config.mlp_dim, hidden, ("mlp", "embed"),
                            rngs=rngs, dtype=dtype, initializer_range=init_range)
    self.output_norm = LayerNorm(hidden, config.layer_norm_eps, rngs=rngs,
                                 dtype=dtype)
    self.dropout_rate = config.dropout_rate

  def __call__(self, x: jax.Array, token_mask: jax.Array,
               dropout_key: jax.Array | None = None) -> jax.Array:
    attention_key = mlp_key = None
    if dropout_key is not None:
      attention_key, mlp_key = jax.random.split(dropout_key)
    attended = dropout(self.attention(x, token_mask), self.dropout_rate,
                       attention_key)
    x = self.attention_norm(x + attended)
    hidden = constrain(gelu(self.intermediate(x)),
                       ("activation_batch", "activation_length", "activation_mlp"))
    mlp_out = self.mlp_output(hidden)
    return constrain(
        self.output_norm(x + dropout(mlp_out, self.dropout_rate, mlp_key)),
        ACTIVATION_AXES)
