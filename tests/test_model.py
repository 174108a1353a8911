"""The ITEm model: shapes, padding, modalities, BERT layer layout, logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_batch, tiny_config, tiny_model
from item_jax.model import ItemModel, model_config, patchify
from item_jax.model.layers import EncoderBlock


def test_every_head_has_the_expected_shape():
  model, batch = tiny_model(), tiny_batch(batch=3, title_len=10)
  config = model.config
  encoded = model.encode(batch["title_ids"], batch["image"])
  assert encoded.cls.shape == (3, 64)
  assert encoded.title_states.shape == (3, 10, 64)
  assert encoded.patch_states.shape == (3, config.num_patches, 64)
  assert model.itm_logits(encoded.cls).shape == (3, 2)
  assert model.mlm_logits(encoded.title_states[:, :2]).shape == (3, 2, 100)
  assert model.mim_pixels(encoded.patch_states[:, :5]).shape == (3, 5, 192)
  indices = jnp.zeros((3, 2), jnp.int32)
  assert model.gmlm_logits(encoded.cls, indices).shape == (3, 2, 100)
  assert model.gmim_pixels(encoded.cls, indices).shape == (3, 2, 192)
  assert model.embed(batch["title_ids"], batch["image"]).shape == (3, 64)


def test_base_preset_is_bert_base_with_196_patches():
  config = model_config("base")
  assert (config.num_layers, config.hidden_size, config.num_heads,
          config.mlp_dim) == (12, 768, 12, 3072)
  assert config.num_patches == 196 and config.patch_dim == 768


def test_changing_a_padded_token_changes_nothing():
  model, batch = tiny_model(), tiny_batch()
  ids = batch["title_ids"]
  assert (ids == 0).any()
  other = jnp.where(ids == 0, 57, ids)
  mask = ids != 0
  first = model.encode(ids, batch["image"], title_mask=mask)
  second = model.encode(other, batch["image"], title_mask=mask)
  np.testing.assert_allclose(first.cls, second.cls, atol=1e-5)
  np.testing.assert_allclose(first.patch_states, second.patch_states, atol=1e-5)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(first.title_states)[real],
                             np.asarray(second.title_states)[real], atol=1e-5)
  # Without the mask the same change does reach [CLS]: the mask is what works.
  unmasked = model.encode(other, batch["image"], title_mask=jnp.ones_like(mask))
  assert np.abs(np.asarray(unmasked.cls - first.cls)).max() > 1e-3


def test_default_title_mask_comes_from_the_pad_id():
  model, batch = tiny_model(), tiny_batch()
  explicit = model.encode(batch["title_ids"], batch["image"],
                          title_mask=batch["title_ids"] != 0)
  implicit = model.encode(batch["title_ids"], batch["image"])
  np.testing.assert_allclose(explicit.cls, implicit.cls, atol=1e-6)


def test_a_missing_modality_is_absent_from_the_sequence():
  model, batch = tiny_model(), tiny_batch()
  both = model.embed(batch["title_ids"], batch["image"])
  title_only = model.embed(batch["title_ids"])
  image_only = model.embed(image=batch["image"])
  for embedding in (both, title_only, image_only):
    np.testing.assert_allclose(jnp.linalg.norm(embedding, axis=-1), 1.0, atol=1e-5)
  assert model.encode(batch["title_ids"]).patch_states is None
  assert model.encode(image=batch["image"]).title_states is None
  assert np.abs(np.asarray(both - title_only)).max() > 1e-3
  assert np.abs(np.asarray(both - image_only)).max() > 1e-3
  # A title-only embedding ignores whatever image would have been there.
  np.testing.assert_allclose(
      title_only, model.embed(batch["title_ids"]), atol=0)
  with pytest.raises(ValueError, match="title_ids, image, or both"):
    model.encode()


def test_masked_patches_use_the_mask_embedding():
  model, batch = tiny_model(), tiny_batch()
  masked = jnp.zeros((4, 16), bool).at[:, 3].set(True)
  embedded = model.embeddings.image(batch["image"], masked)
  other_image = batch["image"].at[:, :8, 24:32].set(9.0)  # patch 3's pixels
  np.testing.assert_allclose(embedded, model.embeddings.image(other_image, masked),
                             atol=1e-6)


def test_patchify_orders_patches_row_major():
  image = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  patches = patchify(image, 2)
  assert patches.shape == (2, 4, 4)
  np.testing.assert_array_equal(patches[0, 1], [2, 3, 6, 7])
  np.testing.assert_array_equal(patches[0, 2], [8, 9, 12, 13])


def _bert_layer_reference(x, mask, p, eps, heads):
  """BERT's layer in numpy: post-LN attention and erf-GELU MLP."""
  from scipy.special import erf

  def layer_norm(v, scale, bias):
    mean = v.mean(-1, keepdims=True)
    var = ((v - mean) ** 2).mean(-1, keepdims=True)
    return (v - mean) / np.sqrt(var + eps) * scale + bias

  batch, length, hidden = x.shape
  head_dim = hidden // heads
  def project(name):
    y = x @ p[name]["kernel"] + p[name]["bias"]
    return y.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
  q, k, v = project("query"), project("key"), project("value")
  scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  scores = np.where(mask[:, None, None, :], scores, -1e30)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
  attended = context @ p["output"]["kernel"] + p["output"]["bias"]
  x = layer_norm(x + attended, p["attention_norm"]["scale"],
                 p["attention_norm"]["bias"])
  inner = x @ p["intermediate"]["kernel"] + p["intermediate"]["bias"]
  inner = 0.5 * inner * (1 + erf(inner / np.sqrt(2)))
  out = inner @ p["mlp_output"]["kernel"] + p["mlp_output"]["bias"]
  return layer_norm(x + out, p["output_norm"]["scale"], p["output_norm"]["bias"])


