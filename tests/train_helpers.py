"""Building tiny training configs and reading back what a run wrote."""

import glob

from tensorboard.backend.event_processing import event_accumulator

from item_jax.train.config import load_config, validate

TINY_OVERRIDES = (
    "--config.model.image_size=32", "--config.model.patch_size=8",
    "--config.data.max_title_len=16", "--config.global_batch_size=8",
    "--config.log_every_steps=1", "--config.optimizer.warmup_steps=2",
)


def tiny_settings(data_dir, *overrides, num_devices=8, process_count=1):
  config = load_config("configs/item_tiny.py:runlocal",
                       [*TINY_OVERRIDES, f"--config.data.dir={data_dir}", *overrides])
  return validate(config, num_devices, process_count)


def losses_by_step(history):
  return {row["step"]: row["loss"] for row in history}


def tensorboard_scalars(workdir, tag):
  """{step: value} of `tag` across every event file in workdir (later files win)."""
  values = {}
  for path in sorted(glob.glob(f"{workdir}/events.out.tfevents.*")):
    accumulator = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    if tag in accumulator.Tags()["tensors"]:
      for event in accumulator.Tensors(tag):
        values[event.step] = float(event.tensor_proto.float_val[0]
                                   if event.tensor_proto.float_val else
                                   _tensor_value(event.tensor_proto))
  return values


def _tensor_value(proto):
  import tensorflow as tf
  return tf.make_ndarray(proto).item()
