"""The project's one tokenizer: sentencepiece trained on titles, with fixed special ids.

Owns training a model from titles in memory and turning batches of titles into
fixed-length id arrays (pieces + [SEP], padded); the model adds its own [CLS].
"""

from collections.abc import Iterable, Sequence
import io
import os

from etils import epath
import numpy as np
import sentencepiece

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


def train_sentencepiece(
    titles: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "unigram",
) -> str:
  """Trains a sentencepiece model on `titles` and writes `{model_prefix}.model`.

  `model_prefix` may be local or gs://. `vocab_size` is an upper bound: tiny
  catalogues yield fewer pieces instead of failing. Returns the model's path.
  """
  model_proto = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(titles),
      model_writer=model_proto,
      model_type=model_type,
      vocab_size=vocab_size,
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


class Tokenizer:
  """Encodes titles as `pieces + [SEP]`, truncated and padded to a fixed length."""

  def __init__(self, model_path: str, num_threads: int = 1):
    # Loading from bytes (not a file name) lets the model live on gs://.
    self._processor = sentencepiece.SentencePieceProcessor(
        model_proto=epath.Path(model_path).read_bytes()
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
      raise ValueError(
          f"tokenizer {model_path} does not use the fixed special ids "
          f"pad=0 unk=1 cls(bos)=2 sep(eos)=3 {MASK_PIECE}=4; found "
          f"pad={expected[PAD_ID]} unk={expected[UNK_ID]} "
          f"bos={expected[CLS_ID]} eos={expected[SEP_ID]} "
          f"{MASK_PIECE}={expected[MASK_ID]}; train it with train_sentencepiece"
      )

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def cls_id(self) -> int:
    return CLS_ID

  @property
  def sep_id(self) -> int:
    return SEP_ID

  @property
  def mask_id(self) -> int:
    return MASK_ID

  @property
  def special_ids(self) -> tuple[int, ...]:
    return (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)

  def encode_batch(self, titles: Sequence[str | bytes], max_len: int) -> np.ndarray:
    """Returns int32 (len(titles), max_len): pieces, then [SEP], then padding.

    Titles may be str or UTF-8 bytes (as tf.data hands them over).
    A title longer than `max_len - 1` pieces is cut so that [SEP] stays last.
    """
    if max_len < 1:
      raise ValueError(f"max_len must be at least 1 (room for [SEP]), got {max_len}")
    pieces_per_title = self._processor.encode(
        list(titles), out_type="numpy", num_threads=self._num_threads
    )
    title_ids = np.full((len(pieces_per_title), max_len), PAD_ID, np.int32)
    for row, pieces in enumerate(pieces_per_title):
      length = min(len(pieces), max_len - 1)
      title_ids[row, :length] = pieces[:length]
      title_ids[row, length] = SEP_ID
    return title_ids
