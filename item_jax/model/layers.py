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
  """BERT's exact GELU, x * Phi(x), so that converted checkpoints reproduce BERT.

  Written with erf as BERT and torch write it: `jax.nn.gelu(approximate=False)`
  goes through erfc, whose expansion costs XLA:CPU two more select passes per
  element (the same values to float32 rounding).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


# Added to the scores of padding keys: exp() of it is exactly 0, and unlike
# -inf it cannot turn a row into NaN.
_MASKED_SCORE = -1e30


@jax.custom_vjp
def _softmax_attention(query, key, value, bias):
  return _softmax_attention_forward(query, key, value, bias)[0]


def _heads_major(x):
  """(batch, length, heads, head_dim) <-> (batch, heads, length, head_dim)."""
  return jnp.swapaxes(x, 1, 2)


def _softmax_attention_forward(query, key, value, bias):
  # Everything between the first and the last transpose is heads-major, and
  # the residuals are kept that way, so that the backward pass starts from the
  # layout its batched matmuls want instead of transposing q, k and v again.
  # The query is scaled before the scores (a (length x head_dim) pass instead
  # of a (length x length) one).
  scale = 1.0 / float(query.shape[-1]) ** 0.5
  q = _heads_major(query * jnp.asarray(scale, query.dtype))
  k, v = _heads_major(key), _heads_major(value)
  scores = jnp.einsum("bnth,bnsh->bnts", q, k,
                      preferred_element_type=jnp.float32) + bias
  exps = jnp.exp(scores - scores.max(-1, keepdims=True))
  probs = (exps * (1.0 / exps.sum(-1, keepdims=True))).astype(value.dtype)
  out = jnp.einsum("bnts,bnsh->bnth", probs, v)
  return _heads_major(out), (q, k, v, probs, out, bias)


def _softmax_attention_backward(residuals, d_out):
  # The softmax's backward as flash attention writes it: with O = P V,
  # sum_s dP * P = sum_h dO * O, a (batch, heads, queries) reduction of the
  # outputs instead of another pass over the (queries x keys) scores.
  q, k, v, probs, out, bias = residuals
  scale = 1.0 / float(q.shape[-1]) ** 0.5
  d_out = _heads_major(d_out)
  d_value = jnp.einsum("bnts,bnth->bnsh", probs, d_out)
  d_probs = jnp.einsum("bnth,bnsh->bnts", d_out, v,
                       preferred_element_type=jnp.float32)
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1,
                    keepdims=True)
  d_scores = (probs.astype(jnp.float32) * (d_probs - row_dot)).astype(q.dtype)
  # q was scaled before the scores, so d_key needs no scale and d_query one.
  d_query = jnp.einsum("bnts,bnsh->bnth", d_scores, k) * jnp.asarray(scale, q.dtype)
  d_key = jnp.einsum("bnts,bnth->bnsh", d_scores, q)
  return (_heads_major(d_query), _heads_major(d_key), _heads_major(d_value),
          jnp.zeros_like(bias))


_softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)


def attention(query: jax.Array, key: jax.Array, value: jax.Array,
              key_mask: jax.Array, implementation: str | None = None) -> jax.Array:
  """Softmax attention over (batch, length, heads, head_dim) inputs.

  `key_mask` (batch, length) is True for keys that may be attended to. "cudnn"
  runs `jax.nn.dot_product_attention`'s fused cuDNN kernel. Otherwise (None or
  "xla") plain XLA ops with a hand-written backward pass: it keeps only the
  probabilities, saves the passes over the scores that autodiff of
  `jax.nn.dot_product_attention`'s XLA path makes, and works heads-major
  (the tiny step on CPU 1.17x and small 1.08x faster than with `jax.nn`'s).
  Scores and softmax are float32 whatever the input dtype.
  """
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(query, key, value,
                                        mask=key_mask[:, None, None, :],
                                        implementation="cudnn")
  bias = jnp.where(key_mask, 0.0, _MASKED_SCORE).astype(jnp.float32)
  return _softmax_attention(query, key, value, bias[:, None, None, :])


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
  """Multi-head self-attention (`attention`: XLA ops, or cuDNN's fused kernel)."""

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
    attended = attention(query, key, value, token_mask, self.implementation)
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
