"""`item-jax train`: the pre-training loop, read top to bottom.

Config → mesh → state (restored or created sharded) → compiled step → loop with
metrics at log steps, async checkpoints, preemption and divergence handling.
"""

import collections
import logging
import signal
import threading

import jax
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils

from item_jax.data.indexed import IndexedSource
from item_jax.data.tokenizer import load_tokenizer
from item_jax.objectives import TokenSpec
from item_jax.objectives.flops import training_flops_per_example
from item_jax.train import checkpoint as checkpoint_lib
from item_jax.train import image_stem
from item_jax.train import sharding
from item_jax.train import stem_cells
from item_jax.train.config import TrainSettings
from item_jax.train.optimizer import learning_rate_schedule, make_optimizer
from item_jax.train.step import make_train_step


# Steps the host may dispatch beyond the last one it has seen complete.
RUN_AHEAD = 2


class StopRequest:
  """Set by SIGTERM/SIGUSR1; agreed across processes at step boundaries."""

  SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def uninstall(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    logging.warning("received signal %d: saving a checkpoint at the next step", signum)
    self._event.set()

  def agreed(self) -> bool:
    """True on every process when any process was signalled."""
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray(local))
    return bool(np.any(flags))


class DivergedError(RuntimeError):
  pass


def _token_spec(settings: TrainSettings) -> TokenSpec:
  tokenizer = load_tokenizer(str(epath.Path(settings.config.data.dir)
                                 / settings.dataset["tokenizer"]))
  return TokenSpec(settings.model.vocab_size, tokenizer.mask_id,
                   tokenizer.special_ids)


def _log_compiled(compiled, settings: TrainSettings, batch: int):
  analytic = training_flops_per_example(
      settings.model, settings.config.data.max_title_len, settings.objectives,
      text_len=settings.text_len,
      stem_in_step=not settings.cached_stem_cells)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float((cost or {}).get("flops", 0.0))
  logging.info("step compiled: XLA counts %.3g FLOPs per step (all devices may "
               "count only their shard), analytic %.3g per step", xla_flops,
               analytic["total"] * batch)
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info("step memory per device: arguments %.1f MiB, outputs %.1f MiB, "
                 "temporaries %.1f MiB",
                 memory.argument_size_in_bytes / 2**20,
                 memory.output_size_in_bytes / 2**20,
                 memory.temp_size_in_bytes / 2**20)


def train(settings: TrainSettings, workdir: str, devices=None,
          evaluator=None) -> list[dict]:
  """Runs (or resumes) pre-training in `workdir`.

  Returns the metrics written at each log step ({"step": ..., name: value}).
  `devices` restricts the mesh to those devices (default: all). `evaluator`,
  when given, is called once as evaluator(settings, graphdef, param
  shardings, mesh, metric writer) and the result after every step as
  result(step, params) (e.g. `item_jax.eval.evaluate.PeriodicRetrieval`, which
  acts every config.eval_every_steps). SIGTERM and SIGUSR1 are caught from
  the start (a signal during restore or compilation stops the run after its
  first step, with a checkpoint), not left to their default action of killing
  the process.
  """
  stop = StopRequest().install()
  try:
    return _train(settings, workdir, devices, stop, evaluator)
  finally:
    stop.uninstall()


