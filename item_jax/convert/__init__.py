"""Checkpoint conversion: one table of names and transforms per outside layout
(Hugging Face BERT and ViT, the PyTorch reference, item-jax's own serving
export), each checked for unused and unset tensors, plus resharding.

torch, safetensors and tokenizers come with `pip install 'item-jax[torch]'`;
the modules import them only when they read or write those formats.
"""

from item_jax.convert.serving import export, import_export, load_model, read_export, write_export
from item_jax.convert.hf_bert import convert_hf_bert, export_hf_bert
from item_jax.convert.hf_vit import convert_hf_vit
from item_jax.convert.table import ConversionError, Layout, Report, Rule, from_item, to_item
from item_jax.convert.tensors import (UnsafeCheckpointError, flatten_params, model_from_params,
                                      read_tensors)
from item_jax.convert.torch_layout import from_torch, to_torch
from item_jax.convert.workdir import reshard, restore_workdir, save_workdir, workdir_params

__all__ = [
    "ConversionError", "Layout", "Report", "Rule", "UnsafeCheckpointError",
    "convert_hf_bert", "convert_hf_vit", "export", "export_hf_bert", "flatten_params",
    "from_item", "from_torch", "import_export", "load_model", "model_from_params",
    "read_export", "read_tensors", "reshard", "restore_workdir", "save_workdir",
    "to_item", "to_torch", "workdir_params", "write_export",
]
