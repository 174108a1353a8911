"""Serving files: an item-jax checkpoint -> one model.safetensors (our own
parameter names, bit-exact) + config.json + the tokenizer, and back; or the
text side in Hugging Face BERT's layout (`--format hf-bert`).
"""

import dataclasses
import json

from etils import epath

from item_jax.convert import hf_bert
from item_jax.convert import tensors as tensors_lib
from item_jax.convert import workdir as workdir_lib
from item_jax.data.tokenizer import load_tokenizer
from item_jax.errors import UserError
from item_jax.model import ItemModel, ModelConfig

FORMAT = "item-jax"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def find_tokenizer(workdir) -> str | None:
  """The tokenizer a workdir was trained with: its own copy (converted
  models), else the one `prepare` wrote into the config's data.dir."""
  workdir = epath.Path(workdir)
  for name in TOKENIZER_FILES:
    if (workdir / name).exists():
      return str(workdir / name)
  data_dir = workdir_lib.workdir_config(workdir).data.dir
  if data_dir and (epath.Path(data_dir) / "dataset.json").exists():
    info = json.loads((epath.Path(data_dir) / "dataset.json").read_text())
    return str(epath.Path(data_dir) / info["tokenizer"])
  return None


def write_export(params: dict, config: ModelConfig, output, tokenizer=None,
                 step: int | None = None) -> epath.Path:
  """model.safetensors + config.json (+ the tokenizer) in `output`."""
  output = epath.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  tensors_lib.write_safetensors(params, output / WEIGHTS_FILE,
                                metadata={"format": FORMAT})
  info = {"format": FORMAT, "step": step, "model": dataclasses.asdict(config),
          "tokenizer": tokenizer.save(output) if tokenizer is not None else None}
  (output / "config.json").write_text(json.dumps(info, indent=2))
  return output


def export(workdir, output, step: int | None = None, tokenizer_path: str | None = None,
           export_format: str = FORMAT):
  """A workdir's checkpoint (default: latest) -> serving files in `output`.

  `export_format` "item-jax": every parameter under its own name; "hf-bert": the
  text side as a BERT checkpoint folder. Returns the hf-bert conversion
  Report, or None.
  """
  config, params, step = workdir_lib.workdir_params(workdir, step)
  tokenizer_path = tokenizer_path or find_tokenizer(workdir)
  tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
  if export_format == FORMAT:
    write_export(params, config, output, tokenizer, step)
    return None
  if export_format == "hf-bert":
    return hf_bert.export_hf_bert(params, config, output, tokenizer)
  raise UserError(f"unknown export format {export_format!r}: expected 'item-jax' or 'hf-bert'")


def read_export(directory):
  """(ModelConfig, {name: array}, tokenizer path or None) of an export."""
  directory = epath.Path(directory)
  info = json.loads((directory / "config.json").read_text())
  if info.get("format") != FORMAT:
    raise UserError(f"{directory}/config.json is not an item-jax export "
                    f"(format={info.get('format')!r})")
  config = ModelConfig(**info["model"])
  params = tensors_lib.read_tensors(directory / WEIGHTS_FILE)
  expected = tensors_lib.param_shapes(config)
  wrong = {name: (tuple(params[name].shape) if name in params else None)
           for name, shape in expected.items()
           if name not in params or tuple(params[name].shape) != shape}
  extra = sorted(set(params) - set(expected))
  if wrong or extra:
    raise UserError(f"{directory}/{WEIGHTS_FILE} does not fit its config: "
                    f"missing or misshaped {sorted(wrong)[:5]}, extra {extra[:5]}")
  tokenizer = directory / info["tokenizer"] if info.get("tokenizer") else None
  return config, params, (str(tokenizer) if tokenizer else None)


def load_model(directory) -> ItemModel:
  """The exported model, ready to embed (`model.embed(title_ids, image)`)."""
  config, params, _ = read_export(directory)
  return tensors_lib.model_from_params(params, config)


def import_export(directory, workdir, config=None) -> epath.Path:
  """An export -> step 0 of a fresh run in `workdir` (fresh optimizer state)."""
  model, params, tokenizer_path = read_export(directory)
  tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
  return workdir_lib.save_workdir(workdir, model, params, config=config,
                                  tokenizer=tokenizer, source=str(directory))