def _train(settings: TrainSettings, workdir: str, devices,
           stop: StopRequest, evaluator) -> list[dict]:
  config = settings.config
  workdir = epath.Path(workdir)
  is_lead = jax.process_index() == 0
  if is_lead:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh(settings.mesh_shape, devices)
  optimizer = make_optimizer(settings.optimizer)
  schedule = learning_rate_schedule(settings.optimizer)
  checkpointer = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", config.checkpoint_every_steps,
      config.keep_checkpoints)
  graphdef, state, state_shardings = None, None, None
  # Metrics of the steps since the last log step: a checkpoint carries them,
  # so a resumed run logs the windows an uninterrupted one does.
  pending = []
  latest = checkpointer.latest_step()
  if latest is None:
    graphdef, state, state_shardings = sharding.create_train_state(
        settings.model, optimizer, mesh, config.seed)
    # A convolutional image stem starts from its pretrained weights.
    state = state._replace(params=image_stem.with_pretrained_stem(
        state.params, settings.model, workdir, write=is_lead))
  else:
    graphdef, abstract_state, state_shardings = sharding.abstract_train_state(
        settings.model, optimizer, mesh, config.seed)
    state, meta = checkpointer.restore(checkpoint_lib.abstract_with_shardings(
        abstract_state, state_shardings), latest)
    if meta["global_batch_size"] != config.global_batch_size or \
        meta["seed"] != config.seed:
      logging.warning("resuming with global_batch_size/seed %s/%s instead of "
                      "%s/%s: the data order differs from the original run",
                      config.global_batch_size, config.seed,
                      meta["global_batch_size"], meta["seed"])
    pending = _unpack_window(meta.get("pending_metrics"))
  start_step = int(state.step)

  process_batch = config.global_batch_size // jax.process_count()
  cells = (stem_cells.load_or_compute(settings, workdir, graphdef, state.params)
           if settings.cached_stem_cells else None)
  source = IndexedSource(
      config.data.dir, config.data.split, global_batch_size=config.global_batch_size,
      seed=config.seed, image_size=settings.model.image_size,
      max_title_len=config.data.max_title_len, resize=config.data.resize,
      max_text_len=settings.text_len, cells=cells,
      process_index=jax.process_index(), process_count=jax.process_count())
  train_step = sharding.jit_train_step(
      make_train_step(graphdef, optimizer, settings.objectives,
                      _token_spec(settings), config.seed,
                      config.grad_accumulation_steps,
                      task_gradient_every=(config.log_every_steps
                                           if config.log_task_gradients else 0)),
      state_shardings, mesh)
  compiled = train_step.lower(
      state, source.abstract_global_batch(sharding.batch_sharding(mesh))).compile()
  _log_compiled(compiled, settings, config.global_batch_size)
  logging.info("global batch %d, %d per process, %d per device; mesh %s",
               config.global_batch_size, process_batch,
               config.global_batch_size // mesh.devices.size, settings.mesh_shape)

  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=not is_lead, asynchronous=True)
  hooks = [periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=writer,
      every_steps=config.log_every_steps)]
  if config.profile_start_step >= 0 and is_lead:
    hooks.append(periodic_actions.Profile(
        logdir=str(workdir), first_profile=config.profile_start_step,
        num_profile_steps=config.profile_num_steps))
  if evaluator is not None:
    evaluate = evaluator(settings, graphdef, state_shardings.params, mesh, writer)
  else:
    if config.eval_every_steps:
      logging.warning("config.eval_every_steps=%d, but this caller passed no "
                      "evaluator: no evaluation during training",
                      config.eval_every_steps)
    evaluate = lambda step, params: None
  history = []
  meta = lambda step: {"step": step, "seed": config.seed,
                       "global_batch_size": config.global_batch_size,
                       "next_example_index": step * config.global_batch_size}
  try:
    batches = prefetch_to_devices(source.batches(start_step), mesh)
    in_flight = collections.deque()
    for step in range(start_step + 1, config.total_steps + 1):
      state, metrics = compiled(state, next(batches))
      pending.append(metrics)
      # The host stays at most RUN_AHEAD steps ahead of the devices, not a
      # log interval: step N is dispatched, then step N-RUN_AHEAD's metrics
      # are waited for (read late, as maxtext does). So the progress hook's
      # rate and ETA are those of completed steps, and a stop signal is
      # agreed and saved within a step or two plus the save, whatever
      # log_every_steps is; one step stays queued behind the running one.
      in_flight.append(metrics)
      if len(in_flight) > RUN_AHEAD:
        jax.block_until_ready(in_flight.popleft())
      for hook in hooks:
        hook(step)
      evaluate(step, state.params)
      # A fresh run's first step is logged too: the baseline losses fall from.
      # Windows end at multiples of log_every_steps, resumed or not.
      if (step % config.log_every_steps == 0 or step == config.total_steps
          or step == 1):
        scalars = _write_metrics(writer, step, pending, schedule, source)
        history.append({"step": step, **scalars})
        pending = []
        if scalars["max_nonfinite_streak"] >= config.max_nonfinite_steps:
          raise DivergedError(
              f"{int(scalars['max_nonfinite_streak'])} consecutive steps "
              f"with a non-finite loss or gradient by step {step} (limit "
              f"config.max_nonfinite_steps={config.max_nonfinite_steps}); no "
              "update was applied on them and no such state was checkpointed")
      preempted = stop.agreed() or checkpointer.reached_preemption(step)
      force = preempted or step == config.total_steps
      step_meta = meta(step)
      if pending and (force or checkpointer.should_save(step)):
        step_meta["pending_metrics"] = _pack_window(pending)
      checkpointer.save(step, state, step_meta, force=force)
      if preempted:
        logging.warning("stopping at step %d after a stop signal; resume with "
                        "the same command", step)
        break
  finally:
    checkpointer.close()
    writer.flush()
    writer.close()
  return history


