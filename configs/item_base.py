"""The paper's pre-training run: BERT-base, 224 px images, 16 px patches.

Global batch 512 for 100k steps, AdamW, linear warmup then linear decay.

  item-jax train --config configs/item_base.py --workdir gs://BUCKET/item-base \
      --config.data.dir=gs://BUCKET/prepared
  # A few steps on this machine:
  item-jax train --config configs/item_base.py:runlocal --workdir /tmp/item-base \
      --config.data.dir=runs/demo/prepared
  # FSDP instead of data parallel (same code, another mesh):
  ... --config.mesh.data=-1 --config.mesh.fsdp=8
"""

from item_jax.train.config import base_config


def get_config(arg=None):
  config = base_config()
  config.model.size = "base"
  config.global_batch_size = 512
  config.total_steps = 100_000
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 10_000
  config.optimizer.decay = "linear"
  if arg == "runlocal":
    config.global_batch_size = 8
    config.total_steps = 5
    config.log_every_steps = 1
    config.checkpoint_every_steps = 5
    config.optimizer.warmup_steps = 1
  return config
