"""Pre-training from a converted checkpoint: the train config saved in the
work directory by `item-jax convert` (its model is the converted one).

  item-jax convert hf-bert path/to/bert --workdir runs/bert
  item-jax prepare --catalogue ... --images ... --output runs/bert-data \
      --tokenizer runs/bert/tokenizer.json
  item-jax train --config configs/item_converted.py:runs/bert --workdir runs/bert \
      --config.data.dir=runs/bert-data
"""

from item_jax.convert.workdir import workdir_config


def get_config(arg=None):
  if not arg:
    raise ValueError("configs/item_converted.py needs the work directory: "
                     "--config configs/item_converted.py:WORKDIR")
  return workdir_config(arg)
