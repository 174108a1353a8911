"""Tiny outside checkpoints built locally (no download): a WordPiece vocabulary
from titles, random Hugging Face BERT and ViT folders, a random torch reference."""

import csv
import string

BERT_SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_vocab(directory, titles, lowercase=True):
  """vocab.txt as BERT lays it out: [PAD], [unused], [UNK] [CLS] [SEP] [MASK],
  then words (lower-cased), characters and ##characters; plus tokenizer_config.json."""
  import json
  from tokenizers.pre_tokenizers import BertPreTokenizer
  split = BertPreTokenizer()
  words = set()
  for title in titles:
    words.update(piece for piece, _ in split.pre_tokenize_str(
        title.lower() if lowercase else title))
  characters = sorted(set(string.ascii_lowercase + string.digits + "-.,!"))
  tokens = (BERT_SPECIALS + characters + [f"##{c}" for c in characters]
            + sorted(words - set(characters)))
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"do_lower_case": lowercase, "tokenizer_class": "BertTokenizer"}))
  return directory / "vocab.txt"


def catalogue_titles(catalogue_dir):
  with open(catalogue_dir / "catalogue.csv", newline="") as file:
    return [row["title"] for row in csv.DictReader(file)]


def tiny_bert_config(vocab_size, **overrides):
  from transformers import BertConfig
  fields = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
  return BertConfig(**{**fields, **overrides})


def randomize(model, seed):
  """Non-zero biases and non-unit LayerNorms, so no mapping mistake hides."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "LayerNorm.weight" in name:
        parameter.normal_(1.0, 0.1)
      elif name.endswith("bias"):
        parameter.normal_(0.0, 0.1)
  return model


def write_tiny_bert(directory, titles, seed=0):
  """A random BertForPreTraining (MLM + next-sentence heads) with its vocab."""
  from transformers import BertForPreTraining
  vocab = write_vocab(directory, titles)
  size = len(vocab.read_text().splitlines())
  model = randomize(BertForPreTraining(tiny_bert_config(size)).eval(), seed)
  model.save_pretrained(directory)
  return model


def write_vit(directory, image_size=32, patch_size=8, hidden=64):
  """A random ViTForMaskedImageModeling: a mask token and "vit." names."""
  import torch
  import transformers
  config = transformers.ViTConfig(
      hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=128, image_size=image_size, patch_size=patch_size,
      hidden_dropout_prob=0.0)
  model = randomize(transformers.ViTForMaskedImageModeling(config).eval(), seed=0)
  with torch.no_grad():
    model.vit.embeddings.mask_token.normal_(0.0, 1.0)
  model.save_pretrained(directory)
  return model


def random_torch_model(config, seed=0):
  """The torch reference with every parameter random (LayerNorm scales near
  1), so that no mapping mistake can hide behind a zero or a one."""
  import torch
  from item_jax.convert.torch_reference import ItemTorch
  torch.manual_seed(seed)
  model = ItemTorch(config).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "LayerNorm.weight" in name:
        parameter.normal_(1.0, 0.1)
      else:
        parameter.normal_(0.0, 0.3 if "embeddings" in name else 0.1)
  return model
