"""Analytic training FLOPs per example: the yardstick for MFU and for XLA's count.

A multiply-add is 2 FLOPs; a training step costs 3x the forward pass (forward,
and the backward's two matmuls per forward matmul). Only matmuls are counted.
"""

from item_jax.model import ModelConfig
from item_jax.model import mobilenet
from item_jax.objectives.losses import PAPER_TASKS, ObjectiveConfig
from item_jax.objectives.masking import max_predictions, num_masked_patches

TRAIN_MULTIPLIER = 3  # forward + backward (grads w.r.t. inputs and weights)


def encoder_matmul_params(config: ModelConfig) -> int:
  """Non-embedding weights one token meets per layer stack (no biases/norms)."""
  hidden, mlp = config.hidden_size, config.mlp_dim
  return config.num_layers * (4 * hidden * hidden + 2 * hidden * mlp)


def _encoder_pass(config: ModelConfig, tokens: int, image: bool) -> dict:
  """Forward matmul FLOPs of one encoder pass over `tokens` positions."""
  hidden = config.hidden_size
  flops = {"encoder": 2 * encoder_matmul_params(config) * tokens,
           # QK^T and attention-weighted values: two (tokens x tokens x hidden)
           # matmuls.
           "attention": config.num_layers * 2 * 2 * tokens * tokens * hidden}
  if image:
    flops["patch_embedding"] = (2 * config.num_patches
                                * config.image_token_input_dim * hidden)
    if config.image_stem != "patches":
      flops["image_stem"] = image_stem_flops(config)
  return flops


def image_stem_flops(config: ModelConfig) -> int:
  """Forward FLOPs of a convolutional image stem on one image (every
  convolution, depthwise ones per channel)."""
  side = config.image_size
  flops = 0
  for block in mobilenet.stem_architecture(config.patch_size):
    for conv in block.convs:
      side = -(-side // conv.stride)
      per_output = conv.kernel_size ** 2 * (1 if conv.depthwise else conv.in_channels)
      flops += 2 * side * side * conv.out_channels * per_output
  return flops


def training_flops_per_example(config: ModelConfig, title_len: int,
                               objectives: ObjectiveConfig | None = None,
                               text_len: int = 0,
                               stem_in_step: bool = True) -> dict:
  """FLOPs of one training example, by part, and their `total`.

  Heads are counted on the positions the step actually computes: the masked
  title slots and masked patches (the vocabulary projection never runs on the
  whole sequence). ITC's extra encoder passes are `itc_encoder`,
  `itc_attention` and `itc_patch_embedding`; its text view reads `text_len`
  tokens (config.data.max_text_len). `stem_in_step=False`: a frozen stem's
  cells are read from a cache (data.stem_cells="cached"), not computed.
  """
  objectives = objectives or ObjectiveConfig()
  hidden, vocab = config.hidden_size, config.vocab_size
  joint = 1 + title_len + config.num_patches
  forward = {}
  if any(objectives.weight(task) > 0 for task in PAPER_TASKS):
    forward.update(_encoder_pass(config, joint, image=True))
  if objectives.weight("itc") > 0:
    # Extra passes over the clean listing: title-only, image-only (and the
    # crop view's over its other look at the photo), and the joint view when
    # no other task runs the joint pass.
    views = {view for pair in objectives.itc_view_pairs() for view in pair}
    if objectives.stem_kd_weight:   # its student is the image view
      views.add("image")
    lengths = {"title": (1 + title_len, False),
               "image": (1 + config.num_patches, True),
               "crop": (1 + config.num_patches, True),
               "text": (1 + text_len, False)}
    if "joint" in views and not forward:
      lengths["joint"] = (joint, True)
    itc = {}
    for view, (length, image) in lengths.items():
      if view in views:
        for part, value in _encoder_pass(config, length, image).items():
          itc[part] = itc.get(part, 0) + value
    for part, value in itc.items():
      forward[f"itc_{part}"] = value
  token_slots = max_predictions(title_len, objectives.token_mask_rate)
  masked_patches = num_masked_patches(config.num_patches,
                                      objectives.patch_mask_ratio)
  head_costs = {
      "itm": 1 * (hidden * hidden + 2 * hidden),
      "mlm": token_slots * (hidden * hidden + hidden * vocab),
      "gmlm": token_slots * (2 * hidden * hidden + hidden * vocab),
      "mim": masked_patches * (hidden * hidden + hidden * config.patch_dim),
      "gmim": masked_patches * (2 * hidden * hidden + hidden * config.patch_dim),
      # The (batch x batch) similarities are per pair of examples: not
      # counted per example.
  }
  for task, multiply_adds in head_costs.items():
    if objectives.weight(task) > 0:
      forward[task] = 2 * multiply_adds
  # A frozen stem runs forward only (no gradient reaches it).
  frozen = config.image_stem != "patches" and config.freeze_image_stem
  if not stem_in_step:
    forward = {part: value for part, value in forward.items()
               if not part.endswith("image_stem")}
  flops = {part: (1 if frozen and part.endswith("image_stem") else TRAIN_MULTIPLIER)
           * value for part, value in forward.items()}
  flops["total"] = sum(flops.values())
  return flops
