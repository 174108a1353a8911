"""`prepare`'s two drivers on one synthetic catalogue: rows/s (per core) and
peak memory, the local converter against Apache Beam.

  python benchmarks/prepare_drivers.py --listings 100000,1000000 --workers 2

Writes a catalogue of `--listings` rows (titles of a few words, a product
per 3 rows, 40 leaf categories, one row in 500 with a broken photo and one
in 1,000 repeating an earlier item id) whose photos come from a pool of
`--photos` 128 px JPEGs, re-encoded to `--max-image-side` as a real
catalogue's are. Then, for each size, runs in alternating turns (one fresh
process each, so that peak memory is the run's own) `prepare` with the local
driver (`--workers` image processes) and with Beam's FnApiRunner
(`direct_num_workers=--workers`, multi_processing), and checks that the two
datasets are the same bytes. Peak memory: the driver process's maximum
resident set (getrusage), and the largest sum of resident sets over the
whole process tree (driver, image processes or Beam workers; /proc sampled
every 0.2 s), what the job asks of the machine. The last line is
`beam_over_local_rows_per_s_<listings>: <ratio>` for the largest size.
"""

import argparse
import csv
import filecmp
import json
import pathlib
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from PIL import Image

WORDS = ("cotton linen wool denim shirt dress lamp mug chair desk sofa kettle "
         "red blue green black white grey small large slim classic").split()


def write_catalogue(folder: pathlib.Path, listings: int, photos: int) -> pathlib.Path:
  rng = random.Random(0)
  (folder / "images").mkdir(parents=True, exist_ok=True)
  for index in range(photos):
    colour = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (128, 96), colour)
    image.paste(tuple(255 - c for c in colour), (16, 16, 80, 64))
    image.save(folder / "images" / f"{index}.jpg", quality=92)
  (folder / "images" / "broken.jpg").write_bytes(b"not a photo" * 10)
  path = folder / "catalogue.csv"
  with path.open("w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["item_id", "title", "image", "product_id", "category"])
    for row in range(listings):
      item_id = f"item-{row - 7}" if row % 1000 == 999 else f"item-{row}"
      title = " ".join(rng.choice(WORDS) for _ in range(6)) + f" {row // 3}"
      image = "broken.jpg" if row % 500 == 499 else f"{rng.randrange(photos)}.jpg"
      writer.writerow([item_id, title, image, f"P{row // 3}",
                       f"Home > Leaf {(row // 3) % 40}"])
  return path


def run_once(driver: str, catalogue: str, output: str, workers: int,
             max_image_side: int) -> dict:
  """One conversion in this process; prints what it measured as json."""
  from item_jax.data import prepare
  converter = None
  if driver == "beam":
    from item_jax.data import beam_prepare
    converter = beam_prepare.converter(
        "FnApiRunner", {"direct_num_workers": str(workers),
                        "direct_running_mode": "multi_processing"})
  started = time.perf_counter()
  info = prepare.prepare(catalogue, str(pathlib.Path(catalogue).parent / "images"),
                         output, num_shards=16, vocab_size=500, num_workers=workers,
                         max_image_side=max_image_side, converter=converter)
  seconds = time.perf_counter() - started
  return {"seconds": seconds,
          "kept": sum(split["count"] for split in info["splits"].values()),
          "skipped": info["num_skipped"],
          "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def tree_rss_mib(root: int) -> float:
  """The resident sets of `root` and its descendants, summed (Linux /proc)."""
  parents, rss = {}, {}
  for entry in pathlib.Path("/proc").iterdir():
    if not entry.name.isdigit():
      continue
    try:
      fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
      parents[int(entry.name)] = int(fields[1])
      rss[int(entry.name)] = int(fields[21]) * resource.getpagesize()
    except (OSError, IndexError, ValueError):
      continue
  tree, frontier = {root}, [root]
  while frontier:
    parent = frontier.pop()
    children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
    tree.update(children)
    frontier.extend(children)
  return sum(rss.get(pid, 0) for pid in tree) / 2**20


def measured_run(command: list[str]) -> tuple[str, float]:
  """(stdout, the peak of `tree_rss_mib`) of a command run to its end."""
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
  peak, done = [0.0], threading.Event()

  def sample():
    while not done.wait(0.2):
      peak[0] = max(peak[0], tree_rss_mib(process.pid))
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  stdout, _ = process.communicate()
  done.set()
  sampler.join()
  if process.returncode:
    raise subprocess.CalledProcessError(process.returncode, command)
  return stdout, peak[0]


def same_dataset(first: pathlib.Path, second: pathlib.Path) -> bool:
  names = sorted(path.name for path in first.iterdir())
  if names != sorted(path.name for path in second.iterdir()):
    return False
  return all(filecmp.cmp(first / name, second / name, shallow=False) for name in names)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--listings", default="100000,1000000",
                      help="comma-separated catalogue sizes")
  parser.add_argument("--photos", type=int, default=2000)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--max-image-side", type=int, default=64)
  parser.add_argument("--turns", type=int, default=1)
  parser.add_argument("--keep", default=None, help="keep the catalogues here")
  parser.add_argument("--run-once", nargs=3, metavar=("DRIVER", "CATALOGUE", "OUTPUT"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.run_once:
    print(json.dumps(run_once(*args.run_once, args.workers, args.max_image_side)))
    return
  sizes = [int(size) for size in args.listings.split(",")]
  root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="prepare-drivers-"))
  results = {}
  for listings in sizes:
    folder = root / f"catalogue-{listings}"
    catalogue = folder / "catalogue.csv"
    if not catalogue.exists():
      write_catalogue(folder, listings, args.photos)
    for turn in range(args.turns):
      for driver in ("local", "beam"):
        output = root / f"out-{listings}-{driver}"
        shutil.rmtree(output, ignore_errors=True)
        stdout, tree_peak = measured_run(
            [sys.executable, __file__, "--run-once", driver, str(catalogue), str(output),
             "--workers", str(args.workers), "--max-image-side", str(args.max_image_side)])
        measured = json.loads(stdout.strip().splitlines()[-1])
        rows_per_s = listings / measured["seconds"]
        results.setdefault((listings, driver), []).append(rows_per_s)
        print(f"{listings:>9,} rows  {driver:<5} turn {turn}: {measured['seconds']:7.1f} s, "
              f"{rows_per_s:7.0f} rows/s ({rows_per_s / args.workers:6.0f} per core), "
              f"driver peak {measured['peak_mib']:6.0f} MiB, whole job "
              f"{tree_peak:6.0f} MiB, kept {measured['kept']:,}, "
              f"skipped {measured['skipped']:,}", flush=True)
      print(f"  same bytes: {same_dataset(root / f'out-{listings}-local', root / f'out-{listings}-beam')}",
            flush=True)
  if not args.keep:
    shutil.rmtree(root)
  largest = sizes[-1]
  ratio = (max(results[largest, "beam"]) / max(results[largest, "local"]))
  print(f"beam_over_local_rows_per_s_{largest}: {ratio:.3f}")


if __name__ == "__main__":
  main()
