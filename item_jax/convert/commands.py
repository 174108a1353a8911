"""`item-jax convert ...`: one function per subcommand, each reading an outside
layout and writing a work directory (or the reverse), returning the reports.
"""

import json
import logging

from item_jax.convert import serving
from item_jax.convert import hf_bert, hf_vit, torch_layout
from item_jax.convert import workdir as workdir_lib
from item_jax.errors import OutputExistsError, UserError
from item_jax.train import image_stem


def hf_bert_to_workdir(checkpoint, workdir, image_size: int = 224,
                       patch_size: int = 16, config=None) -> list:
  """A Hugging Face BERT folder -> step 0 of a pre-training run in `workdir`.

  The image side's kind comes from `config` (model.image_stem,
  model.freeze_image_stem); a convolutional stem starts from its pretrained
  weights (`item_jax.train.image_stem`)."""
  seed = 0 if config is None else int(config.seed)
  image_side = {} if config is None else {
      field: config.model[field] for field in ("image_stem", "freeze_image_stem")
      if field in config.model}
  converted = hf_bert.convert_hf_bert(checkpoint, image_size, patch_size, seed,
                                      **image_side)
  params = {**converted.params,
            **image_stem.pretrained_stem_flat(converted.config, workdir)}
  workdir_lib.save_workdir(workdir, converted.config, params,
                           config=config, tokenizer=converted.tokenizer,
                           source=f"hf-bert:{checkpoint}")
  return [converted.report]


def hf_vit_into_workdir(checkpoint, workdir) -> list:
  """Sets the image side of a converted (step 0 only) workdir from a ViT."""
  model, params, step = workdir_lib.workdir_params(workdir)
  if model.image_stem != "patches":
    raise UserError(f"{workdir} makes image tokens with model.image_stem="
                    f"{model.image_stem!r}; a ViT brings its own patch embedding: "
                    "convert into a work directory whose config has "
                    "model.image_stem='patches'")
  if step != 0:
    raise OutputExistsError(f"{workdir} already holds checkpoints up to step {step}: "
                            "hf-vit sets the image side before pre-training")
  image_side, report = hf_vit.convert_hf_vit(checkpoint, model)
  # The workdir's tokenizer file stays where it is.
  workdir_lib.save_workdir(workdir, model, {**params, **image_side},
                           config=workdir_lib.workdir_config(workdir),
                           source=f"hf-vit:{checkpoint}", replace_initial=True)
  logging.info("hf-vit: image side of %s replaced", workdir)
  return [report]


def torch_to_workdir(checkpoint, workdir, config=None) -> list:
  """A torch reference checkpoint folder -> step 0 of a run in `workdir`."""
  model, params, report = torch_layout.read_torch_checkpoint(checkpoint)
  workdir_lib.save_workdir(workdir, model, params, config=config,
                           source=f"torch:{checkpoint}")
  return [report]


def workdir_to_torch(workdir, output, step: int | None = None) -> list:
  """A workdir's checkpoint -> a torch reference checkpoint folder."""
  model, params, _ = workdir_lib.workdir_params(workdir, step)
  return [torch_layout.write_torch_checkpoint(params, model, output)]


def export(workdir, output, step=None, tokenizer=None, export_format="item-jax") -> list:
  report = serving.export(workdir, output, step, tokenizer, export_format)
  print(f"exported {workdir} ({export_format}) to {output}")
  return [report] if report else []


def import_export(directory, workdir, config=None) -> list:
  serving.import_export(directory, workdir, config)
  print(f"imported {directory} as step 0 of {workdir}")
  return []


def reshard(workdir, output, mesh: str, num_devices: int | None = None,
            step: int | None = None) -> list:
  """`mesh` as "data=2,fsdp=4,model=1" (missing axes are 1)."""
  import jax
  shape = {}
  for part in mesh.split(","):
    axis, _, size = part.partition("=")
    if axis not in ("data", "fsdp", "model") or not size.isdigit():
      raise UserError(f"--mesh {mesh!r}: expected e.g. data=2,fsdp=4,model=1")
    shape[axis] = int(size)
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  restored = workdir_lib.reshard(workdir, output, shape, devices, step)
  print(f"step {restored.step} of {workdir} saved for mesh "
        f"{json.dumps(restored.settings.mesh_shape)} in {output}")
  return []