def prefetch_to_devices(local_batches, mesh, size: int = 2):
  """Global batches, with the next `size` already sent to the devices, so
  their host-to-device copies overlap the running step. Reading ahead moves
  no data position: batches are a function of the step, not of the iterator."""
  queue = collections.deque()
  for local_batch in local_batches:
    queue.append(sharding.global_batch(local_batch, mesh))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


TASK_GRADIENT_PREFIX = "grad_norm_"


def _pack_window(pending: list) -> dict:
  """The unlogged steps' metrics as JSON: {name: [value per step]}."""
  window = jax.device_get(pending)
  return {name: [float(m[name]) for m in window] for name in window[0]}


def _unpack_window(packed: dict | None) -> list:
  """`_pack_window`'s inverse, as float32 scalars like the step's outputs."""
  if not packed:
    return []
  names = list(packed)
  return [{name: np.float32(packed[name][i]) for name in names}
          for i in range(len(packed[names[0]]))]


def _write_metrics(writer, step: int, pending: list, schedule, source) -> dict:
  """Reads the window's device metrics (the only host sync) and writes them."""
  window = jax.device_get(pending)
  names = [name for name in window[0] if name != "nonfinite_streak"]
  scalars = {name: float(np.mean([m[name] for m in window])) for name in names
             if not name.startswith(TASK_GRADIENT_PREFIX)}
  # Per-task gradient norms are computed on log steps only: the window's last.
  task_norms = {name[len(TASK_GRADIENT_PREFIX):]: float(window[-1][name])
                for name in names if name.startswith(TASK_GRADIENT_PREFIX)}
  total_norm = sum(task_norms.values())
  if total_norm > 0:  # 0: a window that ends off the log grid (the last step)
    for task, norm in task_norms.items():
      scalars[f"{TASK_GRADIENT_PREFIX}{task}"] = norm
      scalars[f"grad_share_{task}"] = norm / total_norm
  scalars["max_nonfinite_streak"] = float(max(m["nonfinite_streak"] for m in window))
  scalars["nonfinite_steps"] = float(sum(m["nonfinite"] for m in window))
  scalars.pop("nonfinite")
  scalars["learning_rate"] = float(schedule(step - 1))
  scalars["skipped_records"] = float(source.skipped_records())
  if scalars["nonfinite_steps"]:
    logging.warning("%d of the last %d steps had a non-finite loss or gradient "
                    "and were not applied", scalars["nonfinite_steps"], len(window))
  writer.write_scalars(step, {f"train/{name}": value
                              for name, value in scalars.items()})
  return scalars
