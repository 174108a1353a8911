"""Hugging Face BERT <-> item-jax: the text side (embeddings, encoder, pooler,
MLM head) of a BERT checkpoint folder, and our text side written back in
BERT's layout for `transformers.BertModel`.

Our [CLS] is a learned vector at title position 0 with type 0; BERT's is the
word embedding of the [CLS] token at position 0. Importing sets ours to BERT's
[CLS] row, so titles without [CLS] but with a final [SEP] reproduce BERT's
input embeddings exactly; exporting writes ours into that row ([CLS] never
occurs inside our titles, so the row is free).
"""

import dataclasses
import json

from etils import epath

from item_jax.convert import table as table_lib
from item_jax.convert import tensors as tensors_lib
from item_jax.convert.table import Layout, Rule, dense, norm
from item_jax.data.tokenizer import WordPieceTokenizer
from item_jax.errors import MissingInputError, UserError
from item_jax.model import ModelConfig, model_config

# Sources relative to BertModel (a BertFor* checkpoint's "bert." prefix is
# stripped before matching).
BERT_ENCODER_RULES = (
    Rule("embeddings.word_embeddings", "embeddings.word_embeddings.weight"),
    Rule("embeddings.title_position_embeddings", "embeddings.position_embeddings.weight"),
    Rule("embeddings.type_embeddings", "embeddings.token_type_embeddings.weight"),
    *norm("embeddings.norm", "embeddings.LayerNorm"),
    *dense("layers.{layer}.attention.query", "encoder.layer.{layer}.attention.self.query"),
    *dense("layers.{layer}.attention.key", "encoder.layer.{layer}.attention.self.key"),
    *dense("layers.{layer}.attention.value", "encoder.layer.{layer}.attention.self.value"),
    *dense("layers.{layer}.attention.output", "encoder.layer.{layer}.attention.output.dense"),
    *norm("layers.{layer}.attention_norm", "encoder.layer.{layer}.attention.output.LayerNorm"),
    *dense("layers.{layer}.intermediate", "encoder.layer.{layer}.intermediate.dense"),
    *dense("layers.{layer}.mlp_output", "encoder.layer.{layer}.output.dense"),
    *norm("layers.{layer}.output_norm", "encoder.layer.{layer}.output.LayerNorm"),
    *dense("pooler", "pooler.dense"),
)
BERT_MLM_RULES = (
    *dense("mlm_transform", "cls.predictions.transform.dense"),
    *norm("mlm_norm", "cls.predictions.transform.LayerNorm"),
    Rule("mlm_bias", "cls.predictions.bias"),
)
IMAGE_SIDE = "image side: BERT reads text only"
ITEM_HEADS = "ITEm's own head: BERT has none"


def bert_layout(cls_id: int, exporting: bool = False) -> Layout:
  """The table for one vocabulary (`cls_id`: the [CLS] token's id).

  Exporting writes the MLM decoder untied: the word embeddings' [CLS] row
  holds our [CLS] vector, the decoder keeps the word's own row, so MLM
  logits stay exact for every token. Importing ignores BERT's decoder (tied).
  """
  decoder = (Rule("embeddings.word_embeddings", "cls.predictions.decoder.weight"),
             Rule("mlm_bias", "cls.predictions.decoder.bias"))
  return Layout(
      "hf-bert",
      BERT_ENCODER_RULES + BERT_MLM_RULES + (decoder if exporting else ())
      + (Rule("embeddings.cls_token", "embeddings.word_embeddings.weight",
              table_lib.take_row(cls_id)),),
      ignored_sources={
          "embeddings.position_ids": "a buffer of position indices, not a weight",
          "cls.predictions.decoder.weight": "tied to the word embeddings",
          "cls.predictions.decoder.bias": "the same tensor as cls.predictions.bias",
          "cls.seq_relationship.*": "BERT's next-sentence head: no counterpart",
      },
      unset_targets={
          "embeddings.image_position_embeddings": IMAGE_SIDE,
          "embeddings.patch_embedding.*": IMAGE_SIDE,
          "embeddings.mask_patch_embedding": IMAGE_SIDE,
          "embeddings.image_stem.*": IMAGE_SIDE,
          "itm_classifier.*": ITEM_HEADS,
          "mim_*": ITEM_HEADS,
          "gmlm_*": ITEM_HEADS,
          "gmim_*": ITEM_HEADS,
          "itc_*": ITEM_HEADS,
          # A BertModel checkpoint (no BertForMaskedLM / ForPreTraining head).
          "mlm_*": "the checkpoint has no MLM head",
      })


def normalize_names(tensors: dict) -> dict:
  """BertFor* names ("bert.encoder...") and old LayerNorm names (gamma/beta)
  -> BertModel's names."""
  renamed = {}
  for name, value in tensors.items():
    name = name.removeprefix("bert.")
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
        "LayerNorm.beta", "LayerNorm.bias")
    renamed[name] = value
  return renamed


