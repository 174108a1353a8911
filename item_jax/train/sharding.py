"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry `logical_axes` metadata (see item_jax.model.layers); the rules
below turn them into PartitionSpecs. Data parallel is the default (fsdp=1,
model=1 leaves parameters replicated); a mesh with fsdp > 1 shards parameters
and optimizer state over their `embed` dimension, model > 1 shards heads, MLP
and vocabulary: the same code, another config. Activations are pinned by
their own logical axes (`ACTIVATION_RULES`) while the step is traced.
"""

import contextlib
import math

import jax
import jax.experimental.mesh_utils
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from item_jax.model import ItemModel, ModelConfig
from item_jax.model.layers import activation_sharding
from item_jax.train.step import init_train_state

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None: replicated along that dimension).
LOGICAL_AXIS_RULES = {
    "embed": "fsdp",
    "heads": "model",
    "mlp": "model",
    "vocab": "model",
    "embed_out": None,
    "norm": None,
    "position": None,
    "type": None,
    "patch": None,
    "classes": None,
    "scalar": None,
    # A convolutional image stem (3.5 M values at most): replicated.
    "conv": None,
    "conv_in": None,
    "conv_out": None,
}


# Activations' logical axes -> mesh axes: examples stay split over the batch
# axes at every block boundary (so FSDP all-gathers weights rather than
# moving activations), heads and MLP units over `model`.
ACTIVATION_RULES = {
    "activation_batch": BATCH_AXES,
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "model",
    "activation_mlp": "model",
}


def make_mesh(mesh_shape: dict, devices=None) -> Mesh:
  """A (data, fsdp, model) mesh; with all devices, laid out for the topology."""
  shape = tuple(mesh_shape[axis] for axis in MESH_AXES)
  if devices is None:
    devices = jax.devices()
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  else:
    if int(np.prod(shape)) != len(devices):
      raise ValueError(f"mesh {mesh_shape} needs {int(np.prod(shape))} devices, "
                       f"{len(devices)} given")
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes, shape, mesh: Mesh,
                    rules: dict = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """A PartitionSpec for one array; a dimension its mesh axes do not divide
  (e.g. the 2 ITM classes) or a None name stays replicated."""
  spec = []
  for name, size in zip(logical_axes, shape):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule")
    mesh_axes = rules[name] if name is not None else None
    axes = (mesh_axes if isinstance(mesh_axes, tuple)
            else () if mesh_axes is None else (mesh_axes,))
    devices = math.prod(mesh.shape[axis] for axis in axes)
    spec.append(mesh_axes if devices > 1 and size % devices == 0 else None)
  return PartitionSpec(*spec)


def activation_shardings(mesh: Mesh):
  """The context in which a traced function's activations follow
  ACTIVATION_RULES on `mesh` (see item_jax.model.layers.constrain)."""
  return activation_sharding(lambda logical_axes, shape: NamedSharding(
      mesh, logical_to_spec(logical_axes, shape, mesh, ACTIVATION_RULES)))


def tree_shardings(abstract_tree, mesh: Mesh):
  """NamedShardings for any tree of parameters or optimizer state.

  Variables with `logical_axes` (parameters, and the Adam moments that mirror
  them) follow the rules; every other leaf (step counters) is replicated.
  """
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      axes = leaf.get_metadata().get("logical_axes")
      spec = (PartitionSpec() if axes is None
              else logical_to_spec(axes, leaf.shape, mesh))
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, abstract_tree,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(config: ModelConfig, seed: int):
  """(graphdef, abstract params) without allocating anything."""
  model = nnx.eval_shape(lambda: ItemModel(config, rngs=nnx.Rngs(params=seed)))
  return nnx.split(model)


def _state_initializer(config: ModelConfig, optimizer: optax.GradientTransformation,
                       seed: int):
  def init():
    params = nnx.state(ItemModel(config, rngs=nnx.Rngs(params=seed)), nnx.Param)
    return init_train_state(params, optimizer)
  return init


def abstract_train_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                         mesh: Mesh, seed: int):
  """(graphdef, abstract state, state shardings), allocating nothing."""
  graphdef, _ = abstract_model(config, seed)
  abstract_state = jax.eval_shape(_state_initializer(config, optimizer, seed))
  return graphdef, abstract_state, tree_shardings(abstract_state, mesh)


@contextlib.contextmanager
def _threefry_kernel_on_gpu():
  """Lowers threefry to JAX's hand-written kernel on GPU while in the block.

  Each parameter draws its own threefry bits, and on GPU JAX lowers every draw
  to the fully unrolled hash, which XLA inlines: those hundreds of kernels kept
  the init of `base` compiling for over 3 minutes (H200, jax 0.11.2). The
  kernel computes the same bits and compiles once. Only the init uses it; the
  train step's masks and dropout keep the default lowering. Elsewhere (CPU,
  TPU) this changes nothing.
  """
  option = "jax_threefry_gpu_kernel_lowering"
  previous = getattr(jax.config, option, None)
  if previous is None:
    yield
    return
  jax.config.update(option, True)
  try:
    yield
  finally:
    jax.config.update(option, previous)


def create_train_state(config: ModelConfig, optimizer: optax.GradientTransformation,
                       mesh: Mesh, seed: int):
  """(graphdef, state, state shardings): the state is created already sharded.

  Shapes come from `jax.eval_shape`; `jit(init, out_shardings=...)` then
  materialises each shard on its device, so no host holds the whole model.
  """
  graphdef, _, shardings = abstract_train_state(config, optimizer, mesh, seed)
  with _threefry_kernel_on_gpu():
    state = jax.jit(_state_initializer(config, optimizer, seed),
                    out_shardings=shardings)()
  return graphdef, state, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples split over data x fsdp; every other dimension replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def jit_train_step(train_step, state_shardings, mesh: Mesh):
  """The step as training runs it (and `item-jax compile` compiles it): the
  state keeps its shardings and is donated, the batch is split over the batch
  axes, metrics come back replicated."""
  def step(state, batch):
    with activation_shardings(mesh):
      return train_step(state, batch)

  return jax.jit(step, in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)),
                 donate_argnums=0)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, values)
          for name, values in local_batch.items()}
