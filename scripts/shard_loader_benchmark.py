"""Loader throughput and index memory of the shard reader (docs/speed.md, "Data loading").

1. samples/s of one epoch through the training loader (``MapStyleBatches``: sampler, decode, resize, collate) with
   0, 1, 2 workers, for the same synthetic images read from shards and from the folder + json;
2. the resident memory and load time of a shard index of 10 M regions (3.34 M images at 3 regions each, FineHARD's
   ratio), generated as index files of 1,000 samples each (the tar files are empty stand-ins: only the index is
   read).

    python scripts/shard_loader_benchmark.py [--images 2000] [--size 256] [--batch 32] [--regions 10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from fineclip.data import RegionCaptionDataset
from fineclip.data.loader import MapStyleBatches
from fineclip.data.shards import ShardedRegionDataset, ShardIndex, convert, schema_records
from fineclip.data.synthetic import generate


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def epoch_rate(dataset, batch: int, workers: int) -> float:
    batches = MapStyleBatches(dataset, batch, num_workers=workers)
    batches.set_position(0, 0)
    start = time.perf_counter()
    count = sum(len(group[0]["images"]) for group in batches)
    return count / (time.perf_counter() - start)


def loader_rates(args, tmp: Path) -> None:
    scenes = generate(tmp / "scenes", train=args.images, val=0, size=args.size, seed=0)
    records, categories = schema_records(scenes / "train.json")
    start = time.perf_counter()
    convert(records, categories, tmp / "shards", per_shard=1000)
    print(f"converted {args.images} images of {args.size} px into shards in {time.perf_counter() - start:.1f} s")
    readers = {"shards": ShardedRegionDataset(tmp / "shards", image_size=224),
               "folder + json": RegionCaptionDataset.from_file(scenes / "train.json", image_size=224)}
    print(f"\n| reader | {' | '.join(f'{w} workers' for w in args.workers)} |")
    print(f"|---|{'---|' * len(args.workers)}")
    for name, dataset in readers.items():
        rates = [epoch_rate(dataset, args.batch, w) for w in args.workers]
        print(f"| {name} | {' | '.join(f'{r:.0f}' for r in rates)} |")
    print(f"(samples/s of one epoch, batch {args.batch}, 224 px output, {os.cpu_count()} CPUs)")


def index_memory(args, tmp: Path) -> None:
    samples = -(-args.regions // args.regions_per_image)
    folder = tmp / "index"
    folder.mkdir()
    sizes = {}
    for shard in range(-(-samples // 1000)):
        n = min(1000, samples - shard * 1000)
        name = f"shard-{shard:06d}.tar"
        (folder / name).touch()
        offsets = [[1536 * i + 512, 1024] for i in range(n)]
        (folder / f"shard-{shard:06d}.idx.json").write_text(json.dumps(
            {"keys": [f"{shard * 1000 + i:012d}" for i in range(n)], "image": offsets, "record": offsets}))
        sizes[name] = n
    (folder / "sizes.json").write_text(json.dumps(sizes))
    before = rss_mb()
    start = time.perf_counter()
    index = ShardIndex(folder)
    seconds = time.perf_counter() - start
    after = rss_mb()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nindex of {args.regions:,} regions = {len(index):,} images in {len(sizes):,} shards: arrays "
          f"{index.nbytes / 2**20:.0f} MB; process RSS {before:.0f} -> {after:.0f} MB (+{after - before:.0f}), "
          f"peak {peak:.0f} MB; loaded in {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="side of the generated scenes (PNG files)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--regions", type=int, default=10_000_000)
    parser.add_argument("--regions-per-image", type=int, default=3)
    parser.add_argument("--skip-loader", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index_memory(args, Path(tmp))  # first: the process holds nothing else yet
        if not args.skip_loader:
            loader_rates(args, Path(tmp))


if __name__ == "__main__":
    main()
