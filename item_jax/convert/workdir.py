"""Work directories as conversion writes and reads them.

A converted model is saved the way `item-jax train` resumes: an orbax
TrainState at step 0 with fresh optimizer state in WORKDIR/checkpoints, the
train config (defaults + the model's every field) in WORKDIR/config.json, and
the tokenizer beside them. Reading restores a workdir's state onto any mesh;
`reshard` saves it again for another mesh.
"""

import dataclasses
import json
import logging

import jax
import ml_collections
from etils import epath

from item_jax.convert import tensors as tensors_lib
from item_jax.errors import MissingInputError, OutputExistsError, UserError
from item_jax.model import ModelConfig
from item_jax.train import checkpoint as checkpoint_lib
from item_jax.train import sharding
from item_jax.train.config import base_config, validate_without_data
from item_jax.train.optimizer import make_optimizer
from item_jax.train.step import init_train_state

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
_ONE_DEVICE_MESH = {"data": 1, "fsdp": 1, "model": 1}


def _merge(config: ml_collections.ConfigDict, values: dict) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      config[key] = value


def workdir_config(workdir) -> ml_collections.ConfigDict:
  """The train config in WORKDIR/config.json, laid over the defaults (what
  configs/item_converted.py hands to `item-jax train`)."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise MissingInputError(f"{path} does not exist: not an item-jax work directory")
  config = base_config()
  _merge(config, json.loads(path.read_text()))
  return config


def config_for_model(model: ModelConfig, config: ml_collections.ConfigDict | None = None):
  """A train config (default: the defaults) whose model section gives `model`."""
  config = base_config() if config is None else config.copy_and_resolve_references()
  for field, value in dataclasses.asdict(model).items():
    config.model[field] = value
  if config.data.max_title_len + 1 > model.max_title_positions:
    logging.info("data.max_title_len %d -> %d: the model has %d title positions "
                 "([CLS] takes one)", config.data.max_title_len,
                 model.max_title_positions - 1, model.max_title_positions)
    config.data.max_title_len = model.max_title_positions - 1
  return config


def _settings(config, vocab_size: int, mesh_shape: dict, num_devices: int):
  """TrainSettings of `config` on a mesh of `mesh_shape` (axes not named: 1)."""
  config = config.copy_and_resolve_references()
  _merge(config.mesh, {**_ONE_DEVICE_MESH, **mesh_shape})
  return validate_without_data(config, vocab_size, num_devices)


def save_workdir(workdir, model: ModelConfig, params: dict, *,
                 config: ml_collections.ConfigDict | None = None, tokenizer=None,
                 source: str = "", replace_initial: bool = False) -> epath.Path:
  """Saves complete `params` as step 0 of a fresh pre-training run in `workdir`.

  `config` supplies the training settings (optimizer, seed, batch); its model
  section is set to `model`. `replace_initial` lets a workdir whose only
  checkpoint is step 0 be rewritten (adding an image side to a converted text
  model); a workdir with training progress is never touched.
  """
  workdir = epath.Path(workdir)
  config = config_for_model(model, config)
  checkpointer = checkpoint_lib.Checkpointer(workdir / CHECKPOINTS, every_steps=1,
                                             keep=1, async_saves=False)
  try:
    steps = checkpointer.all_steps()
    if steps and not (replace_initial and steps == [0]):
      raise OutputExistsError(f"{workdir} already holds checkpoints {steps}: convert "
                              "into a new work directory")
    settings = _settings(config, model.vocab_size, _ONE_DEVICE_MESH, 1)
    if settings.model != model:
      raise UserError(f"the train config's model {settings.model} differs from "
                      f"the converted {model}")
    mesh = sharding.make_mesh(_ONE_DEVICE_MESH, jax.devices()[:1])
    optimizer = make_optimizer(settings.optimizer)
    _, abstract_state, shardings = sharding.abstract_train_state(
        model, optimizer, mesh, int(config.seed))
    state_params = jax.device_put(
        tensors_lib.unflatten_params(params, model), shardings.params)
    state = jax.jit(lambda p: init_train_state(p, optimizer),
                    out_shardings=shardings)(state_params)
    if steps:
      checkpointer.manager.delete(0)
    checkpointer.save(0, state, {
        "step": 0, "seed": int(config.seed),
        "global_batch_size": int(config.global_batch_size),
        "next_example_index": 0, "converted_from": source}, force=True)
  finally:
    checkpointer.close()
  if tokenizer is not None:
    tokenizer.save(workdir)
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
  logging.info("conversion: saved %s as step 0 of %s", source or "the model", workdir)
  return workdir


@dataclasses.dataclass
class Restored:
  settings: object      # TrainSettings of the workdir's config on this mesh
  state: object         # TrainState, sharded over `mesh`
  meta: dict
  step: int
  mesh: object
  shardings: object


def restore_workdir(workdir, step: int | None = None, mesh_shape: dict | None = None,
                    devices=None) -> Restored:
  """A workdir's TrainState restored onto `mesh_shape` (axes not named: 1)
  over `devices` (default: one device), whatever mesh saved it."""
  workdir = epath.Path(workdir)
  config = workdir_config(workdir)
  devices = list(devices) if devices is not None else jax.devices()[:1]
  mesh_shape = _ONE_DEVICE_MESH if mesh_shape is None else mesh_shape
  checkpointer = checkpoint_lib.Checkpointer(workdir / CHECKPOINTS, every_steps=1,
                                             keep=1_000_000)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise MissingInputError(f"no checkpoint in {workdir / CHECKPOINTS}")
    vocab_size = checkpointer.saved_shapes(step)["params.embeddings.word_embeddings"][0]
    settings = _settings(config, vocab_size, mesh_shape, len(devices))
    mesh = sharding.make_mesh(settings.mesh_shape, devices)
    _, abstract_state, shardings = sharding.abstract_train_state(
        settings.model, make_optimizer(settings.optimizer), mesh, int(config.seed))
    state, meta = checkpointer.restore(
        checkpoint_lib.abstract_with_shardings(abstract_state, shardings), step)
  finally:
    checkpointer.close()
  return Restored(settings, state, meta, step, mesh, shardings)


def workdir_params(workdir, step: int | None = None):
  """(ModelConfig, {name: numpy array}, step) of a workdir's checkpoint."""
  restored = restore_workdir(workdir, step)
  return (restored.settings.model, tensors_lib.flatten_params(restored.state.params),
          restored.step)


