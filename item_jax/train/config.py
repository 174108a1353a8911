"""Training configs: the shared defaults, loading `FILE[:ARG]` with overrides, and
validation that turns each section into its constructor's arguments.

`model` -> ModelConfig, `objectives` -> ObjectiveConfig, `optimizer` ->
OptimizerConfig, `mesh` -> the device mesh, `data` -> the input pipeline.
Everything is checked here, before any device work starts.
"""

import ast
import dataclasses
import importlib.util
import json
import logging

import ml_collections
from etils import epath

from item_jax.errors import MissingInputError, UserError
from item_jax.model import ModelConfig, model_config
from item_jax.model.config import STEM_STRIDES
from item_jax.objectives import ObjectiveConfig
from item_jax.train.optimizer import OptimizerConfig


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 100_000
  config.global_batch_size = 512
  config.log_every_steps = 100
  # Also log each task's own gradient norm and its share of their sum
  # (train/grad_norm_<task>, train/grad_share_<task>) at log steps: one extra
  # backward pass per task on those steps.
  config.log_task_gradients = False
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  # Gradient accumulation: the global batch is split into this many micro-batches.
  config.grad_accumulation_steps = 1
  # Stop after this many consecutive non-finite steps (updates are never applied).
  config.max_nonfinite_steps = 5
  # Profile `profile_num_steps` steps from `profile_start_step` (-1: never).
  config.profile_start_step = -1
  config.profile_num_steps = 5
  # Same-product retrieval on the first `eval_num_examples` validation
  # listings every `eval_every_steps` steps (0: never), as eval/... scalars.
  config.eval_every_steps = 0
  config.eval_num_examples = 1000

  config.data = ml_collections.ConfigDict()
  config.data.dir = ml_collections.FieldReference(None, field_type=str)
  config.data.split = "train"
  config.data.max_title_len = 40
  # Tokens of the listing's other text columns that ITC's "text" view reads
  # (objectives.itc_pairs with "text"; the dataset prepared with
  # --text-columns). Read only in training.
  config.data.max_text_len = 64
  config.data.resize = "pad"        # aspect-preserving resize, then pad or crop
  config.data.num_parallel_reads = 8
  # A frozen convolutional stem's cells: "step" computes them in every step
  # from the decoded photo; "cached" once per listing of the training split
  # before the first step (kept in stem_cells_dir, default WORKDIR/stem_cells,
  # reused while the data, stem and image size match), so the step reads them
  # as data. One host only; no MIM/GMIM (they mask pixels).
  config.data.stem_cells = "step"
  config.data.stem_cells_dir = ""

  config.model = ml_collections.ConfigDict()
  config.model.size = "base"
  config.model.image_size = 224
  config.model.patch_size = 16
  config.model.dtype = "float32"    # "bfloat16": bf16 compute, fp32 master weights
  config.model.remat = "none"       # "block" or "full": recompute in the backward pass
  config.model.dropout_rate = 0.1
  config.model.layer_norm_eps = 1e-12
  config.model.attention_implementation = ml_collections.FieldReference(
      None, field_type=str)
  # "patches" (the paper's linear patch embedding) or "mobilenet_v2" (ImageNet
  # MobileNetV2 cut at stride patch_size: 8, 16 or 32), frozen or fine-tuned
  # (optimizer.image_stem_learning_rate_scale).
  config.model.image_stem = "patches"
  config.model.freeze_image_stem = True

  config.objectives = ml_collections.ConfigDict()
  # The paper's five tasks at weight 1; ITC (image-text contrastive) off.
  for task in ("itm", "mlm", "mim", "gmlm", "gmim"):
    config.objectives[f"{task}_weight"] = 1.0
  config.objectives.itc_weight = 0.0
  config.objectives.itc_pairs = "title:image"
  config.objectives.token_mask_rate = 0.15
  config.objectives.patch_mask_ratio = 0.4
  config.objectives.patch_mask_block_size = 2
  config.objectives.itm_negative_rate = 0.5
  config.objectives.normalize_patch_targets = True
  config.objectives.joint_image_dropout = 0.0
  config.objectives.joint_title_dropout = 0.0
  # ITC's "crop" view: the smallest share of the photo a crop keeps.
  config.objectives.crop_min_area = 0.4
  # Stem neighbourhoods (convolutional stems): the image view's in-batch
  # neighbours taught those of the frozen stem's pooled features; 0 is off.
  config.objectives.stem_kd_weight = 0.0
  config.objectives.stem_kd_temperature = 0.1

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 10_000
  config.optimizer.decay = "linear"
  config.optimizer.end_learning_rate = 0.0
  config.optimizer.weight_decay = 0.01
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-6
  config.optimizer.grad_clip_norm = 1.0
  # < 1: the pretrained text side learns slower than the fresh image side.
  config.optimizer.text_learning_rate_scale = 1.0
  # A fine-tuned image stem's rate against the rest (forced to 0 when
  # model.freeze_image_stem).
  config.optimizer.image_stem_learning_rate_scale = 1.0

  # Device mesh: one axis may be -1 (all remaining devices).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.model = 1
  return config


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` and applies `--config.a.b=value` overrides."""
  path, _, arg = spec.partition(":")
  if not epath.Path(path).is_file():
    raise MissingInputError(f"config file {path} does not exist (configs/ "
                            "holds the shipped ones)")
  module_spec = importlib.util.spec_from_file_location("item_jax_user_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} has no get_config(arg) function")
  config = module.get_config(arg or None)
  for override in overrides:
    apply_override(config, override)
  return config


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Applies one `--config.a.b=value` (or `a.b=value`) to `config` in place."""
  name, equals, text = override.removeprefix("--").removeprefix("config.").partition("=")
  if not equals:
    raise UserError(f"config override {override!r} is not of the form "
                    "--config.field=value")
  *parents, leaf = name.split(".")
  node = config
  for depth, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise UserError(f"unknown config field {'.'.join(parents[:depth + 1])!r} "
                      f"(in override {override!r})")
    node = node[part]
  if leaf not in node:
    raise UserError(f"unknown config field {name!r}; known at that level: "
                    f"{sorted(node.keys())}")
  try:
    node[leaf] = _parse_value(text)
  except TypeError as error:
    raise UserError(f"config field {name!r}: {error}") from None


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """A validated config, split into the constructors' arguments."""

  model: ModelConfig
  objectives: ObjectiveConfig
  optimizer: OptimizerConfig
  mesh_shape: dict
  config: ml_collections.ConfigDict
  dataset: dict      # the `prepare` output's dataset.json

  @property
  def text_len(self) -> int:
    """Tokens of the text view in a training batch; 0 when no ITC pair reads
    it (the batch then has no text_ids)."""
    reads = self.objectives.itc_weight > 0 and any(
        "text" in pair for pair in self.objectives.itc_view_pairs())
    return int(self.config.data.max_text_len) if reads else 0

  @property
  def cached_stem_cells(self) -> bool:
    """The step reads a frozen stem's cells from a per-listing cache
    (`data.stem_cells = "cached"`) instead of running the stem."""
    return self.config.data.get("stem_cells", "step") == "cached"


def _fields_of(section: ml_collections.ConfigDict, name: str, cls, **extra):
  known = {field.name for field in dataclasses.fields(cls)}
  values = section.to_dict()
  unknown = sorted(set(values) - known)
  if unknown:
    raise UserError(f"unknown config field(s) {[f'{name}.{u}' for u in unknown]}")
  try:
    return cls(**values, **extra)
  except (TypeError, ValueError) as error:
    raise UserError(f"config section '{name}': {error}") from None


def validate(config: ml_collections.ConfigDict, num_devices: int,
             process_count: int = 1) -> TrainSettings:
  """Checks every field that can fail, and builds the typed settings."""
  _check_counts(config)
  return _settings(config, _read_dataset_info(config), num_devices, process_count)


def validate_without_data(config: ml_collections.ConfigDict, vocab_size: int,
                          num_devices: int,
                          process_count: int = 1) -> TrainSettings:
  """`validate` for work that reads no data (ahead-of-time compilation): the
  vocabulary size is given instead of read from `data.dir`'s dataset.json."""
  _check_counts(config)
  return _settings(config, {"vocab_size": int(vocab_size)}, num_devices,
                   process_count)


def _check_stem_cells(config: ml_collections.ConfigDict, model: ModelConfig,
                      objectives: ObjectiveConfig, process_count: int) -> None:
  mode = config.data.get("stem_cells", "step")
  if mode not in ("step", "cached"):
    raise UserError(f"config.data.stem_cells={mode!r}: expected 'step' or "
                    "'cached'")
  if mode == "step":
    return
  why = None
  if model.image_stem == "patches":
    why = ("model.image_stem='patches' has no stem to cache (the patch "
           "embedding costs nothing to run)")
  elif not model.freeze_image_stem:
    why = ("model.freeze_image_stem=False: a stem that learns changes its "
           "cells every step")
  elif objectives.mim_weight > 0 or objectives.gmim_weight > 0:
    why = ("MIM/GMIM mask pixels before the stem, which cached cells cannot "
           "do: set objectives.mim_weight and gmim_weight to 0")
  elif objectives.itc_weight > 0 and any(
      "crop" in pair for pair in objectives.itc_view_pairs()):
    why = (f"objectives.itc_pairs={objectives.itc_pairs!r}: the crop view "
           "crops the photos' pixels, which cached cells no longer have")
  elif process_count > 1:
    why = (f"{process_count} processes: the cache is one host's (on "
           "accelerators the frozen stem is a small part of the step)")
  if why:
    raise UserError(f"config.data.stem_cells='cached': {why}")


def _check_counts(config: ml_collections.ConfigDict) -> None:
  for name in ("total_steps", "global_batch_size", "log_every_steps",
               "checkpoint_every_steps", "keep_checkpoints",
               "grad_accumulation_steps", "max_nonfinite_steps"):
    if int(config[name]) <= 0:
      raise UserError(f"config.{name}={config[name]} must be > 0")
  if int(config.eval_every_steps) < 0:
    raise UserError(f"config.eval_every_steps={config.eval_every_steps} must "
                    "be >= 0 (0: no evaluation during training)")
  if int(config.eval_num_examples) <= 0:
    raise UserError(f"config.eval_num_examples={config.eval_num_examples} "
                    "must be > 0")


def _read_dataset_info(config: ml_collections.ConfigDict) -> dict:
  """The `prepare` output's dataset.json at data.dir, with the split checked."""
  data_dir = config.data.dir
  if not data_dir:
    raise UserError("config.data.dir is not set: point it at a `prepare` "
                    "output folder (--config.data.dir=...)")
  dataset_file = epath.Path(data_dir) / "dataset.json"
  if not dataset_file.exists():
    raise UserError(f"config.data.dir={data_dir}: no dataset.json there; run "
                    "`item-jax prepare` first")
  dataset = json.loads(dataset_file.read_text())
  if config.data.split not in dataset.get("splits", {}):
    raise UserError(f"config.data.split={config.data.split!r} is not in "
                    f"{dataset_file} (splits: {sorted(dataset.get('splits', {}))})")
  if config.eval_every_steps and "validation" not in dataset["splits"]:
    raise UserError(f"config.eval_every_steps={config.eval_every_steps} needs "
                    f"a validation split in {dataset_file}")
  return dataset


def _settings(config: ml_collections.ConfigDict, dataset: dict,
              num_devices: int, process_count: int) -> TrainSettings:
  if config.data.resize not in ("pad", "crop"):
    raise UserError(f"config.data.resize={config.data.resize!r}: expected "
                    "'pad' or 'crop'")

  model_fields = config.model.to_dict()
  size = model_fields.pop("size")
  model_fields.setdefault("vocab_size", dataset["vocab_size"])
  try:
    model = model_config(size, **model_fields)
  except (TypeError, ValueError) as error:
    raise UserError(f"config section 'model': {error}") from None
  if config.data.max_title_len + 1 > model.max_title_positions:
    raise UserError(f"config.data.max_title_len={config.data.max_title_len} "
                    f"does not fit model.max_title_positions={model.max_title_positions}")
  objectives = _fields_of(config.objectives, "objectives", ObjectiveConfig)
  _check_stem_cells(config, model, objectives, process_count)
  if objectives.stem_kd_weight and model.image_stem == "patches":
    raise UserError(
        f"config.objectives.stem_kd_weight={objectives.stem_kd_weight} needs a "
        "convolutional image stem (model.image_stem='mobilenet_v2'): the patch "
        "embedding has no pretrained features to keep")
  if objectives.stem_kd_weight and model.patch_size < max(STEM_STRIDES):
    logging.warning(
        "objectives.stem_kd_weight with the stem cut at stride %d: the teacher "
        "is MobileNetV2's intermediate features, not its embedding (stride %d); "
        "on the hard synthetic split at stride 16 it lowered the image view "
        "(BENCHMARKS.md, 'Keeping what ImageNet tells apart')",
        model.patch_size, max(STEM_STRIDES))
  _check_text_view(objectives, dataset, config, model)
  _check_inputs(objectives, dataset, config)
  optimizer = _fields_of(config.optimizer, "optimizer", OptimizerConfig,
                         total_steps=int(config.total_steps))
  if model.image_stem != "patches" and model.freeze_image_stem:
    # A frozen stem takes no update at all: not even weight decay.
    optimizer = dataclasses.replace(optimizer, image_stem_learning_rate_scale=0.0)

  mesh_shape = resolve_mesh_shape(config.mesh.to_dict(), num_devices)
  batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
  batch = int(config.global_batch_size)
  accumulation = int(config.grad_accumulation_steps)
  if batch % accumulation:
    raise UserError(f"config.global_batch_size={batch} is not divisible by "
                    f"config.grad_accumulation_steps={accumulation}")
  if (batch // accumulation) % batch_shards:
    raise UserError(
        f"config.global_batch_size={batch} (per micro-batch {batch // accumulation})"
        f" is not divisible by the data-parallel size {batch_shards} "
        f"(mesh data={mesh_shape['data']} x fsdp={mesh_shape['fsdp']})")
  if batch % process_count:
    raise UserError(f"config.global_batch_size={batch} is not divisible by "
                    f"the process count {process_count}")
  return TrainSettings(model, objectives, optimizer, mesh_shape, config, dataset)


# The inputs each task reads; an ITC view reads its own ("joint": either).
TASK_INPUTS = {"itm": ("title", "image"), "mlm": ("title",), "gmlm": ("title",),
               "mim": ("image",), "gmim": ("image",)}


def _check_inputs(objectives: ObjectiveConfig, dataset: dict,
                  config: ml_collections.ConfigDict) -> None:
  """Refuses a task whose inputs no training listing has (a title-only
  catalogue and an image task): it would train on nothing."""
  counts = dataset.get("splits", {}).get(config.data.split, {}).get("listings")
  if counts is None:  # datasets prepared before single-input listings
    return
  present = {"title": counts["title_and_image"] + counts["title_only"],
             "image": counts["title_and_image"] + counts["image_only"],
             "text": bool(dataset.get("text_columns"))}
  where = lambda what: (f"no listing of the {config.data.split!r} split of "
                        f"{config.data.dir} has {what} (dataset.json: {counts})")
  for task, inputs in TASK_INPUTS.items():
    missing = [name for name in inputs if not present[name]]
    if objectives.weight(task) > 0 and missing:
      article = "an" if missing[0] == "image" else "a"
      raise UserError(f"config.objectives.{task}_weight={objectives.weight(task)} "
                      f"needs {' and '.join(name + 's' for name in inputs)}, but "
                      f"{where(f'{article} {missing[0]}')}; set it to 0")
  if objectives.itc_weight > 0:
    usable = lambda view: (present["title"] or present["image"]) if view == "joint" \
        else present["image" if view == "crop" else view]
    pairs = objectives.itc_view_pairs()
    idle = [f"{a}:{b}" for a, b in pairs if not (usable(a) and usable(b))]
    if len(idle) == len(pairs):
      raise UserError(f"config.objectives.itc_pairs={objectives.itc_pairs!r}: "
                      f"every pair needs an input that {where('')}; use "
                      "joint:title (the masked "
                      "title against the clean one) or set objectives.itc_weight=0")
    if idle:
      logging.warning("objectives.itc_pairs: %s contrast nothing on this data "
                      "(dataset.json: %s); they count as 0 in the ITC mean",
                      ", ".join(idle), counts)


def _check_text_view(objectives: ObjectiveConfig, dataset: dict,
                     config: ml_collections.ConfigDict, model) -> None:
  """ITC's "text" view needs text columns in the records and a length that
  fits the title positions."""
  if not (objectives.itc_weight > 0 and any(
      "text" in pair for pair in objectives.itc_view_pairs())):
    return
  if "splits" in dataset and not dataset.get("text_columns"):   # data read
    raise UserError(f"config.objectives.itc_pairs={objectives.itc_pairs!r} "
                    f"reads the listings' other text columns, but "
                    f"{config.data.dir} was prepared without them: run `item-jax "
                    "prepare ... --text-columns COLUMN[,COLUMN]`")
  length = int(config.data.max_text_len)
  if length < 2 or length + 1 > model.max_title_positions:
    raise UserError(f"config.data.max_text_len={length} must be at least 2 and "
                    f"fit model.max_title_positions={model.max_title_positions}")


def resolve_mesh_shape(mesh: dict, num_devices: int) -> dict:
  """Fills the one -1 axis so that data * fsdp * model == num_devices."""
  axes = ("data", "fsdp", "model")
  unknown = sorted(set(mesh) - set(axes))
  if unknown:
    raise UserError(f"unknown config field(s) {[f'mesh.{u}' for u in unknown]}")
  shape = {axis: int(mesh.get(axis, 1)) for axis in axes}
  free = [axis for axis in axes if shape[axis] == -1]
  if len(free) > 1:
    raise UserError(f"config.mesh: only one axis may be -1, got {free}")
  if any(size == 0 or size < -1 for size in shape.values()):
    raise UserError(f"config.mesh={shape}: sizes must be positive or -1")
  fixed = 1
  for axis in axes:
    if shape[axis] != -1:
      fixed *= shape[axis]
  if free:
    if num_devices % fixed:
      raise UserError(f"config.mesh={shape} does not divide {num_devices} devices")
    shape[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(f"config.mesh={shape} uses {fixed} devices, but "
                    f"{num_devices} are present")
  return shape
