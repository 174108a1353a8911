"""Masking statistics, ITM pairing, the five losses, and the analytic FLOP count."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import SPECIAL_TOKEN_IDS, TOKENS, tiny_batch, tiny_model
from item_jax.model import ItemModel, model_config
from item_jax.objectives import (PAPER_TASKS, TASKS, ObjectiveConfig, example_keys,
                                 mask_batch, mask_patches, mask_tokens, pair_for_itm,
                                 pretraining_loss)
from item_jax.objectives.flops import training_flops_per_example


def _keys(count, seed=0):
  return jax.random.split(jax.random.key(seed), count)


def test_token_masking_matches_bert_statistics():
  batch = tiny_batch(batch=2000, title_len=24, seed=1)
  ids = batch["title_ids"]
  result = mask_tokens(_keys(2000), ids, vocab_size=100, mask_token_id=4,
                       special_token_ids=SPECIAL_TOKEN_IDS, rate=0.15)
  ids, inputs = np.asarray(ids), np.asarray(result.input_ids)
  weights = np.asarray(result.weights).astype(bool)
  indices = np.asarray(result.indices)
  rows = np.repeat(np.arange(len(ids))[:, None], indices.shape[1], 1)
  chosen_original = ids[rows[weights], indices[weights]]
  assert not np.isin(chosen_original, SPECIAL_TOKEN_IDS).any()
  maskable = ~np.isin(ids, SPECIAL_TOKEN_IDS)
  assert weights.sum() / maskable.sum() == pytest.approx(0.15, abs=0.01)
  replaced = inputs[rows[weights], indices[weights]]
  share_mask = np.mean(replaced == 4)
  share_kept = np.mean(replaced == chosen_original)
  assert share_mask == pytest.approx(0.8, abs=0.02)
  # 10% random (a random draw equals the original ~1% of the time) + 10% kept.
  assert share_kept == pytest.approx(0.1 + 0.1 / 95, abs=0.02)
  # Nothing outside the chosen slots changes, padding and [SEP] included.
  changed = inputs != ids
  chosen = np.zeros_like(changed)
  chosen[rows[weights], indices[weights]] = True
  assert not (changed & ~chosen).any()
  assert (inputs[~maskable] == ids[~maskable]).all()
  np.testing.assert_array_equal(np.asarray(result.labels)[weights], chosen_original)


def test_token_masks_depend_only_on_each_examples_key():
  batch = tiny_batch(batch=8, title_len=16)
  keys = example_keys(jax.random.key(5), jnp.arange(100, 108))
  whole = mask_tokens(keys, batch["title_ids"], vocab_size=100, mask_token_id=4,
                      special_token_ids=SPECIAL_TOKEN_IDS)
  half = mask_tokens(keys[4:], batch["title_ids"][4:], vocab_size=100,
                     mask_token_id=4, special_token_ids=SPECIAL_TOKEN_IDS)
  np.testing.assert_array_equal(whole.input_ids[4:], half.input_ids)


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_patch_masking_hits_the_ratio_exactly(block_size):
  result = mask_patches(_keys(500), 14, ratio=0.4, block_size=block_size)
  masked = np.asarray(result.masked)
  assert (masked.sum(1) == round(196 * 0.4)).all()
  indices = np.asarray(result.indices)
  assert np.take_along_axis(masked, indices, 1).all()
  assert all(len(set(row)) == len(row) for row in indices)
  # Every patch position is masked about equally often.
  assert masked.mean(0).min() > 0.2 and masked.mean(0).max() < 0.6


def test_block_masking_masks_neighbouring_patches_together():
  def neighbour_agreement(block_size):
    masked = np.asarray(mask_patches(_keys(300), 14, ratio=0.4,
                                     block_size=block_size).masked).reshape(-1, 14, 14)
    return np.mean(masked[:, :, 1:] == masked[:, :, :-1])
  # Independent masking at 40 %: 0.4^2 + 0.6^2 = 0.52 agreement.
  assert neighbour_agreement(1) == pytest.approx(0.52, abs=0.02)
  assert neighbour_agreement(3) > 0.7


def test_itm_pairs_half_the_batch_with_another_listing():
  pairing = pair_for_itm(_keys(4000), negative_rate=0.5)
  source, matched = np.asarray(pairing.image_source), np.asarray(pairing.matched)
  assert matched.mean() == pytest.approx(0.5, abs=0.03)
  assert (source[matched] == np.arange(4000)[matched]).all()
  assert (source[~matched] != np.arange(4000)[~matched]).all()
  assert (source >= 0).all() and (source < 4000).all()


def test_itm_counts_another_photo_of_the_same_product_as_a_match():
  products = jnp.array([7, 7, 7, 7])
  pairing = pair_for_itm(_keys(4), negative_rate=0.9, product_ids=products)
  assert np.asarray(pairing.matched).all()


def _loss(model, batch, objectives, seed=0):
  keys = _keys(batch["title_ids"].shape[0], seed)
  return _jitted_loss(model, batch, keys, objectives)


# Compiled once per objectives (op by op, a step of every task takes seconds).
@nnx.jit(static_argnums=3)
def _jitted_loss(model, batch, keys, objectives):
  return pretraining_loss(model, batch, keys, objectives, TOKENS)


def test_all_five_losses_are_finite_and_positive():
  total, metrics = _loss(tiny_model(), tiny_batch(batch=8), ObjectiveConfig())
  for task in PAPER_TASKS:
    assert np.isfinite(metrics[task]) and metrics[task] > 0, task
  expected = sum(metrics[task] for task in PAPER_TASKS)
  assert float(total) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("task", ["mlm", "mim", "gmlm", "gmim"])
def test_a_zero_weight_removes_exactly_that_loss(task):
  model, batch = tiny_model(), tiny_batch(batch=8)
  all_on = ObjectiveConfig(mlm_weight=2.0, gmim_weight=0.5)
  total, metrics = _loss(model, batch, all_on)
  off = dataclasses.replace(all_on, **{f"{task}_weight": 0.0})
  total_off, metrics_off = _loss(model, batch, off)
  assert task not in metrics_off
  assert float(total_off) == pytest.approx(
      float(total - all_on.weight(task) * metrics[task]), rel=1e-5)
  grads = nnx.grad(lambda m: _loss(m, batch, off)[0])(model)
  head = {"mlm": grads.mlm_transform, "mim": grads.mim_decoder,
          "gmlm": grads.gmlm_transform, "gmim": grads.gmim_decoder}[task]
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(head))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_without_itm_every_pair_is_matched_and_the_itm_head_is_idle():
  model, batch = tiny_model(), tiny_batch(batch=8)
  objectives = ObjectiveConfig(itm_weight=0.0)
  _, metrics = _loss(model, batch, objectives)
  assert "itm" not in metrics
  grads = nnx.grad(lambda m: _loss(m, batch, objectives)[0])(model)
  assert float(jnp.abs(grads.itm_classifier.kernel[...]).max()) == 0.0


def test_all_weights_zero_is_a_config_error():
  with pytest.raises(ValueError, match="nothing to train"):
    ObjectiveConfig(**{f"{task}_weight": 0.0 for task in TASKS})


def test_global_heads_ignore_the_masked_positions_own_outputs(monkeypatch):
  model, batch = tiny_model(), tiny_batch(batch=8)
  objectives = ObjectiveConfig(itm_weight=0.0)
  # Op by op: a compiled loss would not see the patched encode.
  eager = lambda: pretraining_loss(model, batch, _keys(8, 0), objectives, TOKENS)[1]
  baseline = eager()
  original_encode = ItemModel.encode

  def perturbed_encode(self, *args, **kwargs):
    encoded = original_encode(self, *args, **kwargs)
    # Every title and patch output moves; [CLS] stays.
    return encoded._replace(title_states=encoded.title_states + 3.0,
                            patch_states=encoded.patch_states - 3.0)

  monkeypatch.setattr(ItemModel, "encode", perturbed_encode)
  perturbed = eager()
  assert float(perturbed["gmlm"]) == pytest.approx(float(baseline["gmlm"]), rel=1e-6)
  assert float(perturbed["gmim"]) == pytest.approx(float(baseline["gmim"]), rel=1e-6)
  assert abs(float(perturbed["mlm"]) - float(baseline["mlm"])) > 1e-3
  assert abs(float(perturbed["mim"]) - float(baseline["mim"])) > 1e-3


def test_reconstruction_losses_count_matched_pairs_only():
  model, batch = tiny_model(), tiny_batch(batch=8)
  objectives = ObjectiveConfig(itm_negative_rate=0.5)
  keys = _keys(8, seed=3)
  pairing = pair_for_itm(jax.vmap(lambda k: jax.random.split(k, 3)[0])(keys),
                         negative_rate=0.5)
  assert not np.asarray(pairing.matched).all()
  _, metrics = pretraining_loss(model, batch, keys, objectives, TOKENS)
  # Marking the unmatched examples invalid leaves the reconstruction losses as
  # they were: they already weigh nothing.
  masked_batch = dict(batch, valid=pairing.matched)
  _, metrics_valid = pretraining_loss(model, masked_batch, keys, objectives, TOKENS)
  for task in ("mlm", "mim", "gmlm", "gmim"):
    assert float(metrics_valid[task]) == pytest.approx(float(metrics[task]), rel=1e-5)


def test_the_jitted_loss_compiles_once_for_fixed_shapes():
  model = tiny_model()
  graphdef, params = nnx.split(model)
  traces = []

  @jax.jit
  def loss(params, batch, keys):
    traces.append(1)
    return pretraining_loss(nnx.merge(graphdef, params), batch, keys,
                            ObjectiveConfig(), TOKENS)[0]

  for seed in range(3):
    loss(params, tiny_batch(batch=4, seed=seed), _keys(4, seed))
  assert len(traces) == 1
  loss(params, tiny_batch(batch=6), _keys(6))
  assert len(traces) == 2


def test_tiny_model_overfits_a_fixed_batch():
  model = tiny_model(seed=1)
  graphdef, params = nnx.split(model)
  batch = tiny_batch(batch=16, title_len=12, seed=2)
  keys = _keys(16, seed=4)
  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, 2e-3, 20, 200, 2e-4), weight_decay=0.01)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      return pretraining_loss(nnx.merge(graphdef, params), batch, keys,
                              ObjectiveConfig(), TOKENS)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(200):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_base_training_flops_per_example_are_about_130_gflop():
  flops = training_flops_per_example(model_config("base"), title_len=40)
  assert flops["total"] == pytest.approx(130e9, rel=0.10)
  # 6 x non-embedding params x tokens dominates.
  assert flops["encoder"] == 6 * 12 * (4 * 768**2 + 2 * 768 * 3072) * 237


def test_disabled_tasks_cost_no_flops():
  config = model_config("base")
  all_on = training_flops_per_example(config, 40)
  no_global = training_flops_per_example(
      config, 40, ObjectiveConfig(gmlm_weight=0.0, gmim_weight=0.0))
  assert "gmlm" not in no_global and "gmim" not in no_global
  assert no_global["total"] == all_on["total"] - all_on["gmlm"] - all_on["gmim"]


# -- ITC: the image-text contrastive task ------------------------------------

from item_jax.objectives import contrastive_loss  # noqa: E402


def test_itc_of_identical_rows_is_ln_batch_at_temperature_one():
  rows = jnp.ones((16, 8))
  loss = contrastive_loss(rows, rows, jnp.float32(1.0), jnp.ones(16))
  assert float(loss) == pytest.approx(np.log(16), rel=1e-6)


def test_itc_matches_a_numpy_infonce_and_permuting_images_raises_it():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(8, 16)).astype(np.float32)
  b = (a + 0.3 * rng.normal(size=(8, 16))).astype(np.float32)
  scale = 5.0
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  logits = scale * unit(a) @ unit(b).T
  log_softmax = lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))
  expected = -0.5 * (np.diag(log_softmax(logits)).mean()
                     + np.diag(log_softmax(logits.T)).mean())
  loss = float(contrastive_loss(jnp.asarray(a), jnp.asarray(b),
                                jnp.float32(scale), jnp.ones(8)))
  assert loss == pytest.approx(expected, rel=1e-5)
  permuted = float(contrastive_loss(jnp.asarray(a), jnp.asarray(b[::-1]),
                                    jnp.float32(scale), jnp.ones(8)))
  assert permuted > loss + 1.0


def test_itc_padding_rows_are_neither_queries_nor_candidates():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 6, 8)).astype(np.float32)
  weight = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
  padded = contrastive_loss(a, b, jnp.float32(3.0), weight)
  alone = contrastive_loss(a[:4], b[:4], jnp.float32(3.0), jnp.ones(4))
  assert float(padded) == pytest.approx(float(alone), rel=1e-6)
  # Same-product rows are no negatives: with rows 0 and 1 one product, row 0
  # competes only with rows 2 and 3.
  products = jnp.asarray([7, 7, 8, 9])
  grouped = contrastive_loss(a[:4], b[:4], jnp.float32(3.0), jnp.ones(4), products)
  keep = [0, 2, 3]
  first = contrastive_loss(a[keep], b[keep], jnp.float32(3.0), jnp.ones(3))
  assert float(grouped) != pytest.approx(float(alone))
  assert np.isfinite(float(grouped)) and float(first) > 0


def test_itc_is_a_sixth_task_off_by_default_with_a_learnable_temperature():
  model, batch = tiny_model(), tiny_batch(batch=8)
  _, paper = _loss(model, batch, ObjectiveConfig())
  assert "itc" not in paper
  objectives = ObjectiveConfig(itc_weight=2.0)
  total, metrics = _loss(model, batch, objectives)
  assert float(metrics["itc_temperature"]) == pytest.approx(0.07, rel=1e-4)
  assert float(total) == pytest.approx(
      float(paper["loss"]) + 2.0 * float(metrics["itc"]), rel=1e-5)
  grads = nnx.grad(lambda m: _loss(m, batch, objectives)[0])(model)
  assert float(jnp.abs(grads.itc_logit_scale[0])) > 0
  only_itc = ObjectiveConfig(**{f"{task}_weight": 0.0 for task in PAPER_TASKS},
                             itc_weight=1.0)
  total, metrics = _loss(model, batch, only_itc)
  assert set(metrics) == {"loss", "itc", "itc_temperature"}
  grads = nnx.grad(lambda m: _loss(m, batch, only_itc)[0])(model)
  assert float(jnp.abs(grads.mlm_transform.kernel[...]).max()) == 0.0
  assert float(jnp.abs(grads.layers[0].intermediate.kernel[...]).max()) > 0


def test_itc_joint_view_uses_matched_pairs_of_the_main_pass():
  model, batch = tiny_model(), tiny_batch(batch=8)
  pairs = "title:image,joint:title,joint:image"
  _, with_joint = _loss(model, batch, ObjectiveConfig(itc_weight=1.0,
                                                      itc_pairs=pairs))
  _, plain = _loss(model, batch, ObjectiveConfig(itc_weight=1.0))
  assert np.isfinite(float(with_joint["itc"]))
  assert float(with_joint["itc"]) != pytest.approx(float(plain["itc"]))


def test_itc_text_view_contrasts_the_text_read_alone():
  model, batch = tiny_model(), tiny_batch(batch=8)
  text_ids = tiny_batch(batch=8, seed=3)["title_ids"]
  objectives = ObjectiveConfig(**{f"{task}_weight": 0.0 for task in PAPER_TASKS},
                               itc_weight=1.0, itc_pairs="title:text")
  cls = lambda ids: model.encode(ids, None, title_mask=ids != 0).cls
  title, text = cls(batch["title_ids"]), cls(text_ids)
  with_text = {**batch, "text_ids": text_ids, "has_text": jnp.ones(8, bool)}
  _, metrics = _loss(model, with_text, objectives)
  assert float(metrics["itc"]) == pytest.approx(float(contrastive_loss(
      title, text, model.itc_scale(), jnp.ones(8))), rel=1e-5)
  # A listing without text is neither a query nor a candidate.
  _, half = _loss(model, {**with_text, "has_text": jnp.arange(8) < 4}, objectives)
  assert float(half["itc"]) == pytest.approx(float(contrastive_loss(
      title[:4], text[:4], model.itc_scale(), jnp.ones(4))), rel=1e-5)
  # Its gradient reaches the shared encoder through the text pass too.
  grads = nnx.grad(lambda m: _loss(m, with_text, objectives)[0])(model)
  assert float(jnp.abs(grads.layers[0].intermediate.kernel[...]).max()) > 0


@pytest.mark.parametrize("pairs", ["title", "title:title", "title:photo",
                                   "title:image,image:title:joint",
                                   "title:image,title:image"])
def test_bad_itc_pairs_are_a_config_error(pairs):
  with pytest.raises(ValueError, match="itc_pairs"):
    ObjectiveConfig(itc_weight=1.0, itc_pairs=pairs)


def test_itc_costs_its_extra_passes_in_flops():
  config = model_config("base")
  paper = training_flops_per_example(config, 40)
  with_itc = training_flops_per_example(config, 40, ObjectiveConfig(itc_weight=1.0))
  extra = with_itc["total"] - paper["total"]
  per_token = 6 * 12 * (4 * 768**2 + 2 * 768 * 3072)
  assert with_itc["itc_encoder"] == per_token * (41 + 197)
  assert extra > with_itc["itc_encoder"]
  # The text view's pass reads its own length.
  with_text = training_flops_per_example(
      config, 40, ObjectiveConfig(itc_weight=1.0, itc_pairs="title:image,title:text"),
      text_len=64)
  assert with_text["itc_encoder"] == per_token * (41 + 197 + 65)


def test_a_listing_without_an_image_or_title_drops_only_its_tasks():
  model, batch = tiny_model(), tiny_batch(batch=8)
  objectives = ObjectiveConfig(itm_weight=0.0)
  keys = _keys(8, seed=7)
  mixed = dict(batch, has_image=jnp.arange(8) != 2, has_title=jnp.arange(8) != 5)
  _, with_masks = pretraining_loss(model, mixed, keys, objectives, TOKENS)
  # The same listings written out: 2 takes no part in image tasks, 5 has an
  # empty title (all padding, so nothing to mask or attend to).
  written = dict(batch, valid=jnp.arange(8) != 2,
                 title_ids=batch["title_ids"].at[5].set(0))
  _, reference = pretraining_loss(model, written, keys, objectives, TOKENS)
  for task in ("mim", "gmim"):
    assert float(with_masks[task]) == pytest.approx(float(reference[task]), rel=1e-5)
  _, full = pretraining_loss(model, batch, keys, objectives, TOKENS)
  assert float(with_masks["mlm"]) != pytest.approx(float(full["mlm"]), rel=1e-4)


def test_a_title_only_batch_trains_its_text_tasks_only():
  model = tiny_model(seed=1)
  graphdef, params = nnx.split(model)
  batch = dict(tiny_batch(batch=16, title_len=12, seed=2),
               has_image=jnp.zeros(16, bool))
  keys = _keys(16, seed=4)

  def loss_fn(params, pairs="joint:title"):
    return pretraining_loss(nnx.merge(graphdef, params), batch, keys,
                            ObjectiveConfig(itc_weight=1.0, itc_pairs=pairs), TOKENS)

  (_, metrics), grads = jax.jit(jax.value_and_grad(
      lambda params: loss_fn(params, "title:image,joint:image"), has_aux=True))(params)
  # No image: ITM, MIM, GMIM and ITC pairs with an image weigh nothing, and
  # nothing reaches the patch embedding.
  for task in ("itm", "mim", "gmim", "itc"):
    assert float(metrics[task]) == 0.0, task
  assert float(metrics["mlm"]) > 1.0 and float(metrics["gmlm"]) > 1.0
  # The masked title against the clean one is a pair a title-only listing has.
  assert float(jax.jit(loss_fn)(params)[1]["itc"]) > 1.0
  patch_grad = grads["embeddings"]["patch_embedding"]["kernel"].value
  assert not np.asarray(patch_grad).any()
  optimizer = optax.adam(2e-3)
  state = optimizer.init(params)
  step = jax.jit(lambda params, state: _sgd_step(loss_fn, optimizer, params, state))
  losses = []
  for _ in range(30):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], (losses[0], losses[-1])


def _sgd_step(loss_fn, optimizer, params, state):
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, state = optimizer.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


def test_itm_pairs_only_listings_with_both_inputs():
  model, batch = tiny_model(), tiny_batch(batch=8)
  keys = _keys(8, seed=3)
  only_titles = dict(batch, has_image=jnp.zeros(8, bool))
  _, metrics = pretraining_loss(model, only_titles, keys, ObjectiveConfig(), TOKENS)
  assert float(metrics["itm"]) == 0.0 and float(metrics["itm_accuracy"]) == 0.0
  from item_jax.objectives.losses import mask_batch
  masked = mask_batch(model.config, dict(batch, has_title=jnp.arange(8) >= 4),
                      keys, ObjectiveConfig(itm_negative_rate=0.9), TOKENS)
  # Listings without a title keep their own image and count as matched.
  assert np.asarray(masked.matched[:4]).all()
  np.testing.assert_array_equal(masked.image[:4], batch["image"][:4])
  assert not np.asarray(masked.matched[4:]).all()


def test_a_frozen_mobilenet_stem_costs_its_forward_pass_once_per_image_pass():
  # The whole network at 224 px is MobileNetV2's published ~300 M
  # multiply-adds; the stride-16 cut a part of it.
  full = model_config("base", image_stem="mobilenet_v2", patch_size=32)
  from item_jax.objectives.flops import image_stem_flops
  assert image_stem_flops(full) / 2 == pytest.approx(300e6, rel=0.05)
  config = model_config("base", image_stem="mobilenet_v2", patch_size=16)
  flops = training_flops_per_example(config, 40)
  assert flops["image_stem"] == image_stem_flops(config)            # forward only
  assert flops["patch_embedding"] == 3 * 2 * 196 * 96 * 768
  tuned = training_flops_per_example(
      model_config("base", image_stem="mobilenet_v2", patch_size=16,
                   freeze_image_stem=False), 40)
  assert tuned["image_stem"] == 3 * flops["image_stem"]


def test_modality_dropout_drops_one_input_of_listings_that_have_both():
  keys = _keys(2000, seed=3)
  batch = dict(tiny_batch(batch=2000, title_len=6, image_size=8),
               has_image=jnp.arange(2000) % 10 != 0)
  config = tiny_model().config
  plain = mask_batch(config, batch, keys, ObjectiveConfig(), TOKENS)
  dropped = mask_batch(config, batch, keys, ObjectiveConfig(
      joint_image_dropout=0.3, joint_title_dropout=0.2), TOKENS)
  has_image = np.asarray(batch["has_image"])
  lost_image = np.asarray(plain.image_present & ~dropped.image_present)
  lost_title = np.asarray(plain.has_title & ~dropped.has_title)
  # Never both, never from a listing with one input only.
  assert not (lost_image & lost_title).any()
  assert not (lost_title & ~has_image).any() and not (lost_image & ~has_image).any()
  assert lost_image[has_image].mean() == pytest.approx(0.3, abs=0.04)
  # The title is drawn among those that kept their photo: 0.7 x 0.2.
  assert lost_title[has_image].mean() == pytest.approx(0.14, abs=0.03)
  # A dropped title has no token in the joint pass; other masks are as before.
  assert not np.asarray(dropped.title_mask)[lost_title].any()
  np.testing.assert_array_equal(dropped.input_ids, plain.input_ids)
  np.testing.assert_array_equal(dropped.matched, plain.matched)


def test_a_dropped_photo_is_a_listing_without_one_in_the_joint_pass():
  model, batch = tiny_model(), tiny_batch(batch=8)
  objectives = dict(itc_weight=1.0, itc_pairs="joint:title", itm_weight=0.0,
                    mim_weight=0.0, gmim_weight=0.0)
  keys = _keys(8, seed=5)
  # With a rate near 1 every listing loses its photo in the joint pass: the
  # losses are those of the same batch written without photos.
  _, dropped = pretraining_loss(model, batch, keys, ObjectiveConfig(
      joint_image_dropout=0.999999, **objectives), TOKENS)
  _, without = pretraining_loss(model, dict(batch, has_image=jnp.zeros(8, bool)),
                                keys, ObjectiveConfig(**objectives), TOKENS)
  _, plain = pretraining_loss(model, batch, keys, ObjectiveConfig(**objectives),
                              TOKENS)
  for task in ("itc", "mlm", "gmlm"):
    assert float(dropped[task]) == pytest.approx(float(without[task]), rel=1e-5)
  assert float(dropped["mlm"]) != pytest.approx(float(plain["mlm"]), rel=1e-4)


@pytest.mark.parametrize("field", ["joint_image_dropout", "joint_title_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_bad_modality_dropout_is_a_config_error(field, value):
  with pytest.raises(ValueError, match=f"objectives.{field}"):
    ObjectiveConfig(**{field: value})
