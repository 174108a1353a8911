"""How fast a config learns on a prepared catalogue, and what its embeddings are worth.

  python benchmarks/learning.py --data runs/demo/prepared \
      [--config configs/item_tiny.py] [--steps 300] [--config.optimizer.learning_rate=1e-3 ...]

Decodes the training and test splits once into memory, trains on one device
with the real jitted step (same masks, optimizer and schedule as `item-jax
train`, no checkpoints), and prints each task's loss averaged over every log
window. It then prints test macro Recall@10 for the three [CLS] views, and for
the mean of the title tokens' and the patches' outputs. Comparing those says
whether information is missing from the encoder or only from [CLS].
`--eval-at 0,50,300` also prints them at those steps (0: before any update),
to see when training gains or loses them. `--word-bias unigram` starts the MLM
and GMLM output biases at the training titles' log unigram frequencies instead
of zero. Fast to rerun when trying a recipe. The last line is
`loss_ratio_at_step_<N>: <last window's mean loss / step 1's loss>`.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from item_jax.convert.workdir import restore_workdir
from item_jax.data import pipeline
from item_jax.data.tokenizer import load_tokenizer
from item_jax.eval import metrics
from item_jax.objectives import TokenSpec
from item_jax.train.config import load_config, validate
from item_jax.train.optimizer import make_optimizer
from item_jax.train.image_stem import with_pretrained_stem
from item_jax.train.step import init_model, init_train_state, make_train_step

LOSSES = ("loss", "itm", "itm_accuracy", "mlm", "gmlm", "mim", "gmim", "itc",
          "itc_temperature")


def load_split(data_dir: str, split: str, image_size: int, title_len: int,
               resize: str) -> dict:
  """Every listing of a split as numpy arrays (valid rows only)."""
  dataset = pipeline.make_dataset(data_dir, split, 256, image_size, title_len,
                                  training=False, process_index=0,
                                  process_count=1, resize=resize)
  parts = {name: [] for name in ("title_ids", "image", "product_id", "category_id")}
  for batch in dataset.as_numpy_iterator():
    for name in parts:
      parts[name].append(batch[name][batch["valid"]])
  return {name: np.concatenate(values) for name, values in parts.items()}


def embeddings(model, test: dict, batch: int = 256) -> dict:
  """Unit rows per view: the three [CLS] views and two mean-pooled outputs."""

  def views(title_ids, image):
    encoded = model.encode(title_ids, image)
    real = (title_ids != model.config.pad_token_id)[..., None]
    return {"both": model.embed(title_ids, image),
            "title": model.embed(title_ids, None),
            "image": model.embed(None, image),
            "title tokens, mean": (encoded.title_states * real).sum(1) / real.sum(1),
            "patches, mean": encoded.patch_states.mean(1)}

  views = jax.jit(views)
  parts = [views(test["title_ids"][start:start + batch],
                 test["image"][start:start + batch])
           for start in range(0, len(test["title_ids"]), batch)]
  out = {}
  for name in parts[0]:
    rows = np.concatenate([np.asarray(part[name], np.float32) for part in parts])
    out[name] = rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)
  return out


def training_batches(train: dict, batch_size: int, steps: int, seed: int):
  """The in-memory training batches of `steps` steps: epochs of a seeded
  permutation, each example's global index as the step's mask key input."""
  count = len(train["title_ids"])
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(count)
                          for _ in range(steps * batch_size // count + 1)])
  for index in range(steps):
    rows = order[index * batch_size:(index + 1) * batch_size]
    yield {"title_ids": train["title_ids"][rows], "image": train["image"][rows],
           "valid": np.ones(batch_size, bool),
           "index": np.arange(index * batch_size, (index + 1) * batch_size,
                              dtype=np.int32)}


def unigram_log_frequencies(title_ids: np.ndarray, vocab_size: int,
                            special_ids) -> np.ndarray:
  """log p(piece) over the titles' pieces, specials excluded (add-0.1 smoothed)."""
  counts = np.bincount(title_ids.ravel(), minlength=vocab_size).astype(np.float64)
  counts[list(special_ids)] = 0
  counts += 0.1
  return np.log(counts / counts.sum()).astype(np.float32)


