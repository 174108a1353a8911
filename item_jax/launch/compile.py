"""`item-jax compile`: the real train step compiled ahead of time for a target
TPU slice (libtpu's compile-only devices) or N simulated CPU devices, with its
per-device memory, FLOPs and the collectives XLA inserted.

Nothing is allocated: the state and the batch are shapes, the mesh is built
from the target's devices, and the step is the one `item-jax train` runs.
"""

import dataclasses
import importlib.util
import os
import re
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

from item_jax.data import tokenizer
from item_jax.data.indexed import abstract_global_batch
from item_jax.errors import UserError
from item_jax.objectives import TokenSpec
from item_jax.objectives.flops import training_flops_per_example
from item_jax.train import sharding
from item_jax.train.config import TrainSettings, validate_without_data
from item_jax.train.optimizer import make_optimizer
from item_jax.train.step import make_train_step

GIB = 2**30

# Per generation: libtpu's topology prefix, TensorCores per chip (the number in
# a slice's name counts cores on v4/v5p, chips on v5e/v6e), HBM per chip, the
# chip config, and the accelerator type's prefix in gcloud.
_GENERATIONS = {
    "v4": ("v4", 2, 32, "megacore", "v4"),
    "v5p": ("v5", 2, 95, "megacore", "v5p"),
    "v5e": ("v5e", 1, 16, "default", "v5litepod"),
    "v6e": ("v6e", 1, 32, "default", "v6e"),
}
_ALIASES = {"v5litepod": "v5e"}
# Chips -> the slice's shape (3-D torus on v4/v5p, 2-D on v5e/v6e).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4),
              64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8),
              1024: (8, 8, 16), 2048: (8, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8),
              64: (8, 8), 128: (8, 16), 256: (16, 16)}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory", "out of memory")


class DoesNotFitError(RuntimeError):
  """The step needs more memory per device than the target has."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the step is compiled for: a TPU slice, or N simulated CPU devices."""

  name: str
  num_devices: int
  hbm_bytes: int | None             # per device; None: not checked
  topology_name: str | None = None  # libtpu's, e.g. "v5:4x4x8"; None for CPU
  chip_config_name: str | None = None
  chips_per_host_bounds: tuple | None = None
  accelerator_type: str | None = None  # gcloud's, e.g. "v5litepod-256"


def parse_target(name: str, hbm_gib: float | None = None) -> Target:
  """`v4-32`, `v5e-256` (or `v5litepod-256`), `v5p-256`, `v6e-64`, or `cpu-N`."""
  generation, _, size = name.partition("-")
  if not size.isdigit():
    raise UserError(f"--topology {name!r}: expected e.g. v4-32, v5e-256, "
                    "v5p-256, v6e-64 or cpu-8")
  size = int(size)
  hbm = None if hbm_gib is None else int(hbm_gib * GIB)
  if generation == "cpu":
    return Target(name, size, hbm)
  generation = _ALIASES.get(generation, generation)
  if generation not in _GENERATIONS:
    raise UserError(f"--topology {name!r}: unknown TPU generation; known: "
                    f"{sorted(_GENERATIONS)} or cpu-N")
  prefix, cores_per_chip, chip_gib, chip_config, gcloud_prefix = _GENERATIONS[generation]
  chips = size // cores_per_chip
  shapes = _SHAPES_3D if cores_per_chip == 2 else _SHAPES_2D
  if size % cores_per_chip or chips not in shapes:
    sizes = sorted(count * cores_per_chip for count in shapes)
    raise UserError(f"--topology {name!r}: {generation} slices known here: "
                    f"{', '.join(f'{generation}-{s}' for s in sizes)}")
  shape = shapes[chips]
  if len(shape) == 2:
    # v5e/v6e hosts hold 4 chips (2x2) in a multi-host slice, up to 8 alone.
    host = (min(shape[0], 2), shape[1] if chips <= 8 else min(shape[1], 2), 1)
  else:
    host = (min(shape[0], 2), min(shape[1], 2), 1)
  return Target(name, chips, hbm if hbm is not None else chip_gib * GIB,
                topology_name=f"{prefix}:{'x'.join(map(str, shape))}",
                chip_config_name=chip_config, chips_per_host_bounds=host,
                accelerator_type=f"{gcloud_prefix}-{size}")


