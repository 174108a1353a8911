"""The PyTorch reference's layout (item_jax/convert/torch_reference.py) <->
item-jax, both ways: BERT's text rules under "bert.", ITEm's own parts beside.

A torch checkpoint folder is model.safetensors (or pytorch_model.bin) holding
`ItemTorch.state_dict()` plus config.json with the ModelConfig fields.
"""

import dataclasses
import json

from etils import epath

from item_jax.convert import table as table_lib
from item_jax.convert import tensors as tensors_lib
from item_jax.convert.hf_bert import BERT_ENCODER_RULES, BERT_MLM_RULES
from item_jax.convert.table import Layout, Rule, dense, norm
from item_jax.model import ModelConfig
from item_jax.model import mobilenet

TORCH_LAYOUT = Layout(
    "torch",
    tuple(Rule(rule.target, f"bert.{rule.source}", rule.transform)
          for rule in BERT_ENCODER_RULES)
    + BERT_MLM_RULES
    + (Rule("embeddings.cls_token", "bert.embeddings.cls_token"),
       Rule("embeddings.mask_patch_embedding", "bert.embeddings.mask_patch_embedding"),
       Rule("embeddings.image_position_embeddings",
            "bert.embeddings.image_position_embeddings.weight"),
       Rule("embeddings.patch_embedding.bias",
            "bert.embeddings.patch_embeddings.projection.bias"),
       *dense("itm_classifier", "cls.itm"),
       *dense("mim_transform", "cls.mim.transform.dense"),
       *norm("mim_norm", "cls.mim.transform.LayerNorm"),
       *dense("mim_decoder", "cls.mim.decoder"),
       *dense("gmlm_transform", "cls.gmlm.transform.dense"),
       *norm("gmlm_norm", "cls.gmlm.transform.LayerNorm"),
       Rule("gmlm_bias", "cls.gmlm.bias"),
       *dense("gmim_transform", "cls.gmim.transform.dense"),
       *norm("gmim_norm", "cls.gmim.transform.LayerNorm"),
       *dense("gmim_decoder", "cls.gmim.decoder"),
       Rule("itc_logit_scale", "cls.itc.logit_scale")))


# A convolutional stem's HWIO kernels <-> torch's Conv2d OIHW weights.
HWIO = table_lib.Transform("oihw_to_hwio",
                           lambda x, shape: x.transpose(2, 3, 1, 0),
                           lambda y, current: y.transpose(3, 2, 0, 1))


def torch_layout(config: ModelConfig) -> Layout:
  """The table, with the patch embedding's Conv2d for the model's image stem:
  a patch_size x patch_size convolution over pixels, or a 1x1 one over a
  MobileNetV2 stem's cells (whose folded convolutions are
  "bert.embeddings.image_stem.I.J")."""
  kernel = config.patch_size if config.image_stem == "patches" else 1
  rules = [Rule("embeddings.patch_embedding.kernel",
                "bert.embeddings.patch_embeddings.projection.weight",
                table_lib.conv_to_dense(kernel))]
  if config.image_stem != "patches":
    for i, block in enumerate(mobilenet.stem_architecture(config.patch_size)):
      for j in range(len(block.convs)):
        ours, theirs = (f"embeddings.image_stem.blocks.{i}.{j}",
                        f"bert.embeddings.image_stem.{i}.{j}")
        rules += [Rule(f"{ours}.kernel", f"{theirs}.weight", HWIO),
                  Rule(f"{ours}.bias", f"{theirs}.bias")]
  return dataclasses.replace(TORCH_LAYOUT, rules=TORCH_LAYOUT.rules + tuple(rules))


def from_torch(state_dict: dict, config: ModelConfig):
  """`ItemTorch.state_dict()` (tensors or numpy) -> ({name: array}, Report)."""
  tensors = {name: _numpy(value) for name, value in state_dict.items()}
  return table_lib.to_item(torch_layout(config), tensors,
                           tensors_lib.param_shapes(config), config.num_layers)


def to_torch(params: dict, config: ModelConfig):
  """item-jax parameters -> ({torch name: float32 numpy}, Report); load with
  `ItemTorch(config).load_state_dict({k: torch.from_numpy(v) ...})`."""
  return table_lib.from_item(torch_layout(config), params, config.num_layers)


def _numpy(value):
  return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def read_torch_checkpoint(directory):
  """(ModelConfig, {name: array}, Report) of a torch checkpoint folder."""
  directory = epath.Path(directory)
  config = ModelConfig(**json.loads((directory / "config.json").read_text()))
  params, report = from_torch(
      tensors_lib.read_tensors(tensors_lib.find_weights(directory)), config)
  return config, params, report


def write_torch_checkpoint(params: dict, config: ModelConfig, output):
  """model.safetensors in the torch reference's names, plus config.json."""
  tensors, report = to_torch(params, config)
  output = epath.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  tensors_lib.write_safetensors(tensors, output / "model.safetensors",
                                metadata={"format": "pt"})
  (output / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
  return report
