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
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from fineclip.data.annotations import ImageRecord, clean_box, read_annotation_json
from fineclip.data.dataset import RegionCaptionDataset
from fineclip.errors import AnnotationError, ImageLoadError

log = logging.getLogger(__name__)
SHARD = "shard-{:06d}.tar"


# -- writing ----------------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes samples into ``out/shard-NNNNNN.tar`` files of ``per_shard`` samples each, then their indexes.

    Each shard is written under a temporary name and renamed when complete, so an interrupted conversion leaves
    only whole shards; ``close`` writes ``sizes.json`` and ``categories.json``."""

    def __init__(self, out: str | Path, per_shard: int = 1000, categories: dict[int, str] | None = None) -> None:
        if per_shard < 1:
            raise ValueError(f"per_shard={per_shard}: a shard holds at least one sample")
        self.out, self.per_shard = Path(out), per_shard
        self.out.mkdir(parents=True, exist_ok=True)
        self.categories = dict(categories or {})
        self.sizes: dict[str, int] = {}
        self.keys: set[str] = set()
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # no time stamp: the same input gives the same bytes
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, key: str, image: bytes, record: dict, ext: str = "jpg") -> None:
        """One sample: ``image`` its file's bytes as they are (``ext`` their format), ``record`` its json."""
        if not key or "/" in key or "." in key:
            raise ValueError(f"sample key {key!r}: use a non-empty name without '/' or '.'")
        if key in self.keys:
            raise ValueError(f"sample key {key!r} twice: keys are unique across the shards")
        self.keys.add(key)
        if self.tar is None:
            self._open()
        self._member(f"{key}.{ext}", image)
        self._member(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())
        self.count += 1
        if self.count == self.per_shard:
            self._finish()

    def _open(self) -> None:
        self.name = SHARD.format(len(self.sizes))
        self.tar = tarfile.open(self.out / f"{self.name}.tmp", "w", format=tarfile.USTAR_FORMAT)

    def _finish(self) -> None:
        self.tar.close()
        os.replace(self.out / f"{self.name}.tmp", self.out / self.name)
        self.sizes[self.name] = write_index(self.out / self.name)
        self.tar, self.count = None, 0

    def close(self) -> None:
        if self.tar is not None:
            self._finish()
        write_json(self.out / "sizes.json", self.sizes)
        write_json(self.out / "categories.json", {str(k): v for k, v in sorted(self.categories.items())})


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False))
    os.replace(tmp, path)


def write_index(shard: Path) -> int:
    """Write ``<shard>.idx.json`` from the tar's own headers (tarfile reads them); returns the sample count."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    length = shard.stat().st_size
    try:
        with tarfile.open(shard, "r") as tar:
            for info in tar:
                if info.isfile() and info.offset_data + info.size <= length:
                    key, _, ext = info.name.rpartition(".")
                    members.setdefault(key, {})["record" if ext == "json" else "image"] = (info.offset_data, info.size)
    except (tarfile.ReadError, EOFError) as err:  # a truncated shard: keep the samples before the cut
        log.warning("%s is truncated (%s): indexing the %d keys before the cut", shard.name, err, len(members))
    keys = [k for k, m in members.items() if set(m) == {"record", "image"}]
    if len(keys) != len(members):
        log.warning("%s: %d keys without both an image and a record are left out", shard.name,
                    len(members) - len(keys))
    index = {"keys": keys, "image": [members[k]["image"] for k in keys], "record": [members[k]["record"] for k in keys]}
    write_json(shard.with_name(shard.name.removesuffix(".tar") + ".idx.json"), index)
    return len(keys)


def reindex(folder: str | Path) -> dict[str, int]:
    """Rewrite every shard's index and ``sizes.json`` from the tars in ``folder``."""
    folder = Path(folder)
    shards = sorted(folder.glob("shard-*.tar"))
    if not shards:
        raise AnnotationError(f"{folder}: no shard-*.tar files")
    sizes = {shard.name: write_index(shard) for shard in shards}
    write_json(folder / "sizes.json", sizes)
    return sizes