def print_retrieval(model, test: dict, label: str):
  scores = {}
  for name, rows in embeddings(model, test).items():
    scores[name] = metrics.same_product_retrieval(
        rows, test["product_id"], test["category_id"])["macro_recall@10"]
  print(f"{label} test macro R@10: " + ", ".join(
      f"{name} {value:.3f}" for name, value in scores.items()), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="a `prepare` output folder")
  parser.add_argument("--config", default="configs/item_tiny.py")
  parser.add_argument("--stem-dir", default="runs/learning",
                      help="where a convolutional image stem's weights file is kept")
  parser.add_argument("--steps", type=int, default=None,
                      help="default: the config's total_steps")
  parser.add_argument("--init-from", default=None, metavar="WORKDIR",
                      help="start from this workdir's latest checkpoint (e.g. a "
                      "converted BERT's step 0; use its config: "
                      "--config configs/item_converted.py:WORKDIR)")
  parser.add_argument("--eval-at", default="", metavar="STEPS",
                      help="comma-separated steps at which to print test R@10 "
                      "(0: before the first update)")
  parser.add_argument("--word-bias", choices=["zero", "unigram"], default="zero",
                      help="initial MLM/GMLM output bias")
  args, overrides = parser.parse_known_args()
  config = load_config(args.config, [*overrides, f"--config.data.dir={args.data}"])
  if args.steps:
    config.total_steps = args.steps
  settings = validate(config, num_devices=1)
  model_config = settings.model

  start = time.perf_counter()
  split = lambda name: load_split(args.data, name, model_config.image_size,
                                  config.data.max_title_len, config.data.resize)
  train, test = split("train"), split("test")
  print(f"decoded {len(train['title_ids'])} training and {len(test['title_ids'])} "
        f"test listings in {time.perf_counter() - start:.0f} s")

  tokenizer = load_tokenizer(str(epath.Path(args.data) / settings.dataset["tokenizer"]))
  tokens = TokenSpec(model_config.vocab_size, tokenizer.mask_id, tokenizer.special_ids)
  optimizer = make_optimizer(settings.optimizer)
  graphdef, params = init_model(model_config, config.seed)
  # A convolutional image stem starts from ImageNet (its file kept in --stem-dir).
  params = with_pretrained_stem(params, model_config, args.stem_dir)
  if args.init_from:
    restored = restore_workdir(args.init_from)
    shapes = lambda tree: jax.tree.map(jnp.shape, tree)
    if shapes(restored.state.params) != shapes(params):
      raise ValueError(f"--init-from {args.init_from}: its parameters do not fit "
                       "--config's model; pass --config configs/item_converted.py:"
                       f"{args.init_from}")
    params = jax.device_get(restored.state.params)
    print(f"starting from step {restored.step} of {args.init_from}")
  if args.word_bias == "unigram":
    prior = unigram_log_frequencies(train["title_ids"], model_config.vocab_size,
                                    tokens.special_token_ids)
    params["mlm_bias"].value = jnp.asarray(prior)
    params["gmlm_bias"].value = jnp.asarray(prior)
  eval_at = {int(step) for step in args.eval_at.split(",") if step}
  if 0 in eval_at:
    print_retrieval(nnx.merge(graphdef, params), test, "step 0:")
  state = init_train_state(params, optimizer)
  step = jax.jit(make_train_step(graphdef, optimizer, settings.objectives, tokens,
                                 config.seed, config.grad_accumulation_steps),
                 donate_argnums=0)

  size = config.global_batch_size
  first, window = None, []
  start = time.perf_counter()
  for index, batch in enumerate(training_batches(train, size, config.total_steps,
                                                 config.seed)):
    state, step_metrics = step(state, batch)
    window.append(step_metrics)
    number = index + 1
    if number in eval_at:
      print_retrieval(nnx.merge(graphdef, state.params), test, f"step {number}:")
    if number == 1 or number % config.log_every_steps == 0 or number == config.total_steps:
      window = jax.device_get(window)
      means = {name: float(np.mean([m[name] for m in window]))
               for name in LOSSES if name in window[0]}
      first = first or means
      print(f"step {number:5d}: " + " ".join(f"{name} {value:.3f}"
                                              for name, value in means.items()),
            flush=True)
      window = []
  print(f"trained {config.total_steps} steps of {size} in "
        f"{time.perf_counter() - start:.0f} s")

  print_retrieval(nnx.merge(graphdef, state.params), test, "trained:")
  print(f"loss_ratio_at_step_{config.total_steps}: {means['loss'] / first['loss']:.3f}")


if __name__ == "__main__":
  main()
