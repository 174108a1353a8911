"""`item-jax convert LAYOUT`: checkpoints in and out of Hugging Face BERT/ViT,
the torch reference and the serving export, and resharding; one subcommand
per layout, each calling one function of `item_jax.convert.commands`."""

import os

from item_jax.cli.common import (add_debug_flag, at_least, need_file, need_folder,
                                 need_run, output_folder)
from item_jax.errors import UserError


def register(commands):
  convert = commands.add_parser(
      "convert", help="checkpoint conversion: Hugging Face BERT/ViT, the torch "
      "reference, serving exports, resharding")
  layouts = convert.add_subparsers(dest="layout", required=True)
  config_help = "train config FILE[:ARG] for the written run (default: the defaults)"

  def layout(name, help_text, checkpoint=None, config=False):
    sub = layouts.add_parser(name, help=help_text)
    if checkpoint:
      sub.add_argument("checkpoint", nargs="?" if name == "torch" else None,
                       help=checkpoint)
    sub.add_argument("--workdir", required=True, help="an item-jax work directory")
    if config:
      sub.add_argument("--config", default=None, help=config_help)
    sub.set_defaults(run=_convert, takes_overrides=True)
    return sub

  bert = layout("hf-bert", "BERT text side -> step 0 of a pre-training run",
                "a Hugging Face BERT folder (config.json, model.safetensors or "
                "pytorch_model.bin, vocab.txt)", config=True)
  bert.add_argument("--image-size", type=int, default=224)
  bert.add_argument("--patch-size", type=int, default=16)
  layout("hf-vit", "ViT patch embedding + image positions -> a converted "
         "workdir's image side", "a Hugging Face ViT folder")
  torch = layout("torch", "the torch reference <-> item-jax",
                 "a torch reference folder (model.safetensors + config.json) "
                 "to read into --workdir", config=True)
  torch.add_argument("--output", default=None,
                     help="write --workdir's checkpoint here in torch layout instead")
  torch.add_argument("--step", type=int, default=None)
  export = layout("export", "a checkpoint -> model.safetensors + config.json "
                  "(+ tokenizer) for serving")
  export.add_argument("--output", required=True)
  export.add_argument("--step", type=int, default=None, help="default: the latest")
  export.add_argument("--tokenizer", default=None,
                      help="default: the workdir's, or its data.dir's")
  export.add_argument("--format", choices=["item-jax", "hf-bert"], default="item-jax")
  layout("import", "an export -> step 0 of a run in --workdir",
         "an `export` output folder", config=True)
  reshard = layout("reshard", "restore a checkpoint onto another mesh and save it")
  reshard.add_argument("--output", required=True, help="the new work directory")
  reshard.add_argument("--mesh", required=True, help="e.g. data=2,fsdp=4,model=1")
  reshard.add_argument("--num-devices", type=int, default=None,
                       help="use the first N devices (default: all)")
  reshard.add_argument("--step", type=int, default=None)
  for sub in layouts.choices.values():
    add_debug_flag(sub)


def _convert(args, overrides):
  _check_convert_inputs(args)
  config = None
  if getattr(args, "config", None):
    from item_jax.train.config import load_config
    config = load_config(args.config, overrides)
  elif overrides:
    raise UserError("--config.* overrides need --config FILE[:ARG]")
  from item_jax.convert import commands
  if args.layout == "hf-bert":
    commands.hf_bert_to_workdir(args.checkpoint, args.workdir, args.image_size,
                                args.patch_size, config)
  elif args.layout == "hf-vit":
    commands.hf_vit_into_workdir(args.checkpoint, args.workdir)
  elif args.layout == "torch":
    if args.output:
      commands.workdir_to_torch(args.workdir, args.output, args.step)
    else:
      commands.torch_to_workdir(args.checkpoint, args.workdir, config)
  elif args.layout == "export":
    commands.export(args.workdir, args.output, args.step, args.tokenizer,
                    args.format)
  elif args.layout == "import":
    commands.import_export(args.checkpoint, args.workdir, config)
  else:
    commands.reshard(args.workdir, args.output, args.mesh, args.num_devices,
                     args.step)


def _check_convert_inputs(args):
  """What each layout reads must be there: the checkpoint folder, or the run
  in --workdir (the others write --workdir)."""
  at_least(args, image_size=1, patch_size=1, step=0, num_devices=1)
  layout = args.layout
  if layout == "torch" and (args.checkpoint is None) == (args.output is None):
    raise UserError("give either CHECKPOINT (torch -> --workdir) or --output "
                    "(--workdir -> torch)")
  if getattr(args, "checkpoint", None) is not None:
    need_folder("checkpoint", args.checkpoint)
    if layout in ("hf-bert", "torch", "import"):
      need_file("checkpoint", os.path.join(args.checkpoint, "config.json"))
  if layout in ("hf-vit", "export", "reshard") or (layout == "torch" and args.output):
    need_run("--workdir", args.workdir)
  else:
    output_folder("--workdir", args.workdir)
  if getattr(args, "tokenizer", None):
    need_file("--tokenizer", args.tokenizer)