# -- converting -------------------------------------------------------------------------------------------------


def schema_records(ann_file: str | Path, image_root: str | Path | None = None) -> tuple[Iterator, dict[int, str]]:
    """(records of a fineclip-schema / COCO json, one per image with its regions, and its categories). Region
    fields beyond bbox/caption/category_id (negatives, provenance) are kept; the file paths are checked when read."""
    path = Path(ann_file)
    root = Path(image_root) if image_root is not None else path.parent
    data = read_annotation_json(path)
    captions: dict[int, list[str]] = {}
    for cap in data.get("captions", []):
        captions.setdefault(cap["image_id"], []).append(str(cap["caption"]))
    regions: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        region = {k: v for k, v in ann.items() if k not in ("id", "image_id", "area", "iscrowd", "segmentation")}
        regions.setdefault(ann["image_id"], []).append(region)

    def records():
        for image in sorted(data["images"], key=lambda i: i["id"]):
            record = {"id": image["id"], "file_name": image["file_name"], "width": image["width"],
                      "height": image["height"], "captions": captions.get(image["id"], []),
                      "regions": regions.get(image["id"], [])}
            yield record, root / image["file_name"]

    return records(), {c["id"]: c["name"] for c in data["categories"]}


def finehard_records(ann_file: str | Path, image_root: str | Path) -> tuple[Iterator, dict[int, str]]:
    """FG-CLIP's FineHARD json (a list of {f_path, caption, short_caption, bbox_info: [{bbox: normalised x1 y1 x2 y2
    (score), short_expr, long_expr, flag_short_neg, short_expr_negs}]}) as fineclip records: captions [long, short],
    each box's short expression as its caption, its negatives where flag_short_neg is 1; width and height from the
    image file's header."""
    path, root = Path(ann_file), Path(image_root)
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"malformed json in {path}: {err.msg} at line {err.lineno}") from err
    if not isinstance(items, list):
        raise AnnotationError(f"{path}: a FineHARD file is a list of image records")

    def records():
        for number, item in enumerate(items):
            file = root / item["f_path"]
            try:
                with Image.open(file) as img:
                    width, height = img.size
            except (OSError, ValueError) as err:
                log.warning("%s record %d: cannot read %s (%s); skipped", path.name, number, file, err)
                continue
            regions = []
            for box in item.get("bbox_info", []):
                x1, y1, x2, y2 = (float(v) for v in box["bbox"][:4])
                region = {"bbox": [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height],
                          "caption": box.get("short_expr") or box.get("long_expr", ""), "category_id": 0}
                if box.get("long_expr"):
                    region["long_caption"] = box["long_expr"]
                if box.get("flag_short_neg") == 1 and box.get("short_expr_negs"):
                    region["negatives"] = list(box["short_expr_negs"].values())
                regions.append(region)
            captions = [c for c in (item.get("caption"), item.get("short_caption")) if c]
            yield {"id": number, "file_name": item["f_path"], "width": width, "height": height, "captions": captions,
                   "regions": regions}, file

    return records(), {0: "region"}


def convert(records: Iterable[tuple[dict, Path]], categories: dict[int, str], out: str | Path,
            per_shard: int = 1000) -> Counter:
    """Write ``records`` (record, image file) into shards; a missing image file is skipped and counted."""
    stats: Counter = Counter()
    with ShardWriter(out, per_shard, categories) as writer:
        for record, file in records:
            if not file.is_file():
                stats["missing_image"] += 1
                if stats["missing_image"] <= 5:
                    log.warning("image id=%s: file %s not found; skipped", record["id"], file)
                continue
            ext = file.suffix.lstrip(".").lower() or "jpg"
            writer.add(f"{int(record['id']):012d}", file.read_bytes(), record, "jpg" if ext == "jpeg" else ext)
            stats["images"] += 1
            stats["regions"] += len(record["regions"])
    stats["shards"] = len(writer.sizes)
    return stats


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
        from fineclip.data.annotations import RegionAnnotations

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
