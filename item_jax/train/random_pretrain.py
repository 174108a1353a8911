"""Pre-training on a generated pool of random listings: a check that runs anywhere.

Titles are random token sequences and images smooth random fields; the pool is
small enough that the tiny model visibly learns it, so falling losses show the
whole step (masking, five heads, AdamW) works end to end.
"""

import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from item_jax.model import model_config
from item_jax.objectives import ObjectiveConfig, TokenSpec
from item_jax.train.optimizer import OptimizerConfig, make_optimizer
from item_jax.train.step import init_model, init_train_state, make_train_step

SPECIAL_TOKEN_IDS = (0, 1, 2, 3, 4)  # pad, unk, cls, sep, mask
MASK_TOKEN_ID = 4
SEP_TOKEN_ID = 3


def random_listings(num_listings: int, title_len: int, image_size: int,
                    vocab_size: int, seed: int, num_products: int = 16) -> dict:
  """A pool of listings drawn from a few random products.

  Each product has a random title (ending in [SEP]) and a smooth random image;
  a listing copies its product's title with one word resampled and adds pixel
  noise to its image, so titles and images carry learnable, shared structure.
  """
  rng = np.random.default_rng(seed)
  words = rng.integers(len(SPECIAL_TOKEN_IDS), vocab_size,
                       (num_products, title_len - 1)).astype(np.int32)
  lengths = rng.integers(title_len // 2, title_len, num_products)
  coarse = rng.normal(size=(num_products, 8, 8, 3)).astype(np.float32)
  product_images = np.asarray(jax.image.resize(
      coarse, (num_products, image_size, image_size, 3), "linear"))
  product = rng.integers(0, num_products, num_listings)
  title_ids = np.zeros((num_listings, title_len), np.int32)
  for row, (product_index, length) in enumerate(zip(product, lengths[product])):
    title = words[product_index, :length - 1].copy()
    title[rng.integers(0, length - 1)] = rng.integers(len(SPECIAL_TOKEN_IDS),
                                                      vocab_size)
    title_ids[row, :length - 1] = title
    title_ids[row, length - 1] = SEP_TOKEN_ID
  noise = rng.normal(scale=0.02, size=(num_listings, image_size, image_size, 3))
  image = (product_images[product] + noise).astype(np.float32)
  return {"title_ids": title_ids, "image": image}


def pretrain_random(workdir: str, steps: int = 100, batch_size: int = 16,
                    size: str = "tiny", seed: int = 0, log_every: int = 10) -> dict:
  """Trains `size` on random listings for `steps`; writes metrics.json to workdir."""
  config = model_config(size, vocab_size=128, image_size=32, patch_size=8,
                        dropout_rate=0.0)
  title_len = 16
  pool = random_listings(4 * batch_size, title_len, config.image_size,
                         config.vocab_size, seed)
  optimizer = make_optimizer(OptimizerConfig(
      learning_rate=5e-3, warmup_steps=min(10, steps), total_steps=steps,
      end_learning_rate=2e-4))
  graphdef, params = init_model(config, seed)
  state = init_train_state(params, optimizer)
  tokens = TokenSpec(config.vocab_size, MASK_TOKEN_ID, SPECIAL_TOKEN_IDS)
  train_step = jax.jit(make_train_step(graphdef, optimizer, ObjectiveConfig(),
                                       tokens, seed), donate_argnums=0)
  rng = np.random.default_rng(seed + 1)
  history, window, start = [], [], time.time()
  for step in range(steps):
    index = rng.choice(len(pool["title_ids"]), batch_size, replace=False)
    batch = {name: jnp.asarray(values[index]) for name, values in pool.items()}
    batch["index"] = jnp.asarray(index, jnp.int32)
    state, metrics = train_step(state, batch)
    window.append(metrics)
    if step % log_every == 0 or step == steps - 1:
      # Mean over the steps since the last log line: one batch is too noisy.
      values = {name: float(np.mean([m[name] for m in window]))
                for name in metrics}
      window = []
      history.append({"step": step, **values})
      logging.info("step %d: %s", step, " ".join(
          f"{name}={value:.4f}" for name, value in sorted(values.items())))
  report = {"model_size": size, "steps": steps, "batch_size": batch_size,
            "seconds": round(time.time() - start, 1),
            "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
            "history": history}
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  (path / "metrics.json").write_text(json.dumps(report, indent=2))
  return report
