"""The recommended recipe on the tiny model: ITC first, the paper's five tasks
beside it at a weight that does not starve it.

What it is for: embeddings that beat the untrained model within minutes of a
CPU (the demo) and keep improving with steps. The paper's recipe alone
(`configs/item_tiny.py`) first makes the embeddings worse: MLM sits at the
unigram plateau and ITM at chance for thousands of steps, and their gradients
drown a contrastive term under the global-norm clip
(benchmarks/learning_curves.py; BENCHMARKS.md, "Embeddings worth using").

  item-jax train --config configs/item_recommended.py --workdir runs/rec \
      --config.data.dir=runs/demo/prepared

Its choices, each measured on the hard synthetic split (BENCHMARKS.md):
- objectives.itc_weight = 1 with itc_pairs = title:image, joint:title,
  joint:image: the title-only and image-only [CLS] find each other (the
  image side learns the object and its colour), and the joint [CLS] of the
  masked pass must find both (it is the view `embed` returns).
- the five tasks at 0.1 each: they still shape the encoder (the title tokens'
  outputs, the patches') without taking the clipped gradient from ITC.
- more steps than the paper's demo (the step is cheap on the tiny model).
`runlocal` is a handful of steps for smoke tests.
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
  config.total_steps = 2000
  config.log_every_steps = 100
  # train/grad_share_<task> in TensorBoard: which task the clipped update follows.
  config.log_task_gradients = True
  config.checkpoint_every_steps = 500
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.decay = "cosine"
  config.optimizer.end_learning_rate = 2e-4
  config.objectives.itc_weight = 1.0
  config.objectives.itc_pairs = "title:image,joint:title,joint:image"
  for task in ("itm", "mlm", "mim", "gmlm", "gmim"):
    config.objectives[f"{task}_weight"] = 0.1
  if arg == "runlocal":
    config.global_batch_size = 8
    config.total_steps = 6
    config.log_every_steps = 2
    config.checkpoint_every_steps = 3
    config.optimizer.warmup_steps = 2
  return config