def target_devices(target: Target) -> list:
  """The target's devices: libtpu's compile-only TPU devices, or CPU devices."""
  if target.topology_name is None:
    devices = jax.devices("cpu")
    if len(devices) < target.num_devices:
      raise UserError(
          f"--topology {target.name}: JAX has {len(devices)} CPU devices; set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices} "
          "before JAX starts (`item-jax compile` does so itself)")
    return devices[:target.num_devices]
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(
        f"--topology {target.name} needs libtpu to compile for TPUs: "
        "pip install 'item-jax[compile]' (or compile for N simulated CPU "
        "devices with --topology cpu-N --hbm-gib G)")
  # libtpu probes the machine it runs on; say what it is so that it does not
  # look for a TPU host's metadata (only the topology below matters). Nothing
  # opens a chip, so compiles may run side by side without libtpu's lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  from jax.experimental.topologies import get_topology_desc
  topology = get_topology_desc(
      platform="tpu", topology_name=target.topology_name,
      chip_config_name=target.chip_config_name,
      chips_per_host_bounds=target.chips_per_host_bounds, num_slices=1)
  return list(topology.devices)


def simulate_cpu_devices(topology: str) -> None:
  """For `cpu-N`: ask XLA for N host devices; call before JAX starts."""
  generation, _, size = topology.partition("-")
  if generation == "cpu" and size.isdigit() and \
      "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={size}").strip()


def _bytes_per_device(abstract_tree, shardings) -> int:
  total = 0
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract_tree),
                                 jax.tree.leaves(shardings)):
    shard = leaf_sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def count_collectives(hlo_text: str) -> dict:
  """{kind: number of ops} of the collectives in compiled HLO text (an async
  pair, `-start` and `-done`, counts once)."""
  counts = {}
  for kind in _COLLECTIVES:
    pattern = rf"=\s.*?\s{re.escape(kind)}(-start)?\("
    found = len(re.findall(pattern, hlo_text))
    if found:
      counts[kind] = found
  return counts


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost or {}


def compile_train_step(config: ml_collections.ConfigDict, target: Target,
                       vocab_size: int = 32000) -> dict:
  """Compiles the train step of `config` for `target`; returns the report.

  Raises DoesNotFitError when XLA runs out of the device's memory while
  compiling or the compiled step needs more than `target.hbm_bytes`.
  """
  devices = target_devices(target)
  hosts = len({device.process_index for device in devices})
  settings: TrainSettings = validate_without_data(config, vocab_size, len(devices),
                                                  process_count=hosts)
  shape = tuple(settings.mesh_shape[axis] for axis in sharding.MESH_AXES)
  # The topology-aware layout that training's make_mesh(shape) builds from
  # all devices of the slice.
  try:
    ordered = list(mesh_utils.create_device_mesh(shape, devices).flat)
  except ValueError as error:  # a mesh shape the slice's torus cannot hold
    raise UserError(f"config.mesh={settings.mesh_shape} does not map onto "
                    f"{target.name}'s devices: {error}") from error
  mesh = sharding.make_mesh(settings.mesh_shape, ordered)
  optimizer = make_optimizer(settings.optimizer)
  graphdef, abstract_state, state_shardings = sharding.abstract_train_state(
      settings.model, optimizer, mesh, config.seed)
  tokens = TokenSpec(settings.model.vocab_size, tokenizer.MASK_ID,
                     (tokenizer.PAD_ID, tokenizer.UNK_ID, tokenizer.CLS_ID,
                      tokenizer.SEP_ID, tokenizer.MASK_ID))
  step = sharding.jit_train_step(
      make_train_step(graphdef, optimizer, settings.objectives, tokens,
                      config.seed, config.grad_accumulation_steps),
      state_shardings, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  cells_shape = ((settings.model.num_patches, settings.model.image_token_input_dim)
                 if settings.cached_stem_cells else None)
  batch = abstract_global_batch(config.global_batch_size, settings.model.image_size,
                                config.data.max_title_len, batch_sharding,
                                max_text_len=settings.text_len,
                                cells_shape=cells_shape)

  started = time.perf_counter()
  try:
    compiled = step.lower(abstract_state, batch).compile()
  except Exception as error:  # XLA reports running out of memory as an error
    if any(marker in str(error) for marker in _OUT_OF_MEMORY):
      raise DoesNotFitError(
          f"{target.name}: the step does not fit in device memory "
          f"(mesh {settings.mesh_shape}, global batch {config.global_batch_size})."
          f" XLA said: {str(error).strip()[:2000]}\n{_advice(settings)}") from None
    raise
  seconds = time.perf_counter() - started

  memory = compiled.memory_analysis()
  cost = _cost(compiled)
  params = abstract_state.params
  report = {
      "target": target.name,
      "topology": target.topology_name or f"{len(devices)} simulated CPU devices",
      "compiled_for": "tpu (libtpu, compile-only devices)"
                      if target.topology_name else "cpu (simulated devices)",
      "devices": len(devices), "hosts": hosts,
      "mesh": settings.mesh_shape, "model": config.model.size,
      "dtype": settings.model.dtype,
      "parameters": int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(params))),
      "global_batch": int(config.global_batch_size),
      "batch_per_device": int(config.global_batch_size) // (
          settings.mesh_shape["data"] * settings.mesh_shape["fsdp"]),
      "grad_accumulation_steps": int(config.grad_accumulation_steps),
      "compile_seconds": round(seconds, 1),
      "memory_per_device": {
          "weights": _bytes_per_device(params, state_shardings.params),
          "optimizer_state": _bytes_per_device(abstract_state.opt_state,
                                               state_shardings.opt_state),
          "batch": _bytes_per_device(batch, {k: batch_sharding for k in batch}),
          "arguments": int(memory.argument_size_in_bytes),
          "outputs": int(memory.output_size_in_bytes),
          "aliased": int(memory.alias_size_in_bytes),
          "temporaries": int(memory.temp_size_in_bytes),
          "code": int(memory.generated_code_size_in_bytes),
      },
      "hbm_per_device": target.hbm_bytes,
      "flops_per_device_xla": float(cost.get("flops", 0.0)),
      "flops_per_step_analytic": float(training_flops_per_example(
          settings.model, config.data.max_title_len, settings.objectives,
          text_len=settings.text_len,
          stem_in_step=not settings.cached_stem_cells)["total"]
          * config.global_batch_size),
      "collectives": count_collectives(compiled.as_text()),
  }
  used = report["memory_per_device"]
  used["peak"] = (used["arguments"] + used["outputs"] - used["aliased"]
                  + used["temporaries"] + used["code"])
  report["fits"] = target.hbm_bytes is None or used["peak"] <= target.hbm_bytes
  if not report["fits"]:
    raise DoesNotFitError(
        f"{target.name}: the step needs {used['peak'] / GIB:.2f} GiB per device, "
        f"the device has {target.hbm_bytes / GIB:.2f} GiB.\n"
        f"{format_report(report)}\n{_advice(settings)}")
  return report


