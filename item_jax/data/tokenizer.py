"""The project's one tokenizer wrapper: sentencepiece trained on titles (fixed
special ids), or a converted BERT checkpoint's own WordPiece vocabulary.

Owns training a sentencepiece model from titles in memory, loading either kind
by file type (`load_tokenizer`), and turning batches of titles into fixed-length
id arrays (pieces + [SEP], padded); the model adds its own [CLS].
"""

from collections.abc import Iterable, Sequence
import hashlib
import heapq
import io
import json
import os

from etils import epath
import numpy as np
import sentencepiece

from item_jax.errors import MissingDependencyError, UserError

# The model contract: every checkpoint assumes these ids, so a tokenizer model
# that places them elsewhere is refused rather than silently remapped.
PAD_ID = 0
UNK_ID = 1
CLS_ID = 2  # sentencepiece's bos; the model prepends its own learned [CLS].
SEP_ID = 3  # sentencepiece's eos; ends every title.
MASK_ID = 4  # the first user-defined symbol.
MASK_PIECE = "[MASK]"

# Enough titles to learn a title vocabulary; more only slows training down.
_MAX_TRAINING_TITLES = 2_000_000
# `prepare` trains the tokenizer on at most this many titles (`TitleSample`).
TOKENIZER_SAMPLE_TITLES = 250_000


