"""A PyTorch reference of the ITEm model, built on BERT's module names, for
parity tests and benchmarks: same embeddings, post-LN blocks, five heads and
the ITC logit scale.

Names follow `transformers`' BertForPreTraining ("bert.embeddings...",
"bert.encoder.layer.N...", "cls.predictions...") plus ITEm's own parts (a
learned [CLS] vector, ViT-style patch embedding Conv2d, image positions, heads
under "cls."). Images are NCHW as torch vision models take them. Keep it in
step with item_jax/model: tests/test_convert_torch.py compares the two.

`item_losses` is the six pre-training losses of item_jax/objectives/losses.py
on inputs masked by item-jax (`loss_inputs`), so that both sides train on the
same masks, and `adamw` + `train_step` the update of item_jax/train/step.py:
tests/test_torch_vs_jax.py compares the losses, benchmarks/torch_vs_jax.py
times both steps.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from item_jax.model import ModelConfig
from item_jax.model import mobilenet
from item_jax.model.item import (IMAGE_MEAN, IMAGE_STD, ITC_INITIAL_LOGIT_SCALE,
                                 ITC_MAX_LOGIT_SCALE)
from item_jax.objectives import PAPER_TASKS, TASKS
from item_jax.train.optimizer import OptimizerConfig

TEXT_TYPE, IMAGE_TYPE = 0, 1


class Embeddings(nn.Module):

  def __init__(self, config: ModelConfig):
    super().__init__()
    hidden = config.hidden_size
    self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
    self.position_embeddings = nn.Embedding(config.max_title_positions, hidden)
    self.token_type_embeddings = nn.Embedding(2, hidden)
    self.image_position_embeddings = nn.Embedding(config.num_patches, hidden)
    self.cls_token = nn.Parameter(torch.zeros(hidden))
    self.mask_patch_embedding = nn.Parameter(torch.zeros(hidden))
    self.patch_embeddings = nn.Module()
    self.config = config
    if config.image_stem == "patches":
      self.patch_embeddings.projection = nn.Conv2d(
          config.num_channels, hidden, config.patch_size, stride=config.patch_size)
    else:
      # The hybrid input: MobileNetV2 (BatchNorm folded) cut at stride
      # patch_size, then a 1x1 projection of each cell.
      self.blocks = mobilenet.stem_architecture(config.patch_size)
      self.image_stem = nn.ModuleList([nn.ModuleList([
          nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                    stride=conv.stride, padding=conv.kernel_size // 2,
                    groups=conv.in_channels if conv.depthwise else 1)
          for conv in block.convs]) for block in self.blocks])
      self.patch_embeddings.projection = nn.Conv2d(
          config.image_token_input_dim, hidden, 1)
    self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

  def cls(self, batch: int) -> torch.Tensor:
    value = (self.cls_token + self.position_embeddings.weight[0]
             + self.token_type_embeddings.weight[TEXT_TYPE])
    return value.expand(batch, 1, -1)

  def title(self, title_ids: torch.Tensor) -> torch.Tensor:
    positions = self.position_embeddings.weight[1:title_ids.shape[1] + 1]
    return (self.word_embeddings(title_ids) + positions
            + self.token_type_embeddings.weight[TEXT_TYPE])

  def stem(self, pixel_values: torch.Tensor, masked_patches=None) -> torch.Tensor:
    """NCHW pixels (the pipeline's normalisation) -> the stem's cells; a
    masked cell's pixels are ImageNet's mean colour."""
    channel = lambda values: torch.tensor(values).view(1, 3, 1, 1)
    x = ((pixel_values * channel(IMAGE_STD) + channel(IMAGE_MEAN)
          - channel(mobilenet.IMAGENET_MEAN)) / channel(mobilenet.IMAGENET_STD))
    if masked_patches is not None:
      side, size = self.config.patches_per_side, self.config.patch_size
      cells = masked_patches.view(-1, 1, side, side)
      hidden = cells.repeat_interleave(size, 2).repeat_interleave(size, 3)
      x = torch.where(hidden, torch.zeros_like(x), x)
    for block, convs in zip(self.blocks, self.image_stem):
      block_input = x
      for conv, module in zip(block.convs, convs):
        x = module(x)
        if conv.relu6:
          x = x.clamp(0.0, 6.0)
      if block.residual:
        x = x + block_input
    return x

  def image(self, pixel_values: torch.Tensor, masked_patches=None) -> torch.Tensor:
    if self.config.image_stem == "patches":
      inputs = pixel_values
    elif self.config.freeze_image_stem:
      with torch.no_grad():
        inputs = self.stem(pixel_values, masked_patches)
    else:
      inputs = self.stem(pixel_values, masked_patches)
    patches = self.patch_embeddings.projection(inputs).flatten(2).transpose(1, 2)
    if masked_patches is not None:
      patches = torch.where(masked_patches[..., None], self.mask_patch_embedding, patches)
    return (patches + self.image_position_embeddings.weight
            + self.token_type_embeddings.weight[IMAGE_TYPE])


class SelfAttention(nn.Module):

  def __init__(self, config: ModelConfig):
    super().__init__()
    hidden = config.hidden_size
    self.num_heads = config.num_heads
    self.query = nn.Linear(hidden, hidden)
    self.key = nn.Linear(hidden, hidden)
    self.value = nn.Linear(hidden, hidden)

  def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    batch, length, hidden = x.shape
    split = lambda y: y.view(batch, length, self.num_heads, -1).transpose(1, 2)
    attended = F.scaled_dot_product_attention(
        split(self.query(x)), split(self.key(x)), split(self.value(x)),
        attn_mask=token_mask[:, None, None, :])
    return attended.transpose(1, 2).reshape(batch, length, hidden)


class DenseNorm(nn.Module):
  """BERT's "output" modules: dense, dropout, residual, LayerNorm."""

  def __init__(self, features_in: int, hidden: int, eps: float, dropout: float):
    super().__init__()
    self.dense = nn.Linear(features_in, hidden)
    self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return self.LayerNorm(residual + self.dropout(self.dense(x)))


class Layer(nn.Module):

  def __init__(self, config: ModelConfig):
    super().__init__()
    hidden, eps, rate = config.hidden_size, config.layer_norm_eps, config.dropout_rate
    self.attention = nn.Module()
    self.attention.self = SelfAttention(config)
    self.attention.output = DenseNorm(hidden, hidden, eps, rate)
    self.intermediate = nn.Module()
    self.intermediate.dense = nn.Linear(hidden, config.mlp_dim)
    self.output = DenseNorm(config.mlp_dim, hidden, eps, rate)

  def forward(self, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    x = self.attention.output(self.attention.self(x, token_mask), x)
    return self.output(F.gelu(self.intermediate.dense(x)), x)


class HeadTransform(nn.Module):
  """BERT's prediction-head transform: dense, GELU, LayerNorm."""

  def __init__(self, features_in: int, hidden: int, eps: float):
    super().__init__()
    self.dense = nn.Linear(features_in, hidden)
    self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.LayerNorm(F.gelu(self.dense(x)))


class ItemTorch(nn.Module):
  """ITEm in PyTorch: `encode` and the five heads, as item_jax's ItemModel."""

  def __init__(self, config: ModelConfig):
    super().__init__()
    hidden, eps = config.hidden_size, config.layer_norm_eps
    self.config = config
    self.bert = nn.Module()
    self.bert.embeddings = Embeddings(config)
    self.bert.encoder = nn.Module()
    self.bert.encoder.layer = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
    self.bert.pooler = nn.Module()
    self.bert.pooler.dense = nn.Linear(hidden, hidden)
    self.cls = nn.Module()
    self.cls.predictions = nn.Module()
    self.cls.predictions.transform = HeadTransform(hidden, hidden, eps)
    self.cls.predictions.bias = nn.Parameter(torch.zeros(config.vocab_size))
    self.cls.itm = nn.Linear(hidden, 2)
    self.cls.mim = nn.Module()
    self.cls.mim.transform = HeadTransform(hidden, hidden, eps)
    self.cls.mim.decoder = nn.Linear(hidden, config.patch_dim)
    self.cls.gmlm = nn.Module()
    self.cls.gmlm.transform = HeadTransform(2 * hidden, hidden, eps)
    self.cls.gmlm.bias = nn.Parameter(torch.zeros(config.vocab_size))
    self.cls.gmim = nn.Module()
    self.cls.gmim.transform = HeadTransform(2 * hidden, hidden, eps)
    self.cls.gmim.decoder = nn.Linear(hidden, config.patch_dim)
    self.cls.itc = nn.Module()
    self.cls.itc.logit_scale = nn.Parameter(torch.tensor([ITC_INITIAL_LOGIT_SCALE]))
    self.dropout = nn.Dropout(config.dropout_rate)

  def encode(self, title_ids=None, pixel_values=None, title_mask=None,
             masked_patches=None):
    """(cls, title_states, patch_states); a modality not given is None."""
    embeddings = self.bert.embeddings
    given = title_ids if title_ids is not None else pixel_values
    batch = given.shape[0]
    parts, masks = [embeddings.cls(batch)], [torch.ones(batch, 1, dtype=torch.bool)]
    if title_ids is not None:
      if title_mask is None:
        title_mask = title_ids != self.config.pad_token_id
      parts.append(embeddings.title(title_ids))
      masks.append(title_mask.bool())
    if pixel_values is not None:
      parts.append(embeddings.image(pixel_values, masked_patches))
      masks.append(torch.ones(batch, self.config.num_patches, dtype=torch.bool))
    token_mask = torch.cat(masks, 1)
    x = self.dropout(embeddings.LayerNorm(torch.cat(parts, 1)))
    for layer in self.bert.encoder.layer:
      x = layer(x, token_mask)
    title_len = 0 if title_ids is None else title_ids.shape[1]
    return (x[:, 0], None if title_ids is None else x[:, 1:1 + title_len],
            None if pixel_values is None else x[:, 1 + title_len:])

  def itc_scale(self) -> torch.Tensor:
    return torch.exp(self.cls.itc.logit_scale.clamp(max=ITC_MAX_LOGIT_SCALE)[0])

  def itm_logits(self, cls: torch.Tensor) -> torch.Tensor:
    return self.cls.itm(torch.tanh(self.bert.pooler.dense(cls)))

  def _vocab_logits(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return hidden @ self.bert.embeddings.word_embeddings.weight.T + bias

  def mlm_logits(self, token_states: torch.Tensor) -> torch.Tensor:
    return self._vocab_logits(self.cls.predictions.transform(token_states),
                              self.cls.predictions.bias)

  def mim_pixels(self, patch_states: torch.Tensor) -> torch.Tensor:
    return self.cls.mim.decoder(self.cls.mim.transform(patch_states))

  def _global_input(self, cls: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.cat([cls[:, None, :].expand_as(positions), positions], -1)

  def gmlm_logits(self, cls: torch.Tensor, title_indices: torch.Tensor) -> torch.Tensor:
    positions = self.bert.embeddings.position_embeddings.weight[title_indices + 1]
    hidden = self.cls.gmlm.transform(self._global_input(cls, positions))
    return self._vocab_logits(hidden, self.cls.gmlm.bias)

  def gmim_pixels(self, cls: torch.Tensor, patch_indices: torch.Tensor) -> torch.Tensor:
    positions = self.bert.embeddings.image_position_embeddings.weight[patch_indices]
    return self.cls.gmim.decoder(self.cls.gmim.transform(self._global_input(cls, positions)))


# -- The pre-training losses, on masks drawn by item-jax -------------------------

def loss_inputs(masked, batch: dict | None = None,
                crops=None) -> dict[str, np.ndarray]:
  """item-jax's `MaskedBatch` (item_jax.objectives.mask_batch; jax or numpy
  arrays) -> the numpy arrays `item_losses` takes: images NCHW, ids int64.
  ITC also needs the clean `batch` (its title_ids and image), and its crop
  view the photos' crop views (item_jax.objectives.augment.crop_view)."""
  arrays = {"input_ids": masked.input_ids, "title_mask": masked.title_mask,
            "pixel_values": np.asarray(masked.image).transpose(0, 3, 1, 2),
            "matched": masked.matched, "example_weight": masked.example_weight}
  if batch is not None:
    arrays.update(clean_title_ids=batch["title_ids"],
                  clean_pixel_values=np.asarray(batch["image"]).transpose(0, 3, 1, 2))
    if "text_ids" in batch:   # ITC's text view
      arrays.update(text_ids=batch["text_ids"],
                    has_text=np.asarray(batch["has_text"], np.float32))
  if crops is not None:
    arrays["crop_pixel_values"] = np.asarray(crops).transpose(0, 3, 1, 2)
  if masked.tokens is not None:
    arrays.update(token_indices=masked.tokens.indices,
                  token_labels=masked.tokens.labels,
                  token_weights=masked.tokens.weights)
  if masked.patches is not None:
    arrays.update(masked_patches=masked.patches.masked,
                  patch_indices=masked.patches.indices)
  # Writable, contiguous copies: torch.from_numpy takes them as they are.
  arrays = {name: np.array(value, order="C") for name, value in arrays.items()}
  return {name: value.astype(np.int64) if value.dtype.kind in "iu" else value
          for name, value in arrays.items()}


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
  """(batch, C, H, W) -> (batch, num_patches, patch_size * patch_size * C),
  pixels (row, col, channel) within a patch as item_jax.model.patchify."""
  batch, channels, height, width = pixel_values.shape
  rows, cols = height // patch_size, width // patch_size
  patches = pixel_values.reshape(batch, channels, rows, patch_size, cols, patch_size)
  return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, -1)


def normalized_patch_targets(pixel_values: torch.Tensor, patch_size: int,
                             normalize: bool) -> torch.Tensor:
  patches = patchify(pixel_values.float(), patch_size)
  if not normalize:
    return patches
  mean = patches.mean(-1, keepdim=True)
  var = patches.var(-1, keepdim=True, correction=0)
  return (patches - mean) / torch.sqrt(var + 1e-6)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
  return (values * weights).sum() / weights.sum().clamp(min=1.0)


def _gather(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
  """(batch, length, hidden), (batch, count) -> (batch, count, hidden)."""
  return torch.take_along_dim(states, indices[..., None], dim=1)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """Per-position cross entropy, logits (..., classes), labels (...)."""
  return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                         reduction="none").view(labels.shape)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                     weight: torch.Tensor) -> torch.Tensor:
  """Symmetric InfoNCE, as item_jax.objectives.losses.contrastive_loss."""
  a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
  logits = scale * a @ b.T
  eye = torch.eye(len(a), dtype=torch.bool)
  excluded = (weight[None, :] <= 0) & ~eye
  labels = torch.arange(len(a))
  a_to_b = F.cross_entropy(logits.masked_fill(excluded, -1e9), labels,
                           reduction="none")
  b_to_a = F.cross_entropy(logits.T.masked_fill(excluded, -1e9), labels,
                           reduction="none")
  per_example = torch.where(weight > 0, 0.5 * (a_to_b + b_to_a), 0.0)
  return _weighted_mean(per_example, weight)


def stem_neighbourhood_loss(student: torch.Tensor, teacher: torch.Tensor,
                            temperature: float,
                            weight: torch.Tensor) -> torch.Tensor:
  """item_jax.objectives.stem_neighbourhood_loss."""
  batch = student.shape[0]
  excluded = (weight[None, :] <= 0) | torch.eye(batch, dtype=torch.bool)
  def logits(x):
    x = F.normalize(x, dim=-1, eps=1e-12)
    return (x @ x.T / temperature).masked_fill(excluded, -1e9)
  target = F.softmax(logits(teacher).detach(), -1)
  per_row = -(target * F.log_softmax(logits(student), -1)).sum(-1)
  per_row = per_row + (target * torch.log(target.clamp_min(1e-30))).sum(-1)
  per_row = torch.where((weight > 0) & ((weight > 0).sum() > 1), per_row, 0.0)
  return _weighted_mean(per_row, weight)


def item_losses(model: ItemTorch, inputs: dict, weights: dict | None = None,
                normalize_patch_targets: bool = True,
                itc_pairs: tuple = (("title", "image"),),
                stem_kd: tuple[float, float] = (0.0, 0.1)):
  """(total, {task: loss}) as item_jax.objectives.pretraining_loss computes them.

  Args:
    model: the reference model.
    inputs: `loss_inputs`' arrays as tensors: the masked titles, the paired
      images and the masks item-jax drew.
    weights: {task: weight} (ObjectiveConfig's *_weight); default the
      paper's five at 1.
    normalize_patch_targets: as ObjectiveConfig's.
    itc_pairs: ObjectiveConfig.itc_view_pairs().
    stem_kd: ObjectiveConfig's (stem_kd_weight, stem_kd_temperature).
  """
  weights = dict.fromkeys(PAPER_TASKS, 1.0) if weights is None else weights
  active = {task for task in TASKS if weights.get(task, 0) > 0}
  patch_size = model.config.patch_size
  example_weight = inputs["example_weight"]
  matched = inputs["matched"]
  # Reconstruction is learnt on matched pairs only.
  reconstruction_weight = example_weight * matched.float()
  cls = title_states = patch_states = None
  if active - {"itc"}:
    cls, title_states, patch_states = model.encode(
        inputs["input_ids"], inputs["pixel_values"],
        title_mask=inputs["title_mask"],
        masked_patches=inputs.get("masked_patches"))

  losses = {}
  if "itc" in active:
    views = {}
    needed = {view for pair in itc_pairs for view in pair}
    if stem_kd[0]:
      needed.add("image")
    if "title" in needed:
      views["title"] = (model.encode(inputs["clean_title_ids"])[0], example_weight)
    if "image" in needed:
      views["image"] = (model.encode(None, inputs["clean_pixel_values"])[0],
                        example_weight)
    if "text" in needed:
      views["text"] = (model.encode(inputs["text_ids"])[0],
                       example_weight * inputs["has_text"])
    if "crop" in needed:
      views["crop"] = (model.encode(None, inputs["crop_pixel_values"])[0],
                       example_weight)
    if "joint" in needed:
      views["joint"] = ((model.encode(inputs["clean_title_ids"],
                                      inputs["clean_pixel_values"])[0],
                         example_weight) if cls is None
                        else (cls, reconstruction_weight))
    per_pair = [contrastive_loss(views[a][0], views[b][0], model.itc_scale(),
                                 torch.minimum(views[a][1], views[b][1]))
                for a, b in itc_pairs]
    losses["itc"] = sum(per_pair) / len(per_pair)
    if stem_kd[0]:
      with torch.no_grad():
        teacher = model.bert.embeddings.stem(
            inputs["clean_pixel_values"]).flatten(2).mean(-1)
      losses["itc"] = losses["itc"] + stem_kd[0] / weights["itc"] * (
          stem_neighbourhood_loss(views["image"][0], teacher, stem_kd[1],
                                  views["image"][1]))
  if "itm" in active:
    per_example = _cross_entropy(model.itm_logits(cls), matched.long())
    losses["itm"] = _weighted_mean(per_example, example_weight)
  if active & {"mlm", "gmlm"}:
    indices = inputs["token_indices"]
    token_weight = inputs["token_weights"] * reconstruction_weight[:, None]
    for task, logits_fn in (
        ("mlm", lambda: model.mlm_logits(_gather(title_states, indices))),
        ("gmlm", lambda: model.gmlm_logits(cls, indices))):
      if task in active:
        per_token = _cross_entropy(logits_fn(), inputs["token_labels"])
        losses[task] = _weighted_mean(per_token, token_weight)
  if active & {"mim", "gmim"}:
    indices = inputs["patch_indices"]
    targets = _gather(normalized_patch_targets(
        inputs["pixel_values"], patch_size, normalize_patch_targets), indices)
    patch_weight = reconstruction_weight[:, None].expand(indices.shape)
    for task, pixels_fn in (
        ("mim", lambda: model.mim_pixels(_gather(patch_states, indices))),
        ("gmim", lambda: model.gmim_pixels(cls, indices))):
      if task in active:
        per_patch = torch.square(pixels_fn() - targets).mean(-1)
        losses[task] = _weighted_mean(per_patch, patch_weight)

  total = sum(weights[task] * losses[task] for task in TASKS if task in active)
  return total, losses


def adamw(model: ItemTorch, config: OptimizerConfig,
          **implementation) -> torch.optim.AdamW:
  """torch's AdamW set up as item_jax.train.optimizer's: weight decay on
  matrices only. `train_step` sets each step's learning rate (and clips);
  `implementation` is AdamW's foreach= or fused=."""
  decay = [p for p in model.parameters() if p.ndim >= 2]
  rest = [p for p in model.parameters() if p.ndim < 2]
  return torch.optim.AdamW(
      [{"params": decay, "weight_decay": config.weight_decay},
       {"params": rest, "weight_decay": 0.0}],
      lr=config.learning_rate, betas=(config.b1, config.b2), eps=config.eps,
      **implementation)


def train_step(model: ItemTorch, optimizer: torch.optim.Optimizer, inputs: dict,
               learning_rate: float, grad_clip_norm: float,
               weights: dict | None = None,
               normalize_patch_targets: bool = True,
               itc_pairs: tuple = (("title", "image"),)) -> dict:
  """One step as item_jax.train.step's: losses, gradients, global-norm
  clipping (0: none) and the update, skipped when the loss or the gradient is
  not finite. Returns the losses and `grad_norm` (before clipping, torch's
  float32 norm)."""
  optimizer.zero_grad(set_to_none=True)
  total, losses = item_losses(model, inputs, weights, normalize_patch_targets,
                              itc_pairs)
  total.backward()
  grad_norm = torch.nn.utils.clip_grad_norm_(
      model.parameters(), grad_clip_norm if grad_clip_norm > 0 else math.inf)
  if torch.isfinite(total) and torch.isfinite(grad_norm):
    for group in optimizer.param_groups:
      group["lr"] = learning_rate
    optimizer.step()
  losses = {task: loss.detach() for task, loss in losses.items()}
  return {"loss": total.detach(), **losses, "grad_norm": grad_norm}
