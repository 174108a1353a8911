"""Configs: loading, overrides, and every bad value named before any compute."""

import pytest

from item_jax.train.config import load_config, resolve_mesh_shape, validate


@pytest.fixture(scope="module")
def data_dir(prepared_catalogue):
  return str(prepared_catalogue[1])


def _config(*overrides):
  return load_config("configs/item_tiny.py:runlocal", list(overrides))


def test_both_configs_load_and_validate(data_dir):
  for spec in ("configs/item_tiny.py", "configs/item_base.py",
               "configs/item_base.py:runlocal"):
    config = load_config(spec, [f"--config.data.dir={data_dir}"])
    settings = validate(config, num_devices=8)
    assert settings.model.vocab_size == settings.dataset["vocab_size"]
  base = load_config("configs/item_base.py", [f"--config.data.dir={data_dir}"])
  settings = validate(base, num_devices=8)
  assert (settings.model.num_layers, settings.model.hidden_size) == (12, 768)
  assert base.global_batch_size == 512 and base.total_steps == 100_000


def test_overrides_reach_nested_fields_with_their_types(data_dir):
  config = _config("--config.optimizer.learning_rate=3e-4", "--config.mesh.fsdp=4",
                   "--config.model.dtype=bfloat16", f"--config.data.dir={data_dir}")
  settings = validate(config, num_devices=8)
  assert settings.optimizer.learning_rate == 3e-4
  assert settings.mesh_shape == {"data": 2, "fsdp": 4, "model": 1}
  assert settings.model.dtype == "bfloat16"


@pytest.mark.parametrize("override, message", [
    ("--config.optimizer.lr=1", "unknown config field 'optimizer.lr'"),
    ("--config.colour=1", "unknown config field 'colour'"),
    ("--config.total_steps=many", "total_steps"),
    ("--config.optimizer.learning_rate", "not of the form"),
])
def test_bad_overrides_name_the_field(override, message):
  with pytest.raises(ValueError, match=message):
    _config(override)


@pytest.mark.parametrize("overrides, message", [
    (["--config.global_batch_size=12"], "global_batch_size=12 .* data-parallel size 8"),
    (["--config.mesh.data=3"], "config.mesh"),
    (["--config.model.size='huge'"], "model.size='huge'"),
    (["--config.model.patch_size=7"], "not divisible by model.patch_size"),
    (["--config.objectives.mlm_weight=-1.0"], "objectives.mlm_weight"),
    (["--config.optimizer.decay='step'"], "optimizer.decay"),
    (["--config.data.split='dev'"], "config.data.split='dev'"),
    (["--config.grad_accumulation_steps=3"], "grad_accumulation_steps=3"),
    (["--config.eval_every_steps=-1"], "eval_every_steps=-1 must be >= 0"),
    (["--config.eval_num_examples=0"], "eval_num_examples=0"),
])
def test_bad_values_fail_before_compute(data_dir, overrides, message):
  with pytest.raises(ValueError, match=message):
    validate(_config(f"--config.data.dir={data_dir}", *overrides), num_devices=8)


def test_a_missing_data_dir_is_named(tmp_path):
  with pytest.raises(ValueError, match="config.data.dir is not set"):
    validate(_config(), num_devices=8)
  with pytest.raises(ValueError, match="no dataset.json"):
    validate(_config(f"--config.data.dir={tmp_path}"), num_devices=8)


def test_mesh_shapes_resolve_one_free_axis():
  assert resolve_mesh_shape({"data": -1, "fsdp": 2, "model": 1}, 8) == {
      "data": 4, "fsdp": 2, "model": 1}
  with pytest.raises(ValueError, match="only one axis may be -1"):
    resolve_mesh_shape({"data": -1, "fsdp": -1, "model": 1}, 8)
  with pytest.raises(ValueError, match="uses 4 devices, but 8"):
    resolve_mesh_shape({"data": 2, "fsdp": 2, "model": 1}, 8)


def _title_only_copy(data_dir, tmp_path):
  """dataset.json of `data_dir` as if every listing had only a title."""
  import json
  import pathlib
  info = json.loads((pathlib.Path(data_dir) / "dataset.json").read_text())
  for split in info["splits"].values():
    split["listings"] = {"title_and_image": 0, "title_only": split["count"],
                         "image_only": 0}
  (tmp_path / "dataset.json").write_text(json.dumps(info))
  return str(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    ([], r"objectives.itm_weight=1.0 needs titles and images, but no listing of "
         r"the 'train' split .* has an image"),
    (["--config.objectives.itm_weight=0", "--config.objectives.mim_weight=0"],
     "objectives.gmim_weight=1.0 needs images"),
    (["--config.objectives.itm_weight=0", "--config.objectives.mim_weight=0",
      "--config.objectives.gmim_weight=0", "--config.objectives.itc_weight=1",
      "--config.objectives.itc_pairs='title:image,joint:image'"],
     "every pair needs an input .* use joint:title"),
])
def test_image_tasks_on_a_title_only_dataset_fail_before_compute(
    data_dir, tmp_path, overrides, message):
  titles = _title_only_copy(data_dir, tmp_path)
  with pytest.raises(ValueError, match=message):
    validate(_config(f"--config.data.dir={titles}", *overrides), num_devices=8)


def test_the_recommended_recipe_validates_on_titles_alone(data_dir, tmp_path, caplog):
  titles = _title_only_copy(data_dir, tmp_path)
  config = load_config("configs/item_recommended.py",
                       [f"--config.data.dir={titles}"])
  settings = validate(config, num_devices=8)
  assert settings.objectives.itc_weight > 0
  assert "title:image, joint:image contrast nothing" in caplog.text


def test_a_text_view_needs_text_columns_and_a_length_that_fits(data_dir, tmp_path):
  pairs = ["--config.objectives.itc_weight=1",
           "--config.objectives.itc_pairs='title:text'"]
  with pytest.raises(ValueError, match="prepared without them: run `item-jax prepare "
                                       r"\.\.\. --text-columns"):
    validate(_config(f"--config.data.dir={data_dir}", *pairs), num_devices=8)
  import json
  import pathlib
  info = json.loads((pathlib.Path(data_dir) / "dataset.json").read_text())
  (tmp_path / "dataset.json").write_text(json.dumps({**info, "text_columns": ["d"]}))
  settings = validate(_config(f"--config.data.dir={tmp_path}", *pairs), num_devices=8)
  assert settings.text_len == settings.config.data.max_text_len == 64
  assert validate(_config(f"--config.data.dir={tmp_path}"), num_devices=8).text_len == 0
  with pytest.raises(ValueError, match="max_text_len=4000"):
    validate(_config(f"--config.data.dir={tmp_path}", *pairs,
                     "--config.data.max_text_len=4000"), num_devices=8)


def test_every_field_of_the_parts_can_be_set_from_a_config():
  """A dataclass field the config lacks could not be set by a recipe or a
  --config.* override. (The model's sizes come from `model.size`'s preset.)"""
  import dataclasses
  from item_jax.objectives import ObjectiveConfig
  from item_jax.train.optimizer import OptimizerConfig
  config = load_config("configs/item_tiny.py")
  for part, cls in (("objectives", ObjectiveConfig), ("optimizer", OptimizerConfig)):
    fields = {field.name for field in dataclasses.fields(cls) if field.init}
    # The schedule's length is the run's (config.total_steps).
    missing = fields - set(config[part].keys()) - {"total_steps"}
    assert not missing, (part, sorted(missing))
