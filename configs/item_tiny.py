"""The tiny model on the synthetic catalogue: the CPU demo and the tests.

  item-jax synth --output runs/demo/catalogue
  item-jax prepare --catalogue runs/demo/catalogue/catalogue.csv \
      --images runs/demo/catalogue/images --output runs/demo/prepared
  item-jax train --config configs/item_tiny.py --workdir runs/demo/train \
      --config.data.dir=runs/demo/prepared
  # A handful of steps, checkpoint included:
  item-jax train --config configs/item_tiny.py:runlocal ...
"""

from item_jax.train.config import base_config


def get_config(arg=None):
  config = base_config()
  config.model.size = "tiny"
  config.model.image_size = 64
  config.model.patch_size = 8
  config.model.dropout_rate = 0.0
  config.data.max_title_len = 24
  config.global_batch_size = 32
  config.total_steps = 300
  config.log_every_steps = 25
  config.checkpoint_every_steps = 100
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.decay = "cosine"
  config.optimizer.end_learning_rate = 2e-4
  if arg == "runlocal":
    config.global_batch_size = 8
    config.total_steps = 6
    config.log_every_steps = 2
    config.checkpoint_every_steps = 3
    config.optimizer.warmup_steps = 2
  return config
