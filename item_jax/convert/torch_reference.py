"""A PyTorch reference of the ITEm model, built on BERT's module names, for
parity tests and benchmarks: same embeddings, post-LN blocks and five heads.

Names follow `transformers`' BertForPreTraining ("bert.embeddings...",
"bert.encoder.layer.N...", "cls.predictions...") plus ITEm's own parts (a
learned [CLS] vector, ViT-style patch embedding Conv2d, image positions, heads
under "cls."). Images are NCHW as torch vision models take them. Keep it in
step with item_jax/model: tests/test_convert_torch.py compares the two.
"""

import torch
import torch.nn.functional as F
from torch import nn

from item_jax.model import ModelConfig

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
    self.patch_embeddings.projection = nn.Conv2d(
        config.num_channels, hidden, config.patch_size, stride=config.patch_size)
    self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

  def cls(self, batch: int) -> torch.Tensor:
    value = (self.cls_token + self.position_embeddings.weight[0]
             + self.token_type_embeddings.weight[TEXT_TYPE])
    return value.expand(batch, 1, -1)

  def title(self, title_ids: torch.Tensor) -> torch.Tensor:
    positions = self.position_embeddings.weight[1:title_ids.shape[1] + 1]
    return (self.word_embeddings(title_ids) + positions
            + self.token_type_embeddings.weight[TEXT_TYPE])

  def image(self, pixel_values: torch.Tensor, masked_patches=None) -> torch.Tensor:
    patches = self.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
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