def _advice(settings: TrainSettings) -> str:
  options = []
  if settings.mesh_shape["fsdp"] == 1:
    options.append("sharding parameters and optimizer state (--config.mesh.fsdp=N)")
  options.append("a smaller --config.global_batch_size or more "
                 "--config.grad_accumulation_steps")
  if settings.model.dtype == "float32":
    options.append("--config.model.dtype=bfloat16")
  return "Try " + ", or ".join(options) + "."


def format_report(report: dict) -> str:
  memory = report["memory_per_device"]
  gib = lambda value: f"{value / GIB:8.3f} GiB"
  hbm = report["hbm_per_device"]
  lines = [
      f"target {report['target']} ({report['topology']}; compiled for "
      f"{report['compiled_for']}): {report['devices']} devices on "
      f"{report['hosts']} host{'s' if report['hosts'] > 1 else ''}",
      f"model {report['model']} ({report['parameters'] / 1e6:.1f}M parameters, "
      f"{report['dtype']}), mesh {report['mesh']}, global batch "
      f"{report['global_batch']} ({report['batch_per_device']} per device, "
      f"{report['grad_accumulation_steps']} accumulation steps); compiled in "
      f"{report['compile_seconds']} s",
      "memory per device:",
      f"  weights          {gib(memory['weights'])}",
      f"  optimizer state  {gib(memory['optimizer_state'])}",
      f"  batch            {gib(memory['batch'])}",
      f"  arguments (XLA)  {gib(memory['arguments'])}  (weights + optimizer "
      "state + batch)",
      f"  temporaries      {gib(memory['temporaries'])}  (activations, "
      "gradients, workspace)",
      f"  outputs          {gib(memory['outputs'])}  ({gib(memory['aliased']).strip()}"
      " reuse the donated state)",
      f"  peak             {gib(memory['peak'])}  of "
      + (f"{hbm / GIB:.2f} GiB HBM: {'fits' if report['fits'] else 'DOES NOT FIT'}"
         if hbm else "(no memory limit given)"),
      f"FLOPs per step: XLA {report['flops_per_device_xla']:.4g} per device "
      f"(x {report['devices']} = {report['flops_per_device_xla'] * report['devices']:.4g}),"
      f" analytic {report['flops_per_step_analytic']:.4g}",
      "collectives: " + (", ".join(f"{kind} x{count}" for kind, count
                                    in report["collectives"].items()) or "none"),
  ]
  return "\n".join(lines)
