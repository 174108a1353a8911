"""A frozen image stem's cells, computed once per listing of the training split
(`data.stem_cells = "cached"`), so that the step reads them as data.

A frozen stem gives the same cells for a photo at every step, and on a few CPU
cores it dominates a small model's step: MobileNetV2 at 224 px is 0.3 GFLOP a
photo against the tiny encoder's few hundred MFLOP a listing. The cache is
`STEM_CELLS_DIR/<split>.npy`, (records, cells, channels) float16 in record
order, with `<split>.json` beside it naming what it was computed from: the
dataset (its dataset.json), the image size, the resize mode, the stem's
stride and a hash of its weights. A later run (another seed, a resumed run)
reuses a cache whose description matches and recomputes one that does not;
the json is written last, so a computation cut short is redone.

It costs about 2 bytes x cells x channels a listing (MobileNetV2 at stride
32, 224 px: 7 x 7 x 1280, 125 KB), so it is meant for catalogues that one
host trains on. Float16 keeps 11 bits of each value; the ReLU6 features and
the linear bottlenecks stay far inside its range. Evaluation, `embed` and
serving still run the stem on the photo (in float32): the cache is a
training input only.
"""

import hashlib
import json
import logging
import os

import jax
import numpy as np
from etils import epath
from flax import nnx

from item_jax.data.indexed import IndexedSource

CACHE_DTYPE = np.float16
_BATCH = 64


def cells_dir(config, workdir) -> epath.Path:
  """Where the cache lives: data.stem_cells_dir, or WORKDIR/stem_cells."""
  configured = config.data.get("stem_cells_dir", "")
  return epath.Path(configured) if configured else epath.Path(workdir) / "stem_cells"


def _stem_hash(params) -> str:
  """sha256 of the stem's weights, in a fixed order."""
  stem = params["embeddings"]["image_stem"]
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(stem),
                           key=lambda item: jax.tree_util.keystr(item[0])):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()


def describe(settings, params) -> dict:
  """What a cache is computed from; a cache is reused only when it matches."""
  config, model = settings.config, settings.model
  dataset = (epath.Path(config.data.dir) / "dataset.json").read_bytes()
  return {"dataset": hashlib.sha256(dataset).hexdigest(),
          "split": config.data.split, "image_size": model.image_size,
          "resize": config.data.resize, "image_stem": model.image_stem,
          "stride": model.patch_size, "weights": _stem_hash(params),
          "cells": model.num_patches, "channels": model.image_token_input_dim,
          "dtype": np.dtype(CACHE_DTYPE).name}


def load_or_compute(settings, workdir, graphdef, params) -> np.ndarray:
  """The training split's cells, (records, cells, channels) float16, a
  read-only memmap: the cache when it matches, else computed now."""
  config = settings.config
  folder = cells_dir(config, workdir)
  split = config.data.split
  array_path, info_path = folder / f"{split}.npy", folder / f"{split}.json"
  wanted = describe(settings, params)
  if info_path.exists() and array_path.exists():
    if json.loads(info_path.read_text()) == wanted:
      logging.info("image stem cells: reusing %s", array_path)
      return np.load(str(array_path), mmap_mode="r")
    logging.info("image stem cells: %s was computed from other data, image "
                 "size or stem; computing again", array_path)
  folder.mkdir(parents=True, exist_ok=True)
  info_path.unlink(missing_ok=True)
  source = IndexedSource(
      config.data.dir, split, global_batch_size=1, seed=0,
      image_size=settings.model.image_size,
      max_title_len=config.data.max_title_len, resize=config.data.resize)
  stem = jax.jit(lambda params, images: nnx.merge(graphdef, params)
                 .embeddings.image_tokens_input(images, None))
  partial = folder / f"{split}.{os.getpid()}.partial.npy"
  cells = np.lib.format.open_memmap(
      str(partial), mode="w+", dtype=CACHE_DTYPE,
      shape=(source.num_records, wanted["cells"], wanted["channels"]))
  logging.info("image stem cells: computing %d listings' %d x %d cells into %s",
               source.num_records, wanted["cells"], wanted["channels"],
               array_path)
  for ids, images, usable in source.ordered_images(_BATCH):
    # A fixed batch shape: one compilation for the whole split.
    padded = np.zeros((_BATCH,) + images.shape[1:], np.float32)
    padded[:len(ids)] = images
    values = np.array(stem(params, padded)[:len(ids)])
    values[~usable] = 0.0
    cells[ids] = values.astype(CACHE_DTYPE)
  cells.flush()
  del cells
  os.replace(partial, array_path)
  info_path.write_text(json.dumps(wanted, indent=2))
  if source.skipped_records():
    logging.warning("image stem cells: %d records could not be read (their "
                    "cells are zeros; training skips them too)",
                    source.skipped_records())
  return np.load(str(array_path), mmap_mode="r")
