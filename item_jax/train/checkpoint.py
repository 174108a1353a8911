"""The one checkpoint wrapper: orbax CheckpointManager with async saves, keep-N,
automatic resume, and restore onto whatever mesh the caller's shardings describe.

A checkpoint holds the TrainState (`state`) and a small JSON record (`meta`):
the step, the data seed and global batch size that fix the input position
(the next global example index is step * global_batch_size), and the config.
Orbax writes each step into a temporary folder and renames it when complete,
so a step left half-written by a crash is never listed or restored.
"""

import logging
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from item_jax.errors import MissingInputError


class Checkpointer:

  def __init__(self, directory, every_steps: int, keep: int,
               async_saves: bool = True):
    directory = str(directory)
    # Orbax needs absolute paths; gs:// and other URLs already are.
    self.directory = epath.Path(directory if "://" in directory
                                else os.path.abspath(directory))
    # Every `every_steps`, or at the cluster's preemption notice; not orbax's
    # default extra save at the first step, which would write a checkpoint
    # nobody asked for (and one more than `keep` counts on).
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(every_steps),
            policies.PreemptionCheckpointingPolicy()]),
        max_to_keep=keep, create=True, enable_async_checkpointing=async_saves)
    # Handlers named up front (not just item names) let `saved_shapes` read a
    # step's metadata before anything is restored.
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` without `force` would save."""
    return self.manager.should_save(step)

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); every process must call this."""
    saved = self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state, step: int | None = None):
    """(state, meta) of `step` (default: the latest complete one).

    `abstract_state` is a tree of jax.ShapeDtypeStruct with the shardings to
    restore onto: another mesh than the one that saved is fine.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise MissingInputError(f"no complete checkpoint in {self.directory}: the "
                              "run has not saved one yet")
    if step not in self.all_steps():
      raise MissingInputError(f"no checkpoint of step {step} in {self.directory}; "
                              f"saved steps: {self.all_steps()}")
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    logging.info("checkpoint: restored step %d from %s", step, self.directory)
    return restored.state, restored.meta

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    """{"params.embeddings.word_embeddings": shape, ...} of a saved state,
    read from its metadata alone (e.g. the vocabulary size before restoring)."""
    tree = self.manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape"))[0]:
      keys = [str(getattr(key, "key", getattr(key, "idx", key))) for key in path]
      shapes[".".join(key for key in keys if key != "value")] = tuple(leaf.shape)
    return shapes

  def reached_preemption(self, step: int) -> bool:
    """The cluster's preemption notice (multi-process runs only)."""
    return self.manager.reached_preemption(step)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for `restore`."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                  sharding=sharding),
      abstract_tree, shardings)
