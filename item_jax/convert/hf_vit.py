"""Hugging Face ViT -> item-jax's image side: the patch embedding (a Conv2d
becomes our Dense over patch pixels ordered (row, col, channel)), the image
position embeddings (ViT's [CLS] position dropped, bilinearly resized when the
image size differs) and, from ViT's masked-image-modeling models, the mask token.

ITEm has one encoder for both modalities: ViT's encoder layers are not used.
"""

import json

from etils import epath

from item_jax.convert import table as table_lib
from item_jax.convert import tensors as tensors_lib
from item_jax.convert.table import Layout, Rule
from item_jax.model import ModelConfig

VIT_ENCODER = "ViT's encoder: ITEm's one encoder comes from the text checkpoint"


def vit_layout(patch_size: int) -> Layout:
  return Layout(
      "hf-vit",
      (Rule("embeddings.patch_embedding.kernel",
            "embeddings.patch_embeddings.projection.weight",
            table_lib.conv_to_dense(patch_size)),
       Rule("embeddings.patch_embedding.bias",
            "embeddings.patch_embeddings.projection.bias"),
       Rule("embeddings.image_position_embeddings", "embeddings.position_embeddings",
            table_lib.resize_positions(num_leading=1)),
       Rule("embeddings.mask_patch_embedding", "embeddings.mask_token",
            table_lib.RESHAPE)),
      ignored_sources={
          "embeddings.cls_token": "ViT's [CLS]: ITEm's comes from the text side",
          "encoder.*": VIT_ENCODER, "layernorm.*": VIT_ENCODER,
          "pooler.*": VIT_ENCODER, "classifier.*": "ViT's classification head",
          "decoder.*": "ViT's pixel decoder (masked image modeling)",
      },
      unset_targets={
          "embeddings.mask_patch_embedding": "the ViT has no mask token",
          # Everything but the image embeddings stays as it was.
          "embeddings.word_embeddings": "text side",
          "embeddings.title_position_embeddings": "text side",
          "embeddings.type_embeddings": "text side",
          "embeddings.cls_token": "text side",
          "embeddings.norm.*": "shared encoder",
          "layers.*": "shared encoder", "pooler.*": "shared encoder",
          "itm_*": "ITEm's heads", "mlm_*": "ITEm's heads", "mim_*": "ITEm's heads",
          "gmlm_*": "ITEm's heads", "gmim_*": "ITEm's heads",
          "itc_*": "ITEm's heads",
      })


def read_vit_tensors(directory) -> dict:
  """A ViT checkpoint folder's tensors with ViTModel names ("vit." stripped)."""
  tensors = tensors_lib.read_tensors(tensors_lib.find_weights(directory))
  return {name.removeprefix("vit."): value for name, value in tensors.items()}


def convert_hf_vit(directory, config: ModelConfig):
  """({image-side parameter: array}, Report) for a model of `config`."""
  directory = epath.Path(directory)
  vit_config = directory / "config.json"
  if vit_config.exists():
    vit = json.loads(vit_config.read_text())
    if vit.get("hidden_size", config.hidden_size) != config.hidden_size:
      raise table_lib.ConversionError(
          f"ViT hidden_size={vit['hidden_size']} differs from the model's "
          f"{config.hidden_size}")
  return table_lib.to_item(vit_layout(config.patch_size), read_vit_tensors(directory),
                           tensors_lib.param_shapes(config), config.num_layers)
