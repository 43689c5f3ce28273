"""Region-caption data in tar shards, read by seek: web-scale training with the map-style guarantees.

A shard folder holds

    shard-000000.tar        <key>.jpg (the original image bytes) + <key>.json (one image record), ~1,000 samples
    shard-000000.idx.json   {"keys": [...], "image": [[offset, size], ...], "record": [[offset, size], ...]}
    sizes.json              {"shard-000000.tar": 1000, ...}   (the file open_clip reads)
    categories.json         {"1": "person", ...}

and is inspectable with ``tar tf``. A record is one image in the fineclip schema (``schema.md``)::

    {"id": 7, "file_name": "train2017/000000000007.jpg", "width": 640, "height": 480,
     "captions": ["..."],
     "regions": [{"bbox": [x, y, w, h], "caption": "...", "category_id": 3, "negatives": ["..."]}]}

with ``bbox`` in pixels of the original image. ``ShardedRegionDataset`` reads sample i by two seeks (its record,
its image) through an index of plain arrays (28 bytes a sample, no Python object per sample), so the usual
``GlobalBatchSampler`` drives it: N ranks equal one process with N× the batch, and a resumed run continues at the
exact step. A sample that cannot be read (an undecodable image, a truncated shard, a broken record) is replaced by
the next readable one, and named in the batch (``skipped``), where the loader counts it
(``data.max_bad_fraction``).

    python -m fineclip.data.shards convert --ann train.json --images ROOT --out DIR [--per-shard 1000]
    python -m fineclip.data.shards convert --ann finehard.json --images ROOT --out DIR --format finehard
    python -m fineclip.data.shards index DIR        # (re)write the idx files and sizes.json from the tars
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from fineclip.data.annotations import ImageRecord, RegionAnnotations, clean_box
from fineclip.data.dataset import RegionCaptionDataset
from fineclip.data.shard_writer import (  # noqa: F401 - the writing side, re-exported for one import
    ShardWriter,
    convert,
    finehard_records,
    reindex,
    schema_records,
    write_index,
)
from fineclip.errors import AnnotationError, ImageLoadError

log = logging.getLogger(__name__)


# -- reading ----------------------------------------------------------------------------------------------------


class SampleError(Exception):
    """A sample that cannot be read; the message names its shard and key."""


class ShardIndex:
    """Where every sample is: arrays of its shard (int32), image and record offsets (int64) and sizes (int32)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        sizes_file = self.folder / "sizes.json"
        if not sizes_file.is_file():
            raise AnnotationError(f"{sizes_file} not found: not a shard folder, or an unfinished conversion "
                                  f"(python -m fineclip.data.shards index {self.folder} writes it from the tars)")
        sizes = json.loads(sizes_file.read_text())
        self.shards = sorted(sizes)
        shard_of, image, record = [], [], []
        for number, name in enumerate(self.shards):
            idx_file = self.folder / (name.removesuffix(".tar") + ".idx.json")
            if not (self.folder / name).is_file():
                raise AnnotationError(f"{self.folder / name} is listed in sizes.json but not there")
            if not idx_file.is_file():
                log.warning("%s: no index, rebuilt from the tar", name)
                write_index(self.folder / name)
            idx = json.loads(idx_file.read_text())
            if len(idx["keys"]) != sizes[name]:
                raise AnnotationError(f"{idx_file}: {len(idx['keys'])} samples, sizes.json says {sizes[name]}")
            shard_of.append(np.full(len(idx["keys"]), number, dtype=np.int32))
            image.append(np.asarray(idx["image"], dtype=np.int64).reshape(-1, 2))
            record.append(np.asarray(idx["record"], dtype=np.int64).reshape(-1, 2))
        if not shard_of:
            raise AnnotationError(f"{sizes_file}: no shard listed")
        self.shard_of = np.concatenate(shard_of)
        image, record = np.concatenate(image), np.concatenate(record)
        self.image_at = (image[:, 0].copy(), image[:, 1].astype(np.int32))  # (offsets, sizes)
        self.record_at = (record[:, 0].copy(), record[:, 1].astype(np.int32))

    def __len__(self) -> int:
        return len(self.shard_of)

    @property
    def nbytes(self) -> int:
        return self.shard_of.nbytes + sum(a.nbytes for a in (*self.image_at, *self.record_at))


