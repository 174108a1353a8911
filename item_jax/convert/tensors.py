"""Tensor files and flat parameter dicts: reading outside checkpoints safely,
writing safetensors, and moving between `nnx.State` and {dotted name: array}.

Loading never unpickles untrusted data: safetensors is read first; a PyTorch
`.bin`/`.pt` only through `torch.load(weights_only=True)` (torch >= 2.6);
anything else is refused.
"""

import json
import logging
import pickle

import jax
import numpy as np
from etils import epath
from flax import nnx

from item_jax.errors import MissingInputError, UserError
from item_jax.model import ItemModel, ModelConfig

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_MIN_TORCH = (2, 6)


class UnsafeCheckpointError(UserError):
  """A file that could run code when loaded, or one of an unknown format."""


def read_tensors(path) -> dict[str, np.ndarray]:
  """{name: numpy array} from a .safetensors file (or a sharded checkpoint's
  .safetensors.index.json), or a torch state dict read with weights_only."""
  path = epath.Path(path)
  if path.name.endswith(SAFETENSORS_SUFFIX + ".index.json"):
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(read_tensors(path.parent / shard))
    return tensors
  if path.suffix == SAFETENSORS_SUFFIX:
    return _read_safetensors(path)
  if path.suffix in TORCH_SUFFIXES:
    return _read_torch(path)
  raise UnsafeCheckpointError(
      f"refusing to read {path}: only .safetensors, and PyTorch {TORCH_SUFFIXES} "
      "through torch.load(weights_only=True), are read (other pickles can run "
      "code when loaded)")


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  tensors = {}
  with safe_open(str(path), framework="np") as file:
    for name in file.keys():
      try:
        tensors[name] = file.get_tensor(name)
      except TypeError:
        # numpy has no bfloat16: read that tensor through JAX instead.
        with safe_open(str(path), framework="flax") as flax_file:
          tensors[name] = np.asarray(flax_file.get_tensor(name), np.float32)
  return tensors


def _read_torch(path: epath.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as error:
    raise UnsafeCheckpointError(
        f"{path} is a PyTorch file: reading it safely needs torch >= 2.6 "
        "(pip install 'item-jax[torch]'), or convert it to safetensors") from error
  version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
  if version < _MIN_TORCH:
    raise UnsafeCheckpointError(
        f"{path}: torch {torch.__version__} cannot refuse code in pickles "
        "reliably; torch >= 2.6 is needed to read .bin files")
  try:
    state = torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    raise UnsafeCheckpointError(
        f"refusing {path}: torch.load(weights_only=True) found more than "
        f"tensors in it (a pickle that could run code): {error}") from None
  if not isinstance(state, dict) or not all(
      isinstance(value, torch.Tensor) for value in state.values()):
    raise UnsafeCheckpointError(f"{path} is not a state dict of tensors")
  return {name: (value.float() if value.dtype == torch.bfloat16 else value).numpy()
          for name, value in state.items()}


def write_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict) -> None:
  from safetensors.numpy import save_file
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()},
            str(path), metadata=metadata)


def find_weights(directory) -> epath.Path:
  """A checkpoint folder's weights file: safetensors first, then a torch .bin."""
  directory = epath.Path(directory)
  for name in ("model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin"):
    if (directory / name).exists():
      return directory / name
  raise MissingInputError(f"{directory} has no model.safetensors or pytorch_model.bin")


# -- item-jax parameters as flat dicts ------------------------------------------

def _dotted(path) -> str:
  return ".".join(str(part) for part in path)


def flatten_params(params: nnx.State) -> dict[str, np.ndarray]:
  """nnx.State of parameters -> {"layers.0.attention.query.kernel": array}."""
  return {_dotted(path): np.asarray(jax.device_get(variable.get_value()))
          for path, variable in nnx.to_flat_state(params)}


def abstract_params(config: ModelConfig) -> nnx.State:
  """The model's parameters as ShapeDtypeStructs (allocates nothing)."""
  model = nnx.eval_shape(lambda: ItemModel(config, rngs=nnx.Rngs(params=0)))
  return nnx.state(model, nnx.Param)


def param_shapes(config: ModelConfig) -> dict[str, tuple]:
  return {_dotted(path): tuple(variable.shape)
          for path, variable in nnx.to_flat_state(abstract_params(config))}


def unflatten_params(flat: dict[str, np.ndarray], config: ModelConfig) -> nnx.State:
  """{dotted name: array} -> nnx.State shaped like the model's parameters."""
  abstract = nnx.to_flat_state(abstract_params(config))
  names = {_dotted(path) for path, _ in abstract}
  if names != set(flat):
    raise ValueError(f"parameters differ from the model's: missing "
                     f"{sorted(names - set(flat))[:5]}, extra {sorted(set(flat) - names)[:5]}")
  return nnx.from_flat_state([(path, variable.replace(flat[_dotted(path)]))
                              for path, variable in abstract])


def init_params(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
  """A freshly initialised model's parameters, as training would start them."""
  state = jax.jit(lambda: nnx.state(
      ItemModel(config, rngs=nnx.Rngs(params=seed)), nnx.Param))()
  return flatten_params(state)


def complete_params(converted: dict[str, np.ndarray], config: ModelConfig,
                    seed: int) -> dict[str, np.ndarray]:
  """`converted` with every parameter it lacks freshly initialised."""
  missing = set(param_shapes(config)) - set(converted)
  if not missing:
    return dict(converted)
  logging.info("conversion: %d parameters freshly initialised (seed %d)",
               len(missing), seed)
  fresh = init_params(config, seed)
  return {name: converted.get(name, fresh[name]) for name in fresh}


def model_from_params(flat: dict[str, np.ndarray], config: ModelConfig) -> ItemModel:
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: ItemModel(config, rngs=nnx.Rngs(params=0))))
  return nnx.merge(graphdef, unflatten_params(flat, config))
