"""Writing tar shards (the layout of ``fineclip/data/shards.py``): ``ShardWriter``, the member indexes, and the
converters from a fineclip-schema json and from FG-CLIP's FineHARD json."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image

from fineclip.data.annotations import read_annotation_json
from fineclip.data.convert_coco import write_json_atomic
from fineclip.errors import AnnotationError

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
        write_json_atomic(self.sizes, self.out / "sizes.json")
        write_json_atomic({str(k): v for k, v in sorted(self.categories.items())}, self.out / "categories.json")


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
    write_json_atomic(index, shard.with_name(shard.name.removesuffix(".tar") + ".idx.json"))
    return len(keys)


def reindex(folder: str | Path) -> dict[str, int]:
    """Rewrite every shard's index and ``sizes.json`` from the tars in ``folder``."""
    folder = Path(folder)
    shards = sorted(folder.glob("shard-*.tar"))
    if not shards:
        raise AnnotationError(f"{folder}: no shard-*.tar files")
    sizes = {shard.name: write_index(shard) for shard in shards}
    write_json_atomic(sizes, folder / "sizes.json")
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
