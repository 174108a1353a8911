"""Training-step speed on CPU: item-jax against the PyTorch reference (eager, fp32).

  python benchmarks/torch_vs_jax.py --config tiny
  python benchmarks/torch_vs_jax.py --config small,base --steps 2 --rounds 3
  python benchmarks/torch_vs_jax.py --config tiny \
      --xla-flags=--xla_cpu_experimental_ynn_fusion_type=dot

Both sides train the same model (same weights, dropout off) on the same
synthetic batch with the five objectives; a step is forward, backward,
global-norm clipping and the AdamW update (weight decay on matrices only, the
same learning rate). The JAX side is benchmarks/train_step.py's jitted step,
which draws its masks inside the step. The torch side
(item_jax.convert.torch_reference: `item_losses`, `adamw`, `train_step`) runs
in a second process, so that neither framework's threads or allocator get in
the other's way, and trains every step on the masks item-jax drew for its
first step: the same shapes and work, less the masking itself (a few small
element-wise ops). Before timing, the first step's losses and gradient norm
must agree to --rtol.

Then --rounds turns of --steps JAX steps followed by --steps torch steps, so a
shared machine's changing load falls on both; each side's median over all its
timed steps counts. XLA uses every core, torch --torch-threads (default every
core) with OMP_WAIT_POLICY=passive unless the environment sets it: spinning
OpenMP threads made torch 10x slower here while other jobs shared the cores.
The output ends with one line per config, `torch_over_jax_<config>: <torch ms /
jax ms>` (above 1: item-jax faster), the last config's last.
"""

import argparse
import multiprocessing
import os
import statistics
import time
import traceback

import numpy as np

# configs/item_tiny.py's model and titles at train_step.py's tiny batch; BERT's
# vocabulary and 224-px images for the others.
CONFIG_DEFAULTS = {
    "tiny": dict(batch=64, image_size=64, patch_size=8, title_len=24, vocab_size=1000),
    "small": dict(batch=8, image_size=224, patch_size=16, title_len=40,
                  vocab_size=30522),
    "base": dict(batch=2, image_size=224, patch_size=16, title_len=40,
                 vocab_size=30522),
}
LEARNING_RATE = 1e-4
TORCH_ADAMW = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True),
               "fused": dict(fused=True)}


def _torch_trainer(setup: dict):
  """The torch reference as `setup` describes it: (check, step), where check()
  returns the losses and gradient norm without updating and step() trains."""
  import torch
  from item_jax.convert import torch_reference
  model = torch_reference.ItemTorch(setup["config"]).train()
  model.load_state_dict({name: torch.from_numpy(value)
                         for name, value in setup["tensors"].items()})
  optimizer = torch_reference.adamw(model, setup["optimizer"],
                                    **TORCH_ADAMW[setup["adamw"]])
  inputs = {name: torch.from_numpy(value) for name, value in
            torch_reference.loss_inputs(setup["masked"]).items()}
  learning_rates = iter(setup["learning_rates"])

  def check():
    total, losses = torch_reference.item_losses(
        model, inputs, setup["weights"], setup["normalize_patch_targets"])
    total.backward()
    # In float64: torch's float32 norm of the word embeddings' gradient is off
    # by 4e-4 (relative) at BERT's vocabulary.
    grad_norm = sum(parameter.grad.double().square().sum().item()
                    for parameter in model.parameters()) ** 0.5
    model.zero_grad(set_to_none=True)
    return {"loss": total.item(), "grad_norm": grad_norm,
            **{task: loss.item() for task, loss in losses.items()}}

  def step():
    torch_reference.train_step(
        model, optimizer, inputs, float(next(learning_rates)),
        setup["optimizer"].grad_clip_norm, setup["weights"],
        setup["normalize_patch_targets"])

  return check, step


