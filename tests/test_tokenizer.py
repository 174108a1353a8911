"""The tokenizer contract: fixed special ids, pieces + [SEP], truncation, padding."""

import pathlib

import numpy as np
import pytest
import sentencepiece

from item_jax.data import tokenizer as tokenizer_lib

TITLES = [
    "red cotton shirt size m",
    "blue leather shoe for men",
    "stainless steel kettle 1.7l cordless",
    "ceramic coffee mug 350ml dishwasher safe",
    "wooden chair with cushion",
    "usb c charging cable 2m braided",
] * 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tokenizer") / "titles"
  return tokenizer_lib.Tokenizer(tokenizer_lib.train_sentencepiece(TITLES, str(prefix), 64))


def test_training_writes_the_model_at_the_prefix(tmp_path):
  path = tokenizer_lib.train_sentencepiece(iter(TITLES), str(tmp_path / "sub" / "tok"), 64)
  assert path == str(tmp_path / "sub" / "tok.model")
  assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["tok.model"]


def test_vocab_size_is_an_upper_bound_for_tiny_catalogues(tmp_path):
  path = tokenizer_lib.train_sentencepiece(TITLES[:3], str(tmp_path / "tok"), 8000)
  assert 5 < tokenizer_lib.Tokenizer(path).vocab_size < 8000


def test_special_ids_are_fixed(tokenizer):
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
          tokenizer.mask_id) == (0, 1, 2, 3, 4)
  assert tokenizer.special_ids == (0, 1, 2, 3, 4)
  # "[MASK]" in text is the mask token itself, never split into pieces.
  assert tokenizer.mask_id in tokenizer.encode_batch(["[MASK] shirt"], 8)[0]


def test_titles_end_in_sep_then_padding_without_cls(tokenizer):
  title_ids = tokenizer.encode_batch(["red cotton shirt", "", "blue shoe"], 12)
  assert title_ids.dtype == np.int32 and title_ids.shape == (3, 12)
  for row in title_ids:
    length = int(np.count_nonzero(row))
    assert row[length - 1] == tokenizer.sep_id
    assert np.all(row[length:] == tokenizer.pad_id)
    assert tokenizer.cls_id not in row
    assert np.all(row[:length - 1] > max(tokenizer.special_ids))
  np.testing.assert_array_equal(title_ids[1], [tokenizer.sep_id] + [0] * 11)


def test_long_titles_are_truncated_keeping_sep(tokenizer):
  long_title = " ".join(TITLES)
  full = tokenizer.encode_batch([long_title], 512)[0]
  cut = tokenizer.encode_batch([long_title], 8)[0]
  assert np.count_nonzero(full) > 8
  np.testing.assert_array_equal(cut[:7], full[:7])
  assert cut[7] == tokenizer.sep_id


def test_bytes_and_str_titles_encode_alike(tokenizer):
  np.testing.assert_array_equal(
      tokenizer.encode_batch(["red shoe", "mug"], 6),
      tokenizer.encode_batch([b"red shoe", b"mug"], 6),
  )


def test_a_model_with_other_special_ids_is_refused(tmp_path: pathlib.Path):
  # sentencepiece's defaults put unk at 0, bos at 1, eos at 2 and have no pad.
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(TITLES), model_prefix=str(tmp_path / "plain"),
      vocab_size=40, hard_vocab_limit=False, minloglevel=2,
  )
  with pytest.raises(ValueError, match="special ids"):
    tokenizer_lib.Tokenizer(str(tmp_path / "plain.model"))


def test_case_is_folded_unless_asked_to_keep_it(tmp_path):
  titles = TITLES + [title.upper() for title in TITLES]
  folded = tokenizer_lib.Tokenizer(
      tokenizer_lib.train_sentencepiece(titles, str(tmp_path / "folded"), 64))
  cased = tokenizer_lib.Tokenizer(tokenizer_lib.train_sentencepiece(
      titles, str(tmp_path / "cased"), 64, lowercase=False))
  shouting, quiet = "RED COTTON SHIRT SIZE M", "red cotton shirt size m"
  np.testing.assert_array_equal(folded.encode_batch([shouting], 12),
                                folded.encode_batch([quiet], 12))
  assert not np.array_equal(cased.encode_batch([shouting], 12),
                            cased.encode_batch([quiet], 12))