def test_encoder_block_matches_a_numpy_bert_layer():
  config = tiny_config(layer_norm_eps=1e-12)
  block = EncoderBlock(config, rngs=nnx.Rngs(3))
  # Non-trivial norms and biases so that every term is exercised.
  for path, variable in nnx.iter_graph(block):
    if isinstance(variable, nnx.Param) and variable.ndim == 1:
      variable[...] = jax.random.normal(jax.random.key(len(path)), variable.shape)
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 7, 64)), np.float64)
  mask = np.array([[1, 1, 1, 1, 1, 0, 0], [1] * 7], bool)
  state = nnx.to_pure_dict(nnx.state(block))
  params = {
      "query": state["attention"]["query"], "key": state["attention"]["key"],
      "value": state["attention"]["value"], "output": state["attention"]["output"],
      "attention_norm": state["attention_norm"],
      "intermediate": state["intermediate"], "mlp_output": state["mlp_output"],
      "output_norm": state["output_norm"]}
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  expected = _bert_layer_reference(x, mask, params, 1e-12, config.num_heads)
  actual = block(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(actual)[mask], expected[mask],
                             atol=2e-4, rtol=2e-4)


def test_every_parameter_carries_logical_axes_of_its_rank():
  model = tiny_model()
  names = set()
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param):
      axes = variable.get_metadata()["logical_axes"]
      assert len(axes) == variable.ndim, path
      names.update(axes)
  assert {"embed", "mlp", "heads", "vocab"} <= names


def test_bfloat16_compute_keeps_float32_parameters():
  model = tiny_model(dtype="bfloat16")
  batch = tiny_batch()
  encoded = model.encode(batch["title_ids"], batch["image"])
  assert encoded.cls.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(encoded.cls, np.float32)).all()
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(p.dtype == jnp.float32 for p in params)
  reference = tiny_model().embed(batch["title_ids"], batch["image"])
  np.testing.assert_allclose(
      model.embed(batch["title_ids"], batch["image"]), reference, atol=0.05)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=65), "not divisible by model.num_heads"),
    (dict(image_size=30), "not divisible by model.patch_size"),
    (dict(dtype="int8"), "model.dtype"),
    (dict(colour="red"), "unknown model field"),
])
def test_bad_model_configs_fail_with_the_field_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    tiny_config(**overrides)