class TitleSample:
  """A deterministic sample of at most `capacity` titles, in memory that does
  not grow with the catalogue: the titles whose (seed, item id) hashes are
  the smallest (a bottom-k sample), given back in catalogue-row order. Any
  reader that sees the same rows keeps the same sample, in whatever order
  or pieces it sees them; a catalogue of at most `capacity` titles is kept
  whole, in its own order."""

  def __init__(self, capacity: int = TOKENIZER_SAMPLE_TITLES, seed: int = 0):
    if capacity < 1:
      raise ValueError(f"a title sample holds at least 1 title, got {capacity}")
    self.capacity, self.seed = capacity, seed
    self._heap = []      # (-hash, row, title): the largest kept hash on top
    self.seen = 0

  def key(self, item_id: str) -> int:
    digest = hashlib.blake2b(f"{self.seed}\x00{item_id}".encode("utf-8"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big")

  def add(self, row: int, item_id: str, title: str) -> None:
    self.seen += 1
    self._push((-self.key(item_id), row, title))

  def _push(self, entry: tuple[int, int, str]) -> None:
    if len(self._heap) < self.capacity:
      heapq.heappush(self._heap, entry)
    elif entry > self._heap[0]:
      heapq.heapreplace(self._heap, entry)

  def titles(self) -> list[str]:
    """The sampled titles, in catalogue-row order."""
    return [title for _, _, title in sorted(self._heap, key=lambda e: e[1])]

  def entries(self) -> list[tuple[int, int, str]]:
    """`(key, row, title)` of the sampled titles in row order: what `merge`
    takes from a sample of another part of the catalogue."""
    return [(-negative, row, title)
            for negative, row, title in sorted(self._heap, key=lambda e: e[1])]

  def merge(self, entries: Iterable[tuple[int, int, str]], seen: int) -> None:
    """Adds another part's sample (`entries()`) and its count of titles
    seen: the result is the sample of both parts, in any order of parts."""
    self.seen += seen
    for key, row, title in entries:
      self._push((-key, row, title))

  def __len__(self) -> int:
    return len(self._heap)


def train_sentencepiece(
    titles: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
    lowercase: bool = True,
) -> str:
  """Trains a sentencepiece model on `titles` and writes `{model_prefix}.model`.

  `model_prefix` may be local or gs://. `vocab_size` is an upper bound: tiny
  catalogues yield fewer pieces instead of failing. `lowercase` folds case
  (NFKC + case folding, stored in the model, so encoding folds too): sellers'
  all-capitals titles then share pieces with the rest, as in uncased BERT.
  Returns the model's path.
  """
  model_proto = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(titles),
      model_writer=model_proto,
      model_type=model_type,
      vocab_size=vocab_size,
      normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
      hard_vocab_limit=False,
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=CLS_ID,
      eos_id=SEP_ID,
      pad_piece="[PAD]",
      unk_piece="[UNK]",
      bos_piece="[CLS]",
      eos_piece="[SEP]",
      user_defined_symbols=[MASK_PIECE],
      input_sentence_size=_MAX_TRAINING_TITLES,
      shuffle_input_sentence=True,
      num_threads=os.cpu_count() or 1,
      minloglevel=1,
  )
  model_path = epath.Path(f"{model_prefix}.model")
  model_path.parent.mkdir(parents=True, exist_ok=True)
  model_path.write_bytes(model_proto.getvalue())
  return str(model_path)


def _pad_with_sep(pieces_per_title, max_len: int, pad_id: int, sep_id: int) -> np.ndarray:
  """int32 (titles, max_len): pieces cut to max_len - 1, then [SEP], then padding."""
  if max_len < 1:
    raise ValueError(f"max_len must be at least 1 (room for [SEP]), got {max_len}")
  title_ids = np.full((len(pieces_per_title), max_len), pad_id, np.int32)
  for row, pieces in enumerate(pieces_per_title):
    length = min(len(pieces), max_len - 1)
    title_ids[row, :length] = pieces[:length]
    title_ids[row, length] = sep_id
  return title_ids


class _SpecialIds:
  """pad/unk/cls/sep/mask ids read from `special_ids`, set in that order."""

  special_ids: tuple[int, ...]
  pad_id = property(lambda self: self.special_ids[0])
  unk_id = property(lambda self: self.special_ids[1])
  cls_id = property(lambda self: self.special_ids[2])
  sep_id = property(lambda self: self.special_ids[3])
  mask_id = property(lambda self: self.special_ids[4])


class Tokenizer(_SpecialIds):
  """Sentencepiece: encodes titles as `pieces + [SEP]`, truncated and padded."""

  FILE_NAME = "tokenizer.model"

  def __init__(self, model_path: str, num_threads: int = 1):
    # Loading from bytes (not a file name) lets the model live on gs://.
    self._model_proto = epath.Path(model_path).read_bytes()
    self._processor = sentencepiece.SentencePieceProcessor(
        model_proto=self._model_proto
    )
    self._num_threads = num_threads
    expected = {
        PAD_ID: self._processor.pad_id(),
        UNK_ID: self._processor.unk_id(),
        CLS_ID: self._processor.bos_id(),
        SEP_ID: self._processor.eos_id(),
        MASK_ID: self._processor.piece_to_id(MASK_PIECE),
    }
    if any(wanted != found for wanted, found in expected.items()):
      raise UserError(
          f"tokenizer {model_path} does not use the fixed special ids "
          f"pad=0 unk=1 cls(bos)=2 sep(eos)=3 {MASK_PIECE}=4; found "
          f"pad={expected[PAD_ID]} unk={expected[UNK_ID]} "
          f"bos={expected[CLS_ID]} eos={expected[SEP_ID]} "
          f"{MASK_PIECE}={expected[MASK_ID]}; train it with train_sentencepiece"
      )
    self.special_ids = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  def encode_batch(self, titles: Sequence[str | bytes], max_len: int) -> np.ndarray:
    """Returns int32 (len(titles), max_len): pieces, then [SEP], then padding.

    Titles may be str or UTF-8 bytes (as tf.data hands them over).
    A title longer than `max_len - 1` pieces is cut so that [SEP] stays last.
    """
    pieces_per_title = self._processor.encode(
        list(titles), out_type="numpy", num_threads=self._num_threads
    )
    return _pad_with_sep(pieces_per_title, max_len, PAD_ID, SEP_ID)

  def save(self, directory) -> str:
    """Writes the model into `directory`; returns its file name there."""
    (epath.Path(directory) / self.FILE_NAME).write_bytes(self._model_proto)
    return self.FILE_NAME


class WordPieceTokenizer(_SpecialIds):
  """A BERT checkpoint's WordPiece vocabulary, through Hugging Face `tokenizers`.

  `path` is a `tokenizers` JSON file (what `save` writes, or a checkpoint's
  tokenizer.json) or a `vocab.txt`, lower-cased as the `tokenizer_config.json`
  beside it says (`do_lower_case`, default True as in BERT's uncased models).
  Special ids are looked up by token ([PAD], [UNK], [CLS], [SEP], [MASK]).
  """

  FILE_NAME = "tokenizer.json"
  SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

  def __init__(self, path: str, lowercase: bool | None = None):
    try:
      import tokenizers
      from tokenizers.implementations import BertWordPieceTokenizer
    except ImportError as error:
      raise MissingDependencyError(
          "WordPiece vocabularies need the `tokenizers` package: "
          "pip install 'item-jax[torch]'") from error
    path = epath.Path(path)
    if path.suffix == ".json":
      self._tokenizer = tokenizers.Tokenizer.from_str(path.read_text())
    else:
      if lowercase is None:
        lowercase = _checkpoint_lowercase(path.parent)
      self._tokenizer = BertWordPieceTokenizer(
          _read_vocab(path), lowercase=lowercase)._tokenizer
    # Checkpoints' tokenizer.json files often pad and truncate to a fixed
    # length themselves: encode_batch does both, with [SEP] kept last.
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    ids = [self._tokenizer.token_to_id(token) for token in self.SPECIAL_TOKENS]
    missing = [token for token, id_ in zip(self.SPECIAL_TOKENS, ids) if id_ is None]
    if missing:
      raise UserError(f"WordPiece vocabulary {path} lacks {missing}")
    self.special_ids = tuple(ids)

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, titles: Sequence[str | bytes], max_len: int) -> np.ndarray:
    """Returns int32 (len(titles), max_len): pieces, then [SEP], then padding;
    no [CLS] (the model has its own)."""
    texts = [title.decode("utf-8", "replace") if isinstance(title, bytes) else title
             for title in titles]
    encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
    return _pad_with_sep([encoding.ids for encoding in encodings], max_len,
                         self.pad_id, self.sep_id)

  def save(self, directory) -> str:
    """Writes the whole tokenizer (vocabulary, lower-casing) as one JSON file."""
    (epath.Path(directory) / self.FILE_NAME).write_text(self._tokenizer.to_str())
    return self.FILE_NAME

  def save_bert_vocab(self, directory) -> None:
    """vocab.txt and tokenizer_config.json, as a BERT checkpoint carries them."""
    directory = epath.Path(directory)
    vocab = self._tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    normalizer = json.loads(self._tokenizer.to_str()).get("normalizer") or {}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": bool(normalizer.get("lowercase", True)),
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]"}, indent=2))


def _read_vocab(path: epath.Path) -> dict[str, int]:
  tokens = path.read_text(encoding="utf-8").splitlines()
  return {token: index for index, token in enumerate(tokens)}


def _checkpoint_lowercase(directory: epath.Path) -> bool:
  config = directory / "tokenizer_config.json"
  if config.exists():
    return bool(json.loads(config.read_text()).get("do_lower_case", True))
  return True


def load_tokenizer(path: str, num_threads: int = 1):
  """The tokenizer a file holds: sentencepiece `.model`, or WordPiece
  (`tokenizers` `.json`, or a BERT `vocab.txt`)."""
  suffix = epath.Path(path).suffix
  if suffix == ".model":
    return Tokenizer(path, num_threads=num_threads)
  if suffix in (".json", ".txt"):
    return WordPieceTokenizer(path)
  raise UserError(f"tokenizer {path}: expected a sentencepiece .model, a "
                  "WordPiece tokenizer .json or a BERT vocab.txt")