def _torch_side(connection, threads: int):
  """The torch process: sets up on "setup" (replying with the first step's
  losses and gradient norm), times steps on "time"."""
  # Set before torch loads OpenMP; OMP_WAIT_POLICY=active restores spinning.
  os.environ.setdefault("OMP_WAIT_POLICY", "passive")
  import torch
  torch.set_num_threads(threads)
  connection.send(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
  step = None
  while True:
    request, payload = connection.recv()
    if request == "stop":
      return
    try:
      if request == "setup":
        check, step = _torch_trainer(payload)
        reply = check()
      elif request == "time":
        reply = []
        for _ in range(payload):
          start = time.perf_counter()
          step()
          reply.append(time.perf_counter() - start)
      else:
        raise ValueError(f"unknown request {request!r}")
    except Exception:  # pylint: disable=broad-except
      reply = RuntimeError(f"torch side failed:\n{traceback.format_exc()}")
    connection.send(reply)


class TorchSide:
  """The parent's handle on the torch process."""

  def __init__(self, threads: int):
    context = multiprocessing.get_context("spawn")
    self._connection, child = context.Pipe()
    self._process = context.Process(target=_torch_side, args=(child, threads),
                                    daemon=True)
    self._process.start()
    self.description = self._connection.recv()

  def ask(self, request: str, payload=None):
    self._connection.send((request, payload))
    reply = self._connection.recv()
    if isinstance(reply, Exception):
      raise reply
    return reply

  def close(self):
    self._connection.send(("stop", None))
    self._process.join()


def _describe(times) -> str:
  return (f"median {statistics.median(times) * 1e3:.1f} ms (min "
          f"{min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) of {len(times)}")


def run_config(name: str, args, torch_side: TorchSide) -> float:
  """Checks and times one config; returns torch / jax step time."""
  import jax
  import train_step as jax_bench  # benchmarks/, this script's folder
  from item_jax.convert import flatten_params, torch_layout
  from item_jax.model import model_config
  from item_jax.objectives import TASKS, ObjectiveConfig, example_keys, mask_batch
  from item_jax.train.optimizer import OptimizerConfig, learning_rate_schedule
  from item_jax.train.step import step_keys

  sizes = {key: getattr(args, key) or value
           for key, value in CONFIG_DEFAULTS[name].items()}
  config = model_config(name, vocab_size=sizes["vocab_size"],
                        image_size=sizes["image_size"],
                        patch_size=sizes["patch_size"], dropout_rate=0.0)
  objectives = ObjectiveConfig()
  tokens = jax_bench.synthetic_tokens(sizes["vocab_size"])
  # No warm-up: every step, the first too, updates at the full rate.
  optimizer = OptimizerConfig(learning_rate=LEARNING_RATE, warmup_steps=0,
                              total_steps=100_000)
  local_batch = jax_bench.synthetic_batch(sizes["batch"], sizes["title_len"],
                                          sizes["image_size"], sizes["vocab_size"])
  print(f"== {name}: {config.num_layers} layers x {config.hidden_size}, batch "
        f"{sizes['batch']}, image {sizes['image_size']} px (patch "
        f"{sizes['patch_size']}), title {sizes['title_len']}, vocab "
        f"{sizes['vocab_size']}, fp32; load average {os.getloadavg()[0]:.2f}")

  seed = 0
  step, state, batch = jax_bench.build_step(config, optimizer, objectives, tokens,
                                            local_batch, seed=seed)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  print(f"jax: compile {time.perf_counter() - start:.1f} s")
  # The masks the JAX step draws for step 0, for the torch side to train on.
  keys = example_keys(step_keys(seed, 0)[0], batch["index"])
  masked = jax.jit(mask_batch, static_argnums=(0, 3, 4))(
      config, batch, keys, objectives, tokens)
  tensors, _ = torch_layout.to_torch(flatten_params(state.params), config)
  total_steps = 1 + args.warmup + args.rounds * args.steps
  learning_rates = np.asarray(jax.vmap(learning_rate_schedule(optimizer))(
      np.arange(total_steps)))

  state, metrics = compiled(state, batch)
  jax_first = {key: float(value) for key, value in metrics.items()}
  torch_first = torch_side.ask("setup", dict(
      config=config, tensors=tensors, masked=jax.device_get(masked),
      optimizer=optimizer, learning_rates=learning_rates,
      weights={task: objectives.weight(task) for task in TASKS},
      normalize_patch_targets=objectives.normalize_patch_targets,
      adamw=args.torch_adamw))
  worst = 0.0
  print("first step        jax        torch      rel. diff")
  for key in ("loss", *(task for task in TASKS if objectives.weight(task) > 0),
              "grad_norm"):
    diff = abs(torch_first[key] - jax_first[key]) / abs(jax_first[key])
    worst = max(worst, diff)
    print(f"  {key:10s} {jax_first[key]:11.6f} {torch_first[key]:11.6f}   {diff:.1e}")
  print(f"first step: max rel. diff {worst:.1e} (--rtol {args.rtol:g})")
  if not worst <= args.rtol:
    raise SystemExit(f"{name}: the torch reference's first step differs from "
                     f"item-jax's by {worst:.1e} > --rtol {args.rtol:g}")

  state, _ = jax_bench.time_steps(compiled, state, batch, args.warmup)
  # Untimed on the torch side too: the first step, which its check did not take.
  torch_side.ask("time", 1 + args.warmup)
  jax_times, torch_times, turns = [], [], []
  for _ in range(args.rounds):
    state, times = jax_bench.time_steps(compiled, state, batch, args.steps)
    jax_times += times
    torch_times += torch_side.ask("time", args.steps)
    turns.append(f"{statistics.median(times) * 1e3:.0f}/"
                 f"{statistics.median(torch_times[-args.steps:]) * 1e3:.0f}")
  ratio = statistics.median(torch_times) / statistics.median(jax_times)
  print(f"jax   step: {_describe(jax_times)}")
  print(f"torch step: {_describe(torch_times)}")
  print(f"turns, jax/torch median ms: {', '.join(turns)}")
  print(f"torch / jax: {ratio:.3f}; load average {os.getloadavg()[0]:.2f}")
  return ratio


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", action="append",
                      help="tiny, small or base; repeated or comma-separated "
                      "(default tiny)")
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--image-size", type=int, default=None)
  parser.add_argument("--patch-size", type=int, default=None)
  parser.add_argument("--title-len", type=int, default=None)
  parser.add_argument("--vocab-size", type=int, default=None)
  parser.add_argument("--steps", type=int, default=5, help="steps per turn")
  parser.add_argument("--rounds", type=int, default=3, help="turns per side")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untimed steps per side after the first")
  parser.add_argument("--rtol", type=float, default=1e-4,
                      help="first-step losses must agree to this")
  parser.add_argument("--torch-adamw", default="fused", choices=sorted(TORCH_ADAMW),
                      help="torch.optim.AdamW's implementation")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                      help="torch's intra-op threads (default: every core)")
  parser.add_argument("--xla-flags", default="",
                      help="appended to XLA_FLAGS, e.g. "
                      "--xla_cpu_enable_fast_math=true")
  args = parser.parse_args()
  names = [name for value in args.config or ["tiny"] for name in value.split(",")
           if name]
  unknown = sorted(set(names) - set(CONFIG_DEFAULTS))
  if unknown:
    parser.error(f"unknown config(s) {unknown}: expected {sorted(CONFIG_DEFAULTS)}")

  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # jax is imported only now, with XLA_FLAGS set.
  import jax
  torch_side = TorchSide(args.torch_threads)
  print(f"{os.cpu_count()} CPU cores; jax {jax.__version__} on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), XLA_FLAGS="
        f"{os.environ['XLA_FLAGS']!r}; {torch_side.description}, AdamW "
        f"{args.torch_adamw}")
  try:
    ratios = [(name, run_config(name, args, torch_side)) for name in names]
  finally:
    torch_side.close()
  for name, ratio in ratios:
    print(f"torch_over_jax_{name}: {ratio:.3f}")


if __name__ == "__main__":
  main()