def test_unknown_size_preset_is_refused():
  with pytest.raises(ValueError, match="model.size='huge'"):
    model_config("huge")


def test_titles_longer_than_the_position_table_are_refused():
  model = tiny_model(max_title_positions=8)
  with pytest.raises(ValueError, match="max_title_positions=8"):
    model.encode(jnp.ones((1, 8), jnp.int32))


@pytest.mark.parametrize("remat", ["block", "full"])
def test_rematerialised_blocks_give_the_same_gradients(remat):
  from item_jax.objectives import ObjectiveConfig, pretraining_loss
  from helpers import TOKENS
  batch = tiny_batch()
  keys = jax.random.split(jax.random.key(0), 4)

  def grads(model):
    graphdef, params = nnx.split(model)
    loss = lambda p: pretraining_loss(nnx.merge(graphdef, p), batch, keys,
                                      ObjectiveConfig(), TOKENS)[0]
    return jax.jit(jax.grad(loss))(params)

  plain, rematerialised = grads(tiny_model()), grads(tiny_model(remat=remat))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematerialised)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _attention_inputs(dtype, batch=3, length=9, heads=4, head_dim=8):
  keys = jax.random.split(jax.random.key(7), 4)
  q, k, v, d_out = (jax.random.normal(key, (batch, length, heads, head_dim)).astype(dtype)
                    for key in keys)
  # Padding at the end of two rows; row 1 keeps a single real key.
  real_keys = jnp.array([length, 1, min(5, length)])[:batch, None]
  key_mask = jnp.arange(length)[None, :] < real_keys
  return q, k, v, d_out, key_mask


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_attention_and_its_backward_match_jax_dot_product_attention(dtype, tolerance):
  from item_jax.model.layers import attention
  q, k, v, d_out, key_mask = _attention_inputs(dtype)

  def vjp(function):
    out, pullback = jax.vjp(function, q, k, v)
    return (out, *pullback(d_out))

  ours = jax.jit(lambda: vjp(lambda q, k, v: attention(q, k, v, key_mask)))()
  theirs = jax.jit(lambda: vjp(lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, mask=key_mask[:, None, None, :], implementation="xla")))()
  for name, a, b in zip(("out", "d_query", "d_key", "d_value"), ours, theirs):
    assert a.dtype == dtype, name
    scale = float(jnp.abs(b.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=tolerance * scale, err_msg=name)
  # Padding keys get no gradient and change nothing.
  _, _, d_key, d_value = ours
  assert not np.asarray(d_key)[~np.asarray(key_mask)].any()
  assert not np.asarray(d_value)[~np.asarray(key_mask)].any()


def test_attention_gradients_match_a_float64_finite_difference():
  from item_jax.model.layers import attention
  q, k, v, d_out, key_mask = _attention_inputs(jnp.float32, batch=2, length=5,
                                               heads=2, head_dim=4)
  loss = lambda q, k, v: jnp.sum(attention(q, k, v, key_mask) * d_out)
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  with jax.enable_x64():
    def loss64(q, k, v):
      scores = jnp.einsum("btnh,bsnh->bnts", q, k) / 2.0
      scores = jnp.where(key_mask[:, None, None, :], scores, -jnp.inf)
      out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), v)
      return jnp.sum(out * d_out.astype(jnp.float64))
    inputs = [a.astype(jnp.float64) for a in (q, k, v)]
    for argnum, grad in enumerate(grads):
      # A central difference along one random direction per input.
      direction = jax.random.normal(jax.random.key(argnum), grad.shape, jnp.float64)
      step = 1e-4
      shifted = lambda sign: loss64(*[a + sign * step * direction if i == argnum else a
                                      for i, a in enumerate(inputs)])
      numeric = (shifted(1) - shifted(-1)) / (2 * step)
      analytic = jnp.sum(grad.astype(jnp.float64) * direction)
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-4)