def config_from_bert(bert: dict, image_size: int = 224,
                     patch_size: int = 16, **image_side) -> ModelConfig:
  """ModelConfig from a BERT config.json (the image side is ours to choose)."""
  if bert.get("model_type", "bert") != "bert":
    raise UserError(f"model_type={bert.get('model_type')!r}: only BERT "
                    "checkpoints are read by hf-bert")
  if bert.get("hidden_act", "gelu") != "gelu":
    raise UserError(f"hidden_act={bert['hidden_act']!r}: item-jax uses BERT's "
                    "exact (erf) GELU only")
  if bert.get("position_embedding_type", "absolute") != "absolute":
    raise UserError("only absolute position embeddings are supported, got "
                    f"{bert['position_embedding_type']!r}")
  return model_config(
      "base", num_layers=bert["num_hidden_layers"], hidden_size=bert["hidden_size"],
      num_heads=bert["num_attention_heads"], mlp_dim=bert["intermediate_size"],
      vocab_size=bert["vocab_size"],
      max_title_positions=bert.get("max_position_embeddings", 512),
      layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
      pad_token_id=bert.get("pad_token_id", 0),
      initializer_range=bert.get("initializer_range", 0.02),
      dropout_rate=bert.get("hidden_dropout_prob", 0.1),
      image_size=image_size, patch_size=patch_size, **image_side)


def config_to_bert(config: ModelConfig) -> dict:
  """A BERT config.json for our text side."""
  return {
      "architectures": ["BertForMaskedLM"], "model_type": "bert",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "intermediate_size": config.mlp_dim, "hidden_act": "gelu",
      "hidden_dropout_prob": config.dropout_rate,
      # Fused attention has no dropout on attention probabilities.
      "attention_probs_dropout_prob": 0.0,
      "max_position_embeddings": config.max_title_positions,
      "type_vocab_size": 2, "initializer_range": config.initializer_range,
      "layer_norm_eps": config.layer_norm_eps, "pad_token_id": config.pad_token_id,
      "position_embedding_type": "absolute",
      # See bert_layout: the MLM decoder is written beside the embeddings.
      "tie_word_embeddings": False,
  }


@dataclasses.dataclass
class Converted:
  """A converted model: its config, every parameter, what was done, the tokenizer."""

  config: ModelConfig
  params: dict
  report: table_lib.Report
  tokenizer: object | None


def read_checkpoint(directory, image_size: int = 224, patch_size: int = 16,
                    **image_side):
  """(ModelConfig, BertModel-named tensors, WordPiece tokenizer) of a folder.
  `image_side`: ModelConfig fields of the image side (image_stem, ...)."""
  directory = epath.Path(directory)
  config = config_from_bert(json.loads((directory / "config.json").read_text()),
                            image_size, patch_size, **image_side)
  tensors = normalize_names(tensors_lib.read_tensors(tensors_lib.find_weights(directory)))
  vocab = directory / "tokenizer.json"
  vocab = vocab if vocab.exists() else directory / "vocab.txt"
  if not vocab.exists():
    raise MissingInputError(f"{directory} has no vocab.txt or tokenizer.json: "
                            "a converted model keeps its checkpoint's vocabulary")
  return config, tensors, WordPieceTokenizer(str(vocab))


def convert_hf_bert(directory, image_size: int = 224, patch_size: int = 16,
                    seed: int = 0, **image_side) -> Converted:
  """A BERT checkpoint folder -> a complete item-jax model: BERT's text side,
  everything BERT lacks (image side, ITEm's heads) freshly initialised.
  `image_side`: ModelConfig fields of the image side (image_stem, ...)."""
  config, tensors, tokenizer = read_checkpoint(directory, image_size, patch_size,
                                               **image_side)
  converted, report = table_lib.to_item(
      bert_layout(tokenizer.cls_id), tensors, tensors_lib.param_shapes(config),
      config.num_layers)
  params = tensors_lib.complete_params(converted, config, seed)
  return Converted(config, params, report, tokenizer)


def export_hf_bert(params: dict, config: ModelConfig, output, tokenizer=None,
                   cls_id: int | None = None) -> table_lib.Report:
  """Writes our text side as a BERT checkpoint folder: model.safetensors
  (BertForMaskedLM names), config.json, and the vocabulary when WordPiece."""
  if cls_id is None:
    if tokenizer is None:
      raise UserError("export to hf-bert needs the tokenizer (or cls_id) to "
                      "place our [CLS] vector in the word embeddings")
    cls_id = tokenizer.cls_id
  bert, report = table_lib.from_item(bert_layout(cls_id, exporting=True), params,
                                     config.num_layers)
  output = epath.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  tensors = {(name if name.startswith("cls.") else f"bert.{name}"): value
             for name, value in bert.items()}
  tensors_lib.write_safetensors(tensors, output / "model.safetensors",
                                metadata={"format": "pt"})
  (output / "config.json").write_text(json.dumps(config_to_bert(config), indent=2))
  if isinstance(tokenizer, WordPieceTokenizer):
    tokenizer.save(output)
    tokenizer.save_bert_vocab(output)
  return report
