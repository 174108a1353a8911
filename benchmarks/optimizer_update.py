"""The parameter update alone: item-jax's against torch's fused AdamW, on CPU.

  python benchmarks/optimizer_update.py --config small
  python benchmarks/optimizer_update.py --config base --rounds 6

One process, alternating turns, the same parameter shapes (the config's model
at BERT's vocabulary) and the same gradients:

- `ours`: `item_jax.train.step.apply_update` as the train step runs it, jitted
  with the state donated: global gradient norm, clipping, AdamW (weight decay
  on matrices only), and a `lax.cond` that keeps the old state when the norm is
  not finite.
- `select`: the same update with the guard written as a `jnp.where` between
  the new and the old value of every array, as the step did before: kept here
  to show what the branch saves.
- `torch`: `clip_grad_norm_`, a finiteness check and `torch.optim.AdamW
  (fused=True)` on the torch reference model's parameters, as
  `item_jax.convert.torch_reference.train_step` runs them.

Before timing, one update from the same state must change every parameter
tensor the same way on all three sides (to --rtol of its largest change,
beyond the float32 rounding of the parameter). The output ends with `torch_over_ours_<config>:
<torch ms / ours ms>` (above 1: ours faster).
"""

import argparse
import os
import statistics
import time

import numpy as np

VOCAB_SIZE = 30522


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="small", choices=("tiny", "small", "base"))
  parser.add_argument("--rounds", type=int, default=8, help="turns per side")
  parser.add_argument("--steps", type=int, default=3, help="updates per turn")
  parser.add_argument("--rtol", type=float, default=1e-3)
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
  args = parser.parse_args()

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # Set before torch loads OpenMP (see torch_vs_jax.py).
  os.environ.setdefault("OMP_WAIT_POLICY", "passive")
  import jax
  import jax.numpy as jnp
  import optax
  import torch
  from item_jax.convert import flatten_params, torch_layout, torch_reference
  from item_jax.model import model_config
  from item_jax.train.optimizer import OptimizerConfig, make_optimizer
  from item_jax.train.step import apply_update, init_model

  torch.set_num_threads(args.torch_threads)
  config = model_config(args.config, vocab_size=VOCAB_SIZE, dropout_rate=0.0)
  # No warm-up: every update runs at the full rate.
  settings = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=100_000)
  optimizer = make_optimizer(settings)
  _, params = init_model(config, seed=0)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(
      lambda p: jnp.asarray(rng.normal(0.0, 1e-3, p.shape).astype(np.float32)), params)
  count = sum(p.size for p in jax.tree.leaves(params))
  print(f"{args.config}: {count / 1e6:.1f} M parameters; jax {jax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} CPU cores")

  def ours(params, opt_state, grads):
    finite = jnp.isfinite(optax.global_norm(grads))
    return apply_update(optimizer, grads, params, opt_state, finite)

  def select(params, opt_state, grads):
    finite = jnp.isfinite(optax.global_norm(grads))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state)

  jax_sides = {}
  for name, update in (("ours", ours), ("select", select)):
    state = jax.tree.map(jnp.copy, (params, optimizer.init(params)))
    jax_sides[name] = [jax.jit(update, donate_argnums=(0, 1)), state]

  model = torch_reference.ItemTorch(config)
  tensors, _ = torch_layout.to_torch(flatten_params(params), config)
  torch_grads, _ = torch_layout.to_torch(flatten_params(grads), config)
  model.load_state_dict({name: torch.from_numpy(value) for name, value in tensors.items()})
  for name, parameter in model.named_parameters():
    parameter.grad = torch.from_numpy(np.array(torch_grads[name]))
  torch_optimizer = torch_reference.adamw(model, settings, fused=True)

  def torch_update():
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip_norm)
    if torch.isfinite(norm):
      torch_optimizer.step()

  def jax_update(name):
    side = jax_sides[name]
    side[1] = side[0](*side[1], grads)
    jax.block_until_ready(side[1])

  # One update on each side from the same state must agree: the change each
  # made to every parameter, relative to that tensor's largest change.
  for name in jax_sides:
    jax_update(name)
  torch_update()
  before = tensors
  changes = {name: torch_layout.to_torch(flatten_params(side[1][0]), config)[0]
             for name, side in jax_sides.items()}
  changes["torch"] = {name: parameter.detach().numpy()
                      for name, parameter in model.named_parameters()}
  worst, where = 0.0, "-"
  for name, start in before.items():
    reference = changes["ours"][name] - start
    # Float32 rounding of the parameters themselves (LayerNorm scales are 1)
    # is not a difference in the update.
    scale = np.abs(reference).max() + 1e-30
    rounding = 2 * np.spacing(np.abs(start).max())
    for side in ("select", "torch"):
      error = np.abs(changes[side][name] - start - reference).max()
      diff = float(max(error - rounding, 0.0) / scale)
      if diff > worst:
        worst, where = diff, f"{side} {name}"
  print(f"first update: max rel. diff of the changes {worst:.1e} ({where}; "
        f"--rtol {args.rtol:g})")
  if not worst <= args.rtol:
    raise SystemExit(f"the updates differ by {worst:.1e} > --rtol {args.rtol:g}")

  times = {"ours": [], "select": [], "torch": []}
  for _ in range(args.rounds):
    for name in times:
      for _ in range(args.steps):
        start = time.perf_counter()
        if name == "torch":
          torch_update()
        else:
          jax_update(name)
        times[name].append(time.perf_counter() - start)
  median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
  for name, value in median.items():
    print(f"{name:7s} median {value:8.1f} ms (min {min(times[name]) * 1e3:.1f}) "
          f"of {len(times[name])}")
  print(f"select / ours: {median['select'] / median['ours']:.3f}")
  print(f"torch_over_ours_{args.config}: {median['torch'] / median['ours']:.3f}")


if __name__ == "__main__":
  main()
