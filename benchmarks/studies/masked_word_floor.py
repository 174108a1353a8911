"""How low can the masked-word loss get in N steps, without a transformer?

  python benchmarks/studies/masked_word_floor.py --data runs/demo/prepared \
      [--features neighbours|context] [--steps 300] [--batch 32] [--lr 2e-3]

A yardstick for the pre-training loss goals. It trains a model that needs no
attention to learn: each masked word is predicted from its position, the mean
of the title's visible word embeddings (`context`), and, with `neighbours`,
the embeddings of the words just left and right of it. The masking (15 % of
real pieces) is BERT's without the 80/10/10 split. The optimizer is the tiny
config's: AdamW, linear warm-up over 10 % of the steps, cosine decay to a tenth
of the rate. It prints the unigram entropy of the training split's pieces and
the training loss along the way. The last line is the loss on the test split,
`masked_word_loss_at_step_<N>: <value>`.

A transformer must first learn to attend to the neighbours that this model is
handed, so its MLM loss at the same step and batch should not be lower.
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from item_jax.data.tokenizer import load_tokenizer
from item_jax.train.config import load_config
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/
from learning import load_split

NUM_SPECIAL_IDS = 5  # pad, unk, [CLS], [SEP], [MASK]


def draw_masks(title_ids: np.ndarray, rng: np.random.Generator, rate: float):
  """15 % of real pieces masked; every title gets at least one."""
  real = title_ids >= NUM_SPECIAL_IDS
  masked = real & (rng.random(title_ids.shape) < rate)
  first_real = np.argmax(real, axis=1)
  none = ~masked.any(axis=1) & real.any(axis=1)
  masked[np.flatnonzero(none), first_real[none]] = True
  return masked


def init_params(vocab: int, length: int, hidden: int, seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.key(seed), 4)
  normal = lambda key, shape: 0.02 * jax.random.normal(key, shape)
  return {"words": normal(keys[0], (vocab, hidden)),
          "positions": normal(keys[1], (length, hidden)),
          "mix": normal(keys[2], (3 * hidden, hidden)),
          "out": normal(keys[3], (hidden, vocab)), "bias": jnp.zeros(vocab)}


def masked_word_loss(params: dict, title_ids, masked, neighbours: bool):
  visible = (~masked & (title_ids != 0))[..., None]
  words = params["words"][title_ids] * visible
  context = words.sum(1, keepdims=True) / jnp.maximum(visible.sum(1, keepdims=True), 1)
  context = jnp.broadcast_to(context, words.shape) + params["positions"][None]
  if neighbours:
    left = jnp.pad(words, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    right = jnp.pad(words, ((0, 0), (0, 1), (0, 0)))[:, 1:]
  else:
    left = right = jnp.zeros_like(words)
  hidden = jax.nn.gelu(jnp.concatenate([context, left, right], -1) @ params["mix"])
  logits = hidden @ params["out"] + params["bias"]
  per_word = optax.softmax_cross_entropy_with_integer_labels(logits, title_ids)
  return (per_word * masked).sum() / masked.sum()


def unigram_entropy(title_ids: np.ndarray) -> float:
  counts = np.bincount(title_ids[title_ids >= NUM_SPECIAL_IDS])
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="a `prepare` output folder")
  parser.add_argument("--config", default="configs/item_tiny.py",
                      help="where the title length comes from")
  parser.add_argument("--features", default="neighbours", choices=["neighbours", "context"])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--mask-rate", type=float, default=0.15)
  args = parser.parse_args()

  config = load_config(args.config)
  title_len = config.data.max_title_len
  tokenizer = load_tokenizer(str(epath.Path(args.data) / "tokenizer.model"))
  train = load_split(args.data, "train", 16, title_len, "pad")["title_ids"]
  test = load_split(args.data, "test", 16, title_len, "pad")["title_ids"]
  print(f"{len(train)} training and {len(test)} test titles, vocabulary "
        f"{tokenizer.vocab_size}, unigram entropy {unigram_entropy(train):.3f} nats")

  neighbours = args.features == "neighbours"
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, max(1, args.steps // 10), args.steps, args.lr / 10)
  optimizer = optax.adamw(schedule, weight_decay=0.01)
  params = init_params(tokenizer.vocab_size, title_len, args.hidden)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, title_ids, masked):
    loss, grads = jax.value_and_grad(masked_word_loss)(params, title_ids, masked, neighbours)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)
  for index in range(args.steps):
    title_ids = train[rng.integers(0, len(train), args.batch)]
    params, opt_state, loss = step(params, opt_state, title_ids,
                                   draw_masks(title_ids, rng, args.mask_rate))
    if index == 0 or (index + 1) % max(1, args.steps // 6) == 0:
      print(f"step {index + 1:5d}: training loss {float(loss):.3f}")
  test_loss = masked_word_loss(params, test, draw_masks(test, rng, args.mask_rate), neighbours)
  print(f"masked_word_loss_at_step_{args.steps}: {float(test_loss):.3f}")


if __name__ == "__main__":
  main()