def reshard(workdir, output, mesh_shape: dict, devices=None,
            step: int | None = None) -> Restored:
  """Restores `workdir`'s checkpoint onto a (data, fsdp, model) mesh (axes
  not named: 1) over `devices` (default: all) and saves it, same step and
  meta, in `output`."""
  if epath.Path(output).resolve() == epath.Path(workdir).resolve():
    raise UserError("reshard writes a new work directory: --output must differ")
  devices = list(devices) if devices is not None else jax.devices()
  restored = restore_workdir(workdir, step, mesh_shape, devices)
  output = epath.Path(output)
  checkpointer = checkpoint_lib.Checkpointer(output / CHECKPOINTS, every_steps=1,
                                             keep=1, async_saves=False)
  try:
    if checkpointer.all_steps():
      raise OutputExistsError(f"{output} already holds checkpoints")
    checkpointer.save(restored.step, restored.state, restored.meta, force=True)
  finally:
    checkpointer.close()
  config = workdir_config(workdir)
  _merge(config.mesh, restored.settings.mesh_shape)
  (output / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
  for tokenizer_file in ("tokenizer.json", "tokenizer.model"):
    if (epath.Path(workdir) / tokenizer_file).exists():
      (output / tokenizer_file).write_bytes(
          (epath.Path(workdir) / tokenizer_file).read_bytes())
  logging.info("reshard: step %d of %s saved for mesh %s over %d devices in %s",
               restored.step, workdir, restored.settings.mesh_shape, len(devices), output)
  return restored
