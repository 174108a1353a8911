"""Input pipeline throughput: examples/s of the training tf.data pipeline per CPU core.

Builds a catalogue of random-shape 256-px JPEG listings, runs `prepare`, then
times decode → resize → normalise → tokenise → batch after a warm-up.

  python benchmarks/input_pipeline.py --num_listings 2048 --batches 300

The last line is `input_pipeline_examples_per_s_per_core: <value>`.
"""

import argparse
import csv
import logging
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw

_WORDS = (
    "red blue green black white cotton leather steel wooden ceramic large small mini "
    "shirt shoe bag mug lamp chair table kettle vase cushion watch phone case cable "
    "charger bottle pack set of 2 3 4 new original premium classic slim"
).split()


def _draw_listing_image(rng: np.random.Generator, size: int) -> Image.Image:
  colour = lambda: tuple(int(c) for c in rng.integers(0, 256, 3))  # noqa: E731
  image = Image.new("RGB", (size, size), colour())
  draw = ImageDraw.Draw(image)
  for _ in range(rng.integers(2, 6)):
    x0, y0 = rng.integers(0, size - 16, 2)
    x1, y1 = x0 + rng.integers(16, size // 2), y0 + rng.integers(16, size // 2)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
    shape((int(x0), int(y0), int(x1), int(y1)), fill=colour())
  return image


def write_catalogue(directory: pathlib.Path, num_listings: int, image_side: int, seed: int = 0):
  """catalogue.csv + images/: one product per 4 listings, titles of 4-20 words."""
  rng = np.random.default_rng(seed)
  (directory / "images").mkdir(parents=True, exist_ok=True)
  with open(directory / "catalogue.csv", "w", newline="", encoding="utf-8") as file:
    writer = csv.writer(file)
    writer.writerow(["item_id", "title", "image", "product_id", "category"])
    for item in range(num_listings):
      name = f"{item:06d}.jpg"
      _draw_listing_image(rng, image_side).save(directory / "images" / name, quality=90)
      title = " ".join(rng.choice(_WORDS, rng.integers(4, 21)))
      category = f"Shop > Aisle {item % 7}"
      writer.writerow([f"item{item}", title, name, f"product{item // 4}", category])


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--num_listings", type=int, default=2048)
  parser.add_argument("--image_side", type=int, default=256)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--max_title_len", type=int, default=32)
  parser.add_argument("--resize", default="pad", choices=("pad", "crop"))
  parser.add_argument("--warmup_batches", type=int, default=30)
  parser.add_argument("--batches", type=int, default=300)
  parser.add_argument("--workdir", help="keep the generated data here (default: a temp dir)")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

  from item_jax.data import pipeline  # After the log level is set.
  from item_jax.data import prepare

  with tempfile.TemporaryDirectory() as temp_dir:
    workdir = pathlib.Path(args.workdir or temp_dir)
    started = time.perf_counter()
    write_catalogue(workdir, args.num_listings, args.image_side)
    prepare.prepare(
        str(workdir / "catalogue.csv"), str(workdir / "images"), str(workdir / "data"),
        num_shards=8, vocab_size=1000,
    )
    print(f"catalogue + prepare: {time.perf_counter() - started:.1f}s")

    dataset = pipeline.make_dataset(
        str(workdir / "data"), "train", args.batch_size, args.image_size, args.max_title_len,
        training=True, process_index=0, process_count=1, resize=args.resize,
    )
    batches = dataset.as_numpy_iterator()
    for _ in range(args.warmup_batches):
      next(batches)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
      next(batches)
    elapsed, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

  num_cores = len(os.sched_getaffinity(0))
  num_examples = args.batches * args.batch_size
  print(f"{args.batches} batches of {args.batch_size} in {elapsed:.2f}s: "
        f"{num_examples / elapsed:.0f} examples/s on {num_cores} cores")
  # Other processes on the machine take cores from the pipeline; CPU time
  # shows what one fully available core would do.
  print(f"{num_examples / cpu_seconds:.0f} examples per CPU-second "
        f"({cpu_seconds / elapsed:.2f} of {num_cores} cores busy)")
  print(f"input_pipeline_examples_per_s_per_core: {num_examples / elapsed / num_cores:.1f}")


if __name__ == "__main__":
  main()
