"""The recommended tasks on the tiny model, with the paper's patch embedding:
ITC with the joint view, plus the paper's masked-word tasks (MLM, GMLM); the
tiny model and schedule of `configs/item_tiny.py` (the paper's five tasks),
more steps. `configs/item_hybrid.py` is this recipe with ImageNet
MobileNetV2 as the image stem: the demo's recommended recipe; this one
serves where the stem's weights are not installed.

What it is for: embeddings that beat the untrained model and the colour
histogram within minutes of a CPU (3,000 steps: title + image macro R@10 0.544
against 0.049 untrained on the hard split; the joint view is level with the
title-only view across seeds), and keep improving with steps (0.698 at
8,000). The paper's recipe alone first makes
the embeddings worse: MLM sits at the unigram plateau and ITM at chance for
thousands of steps, and at weight 1 their gradients drown a contrastive term
under the global-norm clip (BENCHMARKS.md, "Embeddings worth using").

  item-jax train --config configs/item_recommended.py --workdir runs/rec \
      --config.data.dir=runs/demo/prepared

Its choices, each measured with benchmarks/learning_curves.py on the hard
synthetic split (BENCHMARKS.md):
- objectives.itc_weight = 1, itc_pairs = title:image, joint:title,
  joint:image: the title-only and image-only [CLS] find each other (the image
  side learns the object and its colour), and the masked joint pass's [CLS]
  (the view `embed` returns) must find its own clean title and photo.
- MLM and GMLM at weight 1: with ITC they leave the unigram plateau early
  and give the [CLS] the title's words (category, brand, model code).
  Taking them down to 0.1 cost most of the gain.
- ITM, MIM and GMIM off (weight 0): at this budget they did not help; ITM's
  swapped pairs also take half the batch out of the joint view's ITC.
- log_task_gradients: each task's share of the gradient in TensorBoard.
`runlocal` is a handful of steps for smoke tests (as item_tiny's).
"""

import pathlib

from item_jax.train.config import load_config


def get_config(arg=None):
  tiny = pathlib.Path(__file__).with_name("item_tiny.py")
  config = load_config(f"{tiny}:{arg}" if arg else str(tiny))
  if arg != "runlocal":
    config.total_steps = 3000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 500
  config.log_task_gradients = True
  config.objectives.itc_weight = 1.0
  config.objectives.itc_pairs = "title:image,joint:title,joint:image"
  config.objectives.itm_weight = 0.0
  config.objectives.mim_weight = 0.0
  config.objectives.gmim_weight = 0.0
  return config
