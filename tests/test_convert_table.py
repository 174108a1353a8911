"""The conversion engine's checks and transforms, and loading safety: a pickle
that would run code is refused before it runs."""

import json
import pickle

import numpy as np
import pytest

from item_jax.convert import (ConversionError, Layout, Rule, UnsafeCheckpointError, from_item,
                              read_tensors, to_item)
from item_jax.convert import table as table_lib
from item_jax.convert.hf_bert import read_checkpoint
from item_jax.model import patchify


def test_leftovers_are_errors_unless_the_table_gives_a_reason(caplog):
  layout = Layout("demo", (Rule("a", "x"), Rule("b", "y", table_lib.TRANSPOSE)),
                  ignored_sources={"buffers.*": "not weights"},
                  unset_targets={"c": "the outside has no c"})
  source = {"x": np.ones(2), "y": np.ones((3, 2)), "buffers.ids": np.arange(3)}
  shapes = {"a": (2,), "b": (2, 3), "c": (4,)}
  with caplog.at_level("INFO"):
    converted, report = to_item(layout, source, shapes, num_layers=0)
  assert sorted(converted) == ["a", "b"] and converted["b"].shape == (2, 3)
  assert report.unset == {"c": "the outside has no c"}
  assert report.ignored == {"buffers.ids": "not weights"}
  assert "left unset: c: the outside has no c" in caplog.text
  with pytest.raises(ConversionError, match="not set: d .no rule."):
    to_item(layout, source, {**shapes, "d": (1,)}, num_layers=0)
  with pytest.raises(ConversionError, match="not used: stray"):
    to_item(layout, {**source, "stray": np.ones(1)}, shapes, num_layers=0)
  with pytest.raises(ConversionError,
                     match=r"y \(3, 2\) -> b: \(2, 3\) after transpose, expected \(3, 2\)"):
    to_item(layout, source, {**shapes, "b": (3, 2)}, num_layers=0)
  with pytest.raises(ConversionError, match="no place for item-jax parameter z"):
    from_item(layout, {"a": np.ones(2), "b": np.ones((2, 3)), "z": np.ones(1)}, 0)


def test_conv_and_dense_patch_embeddings_agree_and_round_trip():
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)   # (out, in, kh, kw)
  image = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)    # NHWC
  transform = table_lib.conv_to_dense(4)
  kernel = transform.forward(weight, (48, 5))
  dense = np.asarray(patchify(image, 4)) @ kernel
  # The convolution, written out: patch (r, c) of image n, output channel o.
  conv = np.einsum("nrhcwi,oihw->nrco", image.reshape(2, 2, 4, 2, 4, 3), weight)
  np.testing.assert_allclose(dense, conv.reshape(2, 4, 5), atol=1e-5)
  np.testing.assert_array_equal(transform.backward(kernel, None), weight)


def test_a_row_goes_back_into_its_table():
  table = np.arange(12.0).reshape(4, 3)
  row = table_lib.take_row(2)
  np.testing.assert_array_equal(row.forward(table, (3,)), [6.0, 7.0, 8.0])
  written = row.backward(np.zeros(3), table)
  assert (written[2] == 0).all() and (written[[0, 1, 3]] == table[[0, 1, 3]]).all()
  assert table[2, 0] == 6.0


class _WritesAFile:
  """Unpickling this creates `path`: the proof that code ran."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (open, (self.path, "w"))


def test_a_pickle_that_runs_code_is_refused_and_does_not_run(tmp_path):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "code-ran"
  plain = tmp_path / "plain" / "pytorch_model.bin"
  plain.parent.mkdir()
  plain.write_bytes(pickle.dumps({"weight": _WritesAFile(marker)}, protocol=2))
  zipped = tmp_path / "zipped.pt"
  torch.save({"weight": _WritesAFile(marker)}, zipped)
  assert not marker.exists()
  for path in (plain, zipped):
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
      read_tensors(path)
    assert not marker.exists()
  # A BERT folder that offers only such a file is refused the same way.
  (plain.parent / "config.json").write_text(json.dumps(
      {"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2,
       "intermediate_size": 16, "vocab_size": 10}))
  with pytest.raises(UnsafeCheckpointError):
    read_checkpoint(plain.parent)
  assert not marker.exists()
  # The same payload under any other name is not even opened.
  other = tmp_path / "model.pkl"
  other.write_bytes(plain.read_bytes())
  with pytest.raises(UnsafeCheckpointError, match="only .safetensors"):
    read_tensors(other)
  assert not marker.exists()


def test_a_plain_state_dict_bin_reads_like_safetensors(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  tensors = {"a.weight": torch.randn(3, 2), "b": torch.randn(4).to(torch.bfloat16)}
  torch.save(tensors, tmp_path / "pytorch_model.bin")
  save_file(tensors, tmp_path / "model.safetensors")
  from_bin = read_tensors(tmp_path / "pytorch_model.bin")
  from_safetensors = read_tensors(tmp_path / "model.safetensors")
  for name in tensors:
    np.testing.assert_array_equal(from_bin[name], from_safetensors[name])
    np.testing.assert_array_equal(from_bin[name], tensors[name].float().numpy())


def test_the_layer_placeholder_expands_per_layer():
  layout = Layout("demo", (Rule("layers.{layer}.w", "encoder.{layer}.weight"),))
  assert [rule.source for rule in layout.expand(3)] == [
      "encoder.0.weight", "encoder.1.weight", "encoder.2.weight"]