class ShardedRegionDataset(RegionCaptionDataset):
    """``RegionCaptionDataset`` over a shard folder: the same items (resized image, sampled caption, at most
    ``max_regions`` boxes, region captions and ``negatives``), each read by seek."""

    def __init__(self, root: str | Path, image_size: int = 224, train: bool = True, max_regions: int = 20,
                 min_box_area: float = 64.0, seed: int = 0, require_region_captions: bool = True,
                 **reading) -> None:
        self.index = ShardIndex(root)
        categories_file = self.index.folder / "categories.json"
        categories = {int(k): v for k, v in json.loads(categories_file.read_text()).items()} \
            if categories_file.is_file() else {0: "region"}
        self.min_box_area, self.require_region_captions = min_box_area, require_region_captions
        stats = Counter(images=len(self.index), shards=len(self.index.shards))
        super().__init__(RegionAnnotations(records=[], categories=categories, stats=stats), image_size,
                         train=train, max_regions=max_regions, seed=seed, **reading)
        self.files: dict[int, int] = {}  # open shard descriptors of this process (each DataLoader worker its own)
        self.files_pid = os.getpid()
        log.info("%s: %d samples in %d shards, index %.1f MB", self.index.folder, len(self.index),
                 len(self.index.shards), self.index.nbytes / 2**20)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # open descriptors stay in the process that opened them
        return {**self.__dict__, "files": {}, "files_pid": None}

    def _read(self, index: int, where: tuple[np.ndarray, np.ndarray]) -> bytes:
        """The bytes of one member by a positional read (``os.pread``: no shared file offset, so DataLoader workers
        forked after the parent opened a shard cannot move each other's reads)."""
        if self.files_pid != os.getpid():  # a forked worker opens its own descriptors
            self.files, self.files_pid = {}, os.getpid()
        shard = int(self.index.shard_of[index])
        if shard not in self.files:
            self.files[shard] = os.open(self.index.folder / self.index.shards[shard], os.O_RDONLY)
        offset, size = int(where[0][index]), int(where[1][index])
        data = os.pread(self.files[shard], size, offset)
        if len(data) != size:
            raise SampleError(f"{self.index.shards[shard]}: sample {index} is cut short (a truncated shard)")
        return data

    def sample(self, index: int) -> tuple[ImageRecord, Image.Image, dict]:
        """(record, decoded image, the raw json) of sample ``index``; ``SampleError`` when it cannot be read."""
        name = self.index.shards[int(self.index.shard_of[index])]
        try:
            raw = json.loads(self._read(index, self.index.record_at))
        except (ValueError, UnicodeDecodeError) as err:
            raise SampleError(f"{name}: sample {index}: the record is not valid json") from err
        try:
            with Image.open(io.BytesIO(self._read(index, self.index.image_at))) as img:
                original = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # undecodable or cut bytes
            raise SampleError(f"{name}: sample {index} (image id {raw.get('id')}): the image cannot be decoded "
                              f"({type(err).__name__})") from err
        boxes, captions, category_ids, negatives = [], [], [], []
        width, height = float(raw["width"]), float(raw["height"])
        for region in raw.get("regions", []):
            box = clean_box(region["bbox"], width, height, self.min_box_area, Counter())
            caption = str(region.get("caption", "")).strip()
            if box is None or (self.require_region_captions and self.train and not caption):
                continue
            boxes.append(box)
            captions.append(caption)
            category_ids.append(int(region.get("category_id", 0)))
            negatives.append(list(region.get("negatives", [])))
        record = ImageRecord(image_id=int(raw["id"]), path=Path(name) / str(raw.get("file_name", "")),
                             width=int(width), height=int(height), captions=list(raw.get("captions", [])) or [""],
                             boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), region_captions=captions,
                             category_ids=np.asarray(category_ids, dtype=np.int64))
        return record, original, {"negatives": negatives}

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for attempt in range(len(self)):
            at = (index + attempt) % len(self)
            try:
                record, original, extra = self.sample(at)
            except SampleError as err:
                skipped.append(str(err))
                continue
            item = self.make_item(record, original, at)
            kept = item.pop("kept")
            item["negatives"] = [extra["negatives"][k] for k in kept]
            item["skipped"] = skipped
            return item
        raise ImageLoadError(f"{self.index.folder}: no readable sample at all ({skipped[0]})")


# -- command line -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fineclip.data.shards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="a schema json (or FineHARD json) + image root -> shards")
    conv.add_argument("--ann", required=True)
    conv.add_argument("--images", default=None, help="image root (default: the json's folder)")
    conv.add_argument("--out", required=True)
    conv.add_argument("--per-shard", type=int, default=1000)
    conv.add_argument("--format", choices=("schema", "finehard"), default="schema")
    index = commands.add_parser("index", help="(re)write the idx files and sizes.json of a shard folder")
    index.add_argument("folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "index":
            sizes = reindex(args.folder)
            print(f"{args.folder}: {sum(sizes.values())} samples in {len(sizes)} shards")
            return 0
        if args.format == "finehard":
            records, categories = finehard_records(args.ann, args.images or Path(args.ann).parent)
        else:
            records, categories = schema_records(args.ann, args.images)
        stats = convert(records, categories, args.out, args.per_shard)
    except (AnnotationError, KeyError) as err:
        print(f"error: {err}")
        return 1
    print(f"{args.out}: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
