"""How long a training host takes to learn where every record is: the record
index files `prepare` writes beside each shard against a scan of the shards'
framing (datasets prepared before the index files existed).

  python benchmarks/studies/dataset_open.py --listings 1000000 --shards 64

Writes a split of `--listings` small records (a title and a 1 KiB stand-in
for a photo, as `prepare`'s writer frames them) over `--shards` shards in a
temporary folder, then times, in alternating turns, reading every shard's
offsets both ways (`item_jax.data.indexed.read_offsets` and `scan_offsets`,
what `IndexedSource` calls for each shard), with the page cache warm for
both. The last line is `dataset_open_speedup_<listings>: <scan s / index s>`.
"""

import argparse
import pathlib
import statistics
import tempfile
import time

import numpy as np
from etils import epath

from item_jax.data import catalogue as catalogue_lib
from item_jax.data import indexed
from item_jax.data.prepare import _SplitWriter


def write_split(folder: pathlib.Path, listings: int, shards: int) -> dict:
  writer = _SplitWriter(epath.Path(folder), "train", shards)
  photo = bytes(1024)
  for row in range(listings):
    listing = catalogue_lib.Listing(row=row + 2, item_id=f"item-{row}",
                                    title=f"listing number {row} in red",
                                    image="", product_id=f"p{row // 3}",
                                    category="a > b")
    writer.write(listing, photo, 0)
  writer.close()
  return writer.summary()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--listings", type=int, default=1_000_000)
  parser.add_argument("--shards", type=int, default=64)
  parser.add_argument("--turns", type=int, default=3)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as temporary:
    folder = pathlib.Path(temporary)
    started = time.perf_counter()
    summary = write_split(folder, args.listings, args.shards)
    size = sum((folder / name).stat().st_size for name in summary["files"])
    print(f"wrote {args.listings:,} records in {args.shards} shards "
          f"({size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s")
    shards = [str(folder / name) for name in summary["files"]]
    indexes = [str(folder / name) for name in summary["offsets_files"]]
    ways = {
        "index": lambda: [indexed.read_offsets(shard, index)
                          for shard, index in zip(shards, indexes)],
        "scan": lambda: [indexed.scan_offsets(shard) for shard in shards]}
    seconds = {name: [] for name in ways}
    for _ in range(args.turns):
      for name, way in ways.items():
        started = time.perf_counter()
        offsets = way()
        seconds[name].append(time.perf_counter() - started)
        assert sum(len(part) for part in offsets) == args.listings
    for name, values in seconds.items():
      print(f"{name}: median {statistics.median(values):.3f} s over "
            f"{args.turns} turns ({', '.join(f'{v:.3f}' for v in values)})")
    speedup = statistics.median(seconds["scan"]) / statistics.median(seconds["index"])
    print(f"dataset_open_speedup_{args.listings}: {speedup:.1f}")


if __name__ == "__main__":
  main()
