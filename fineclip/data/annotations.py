"""Read a region-caption annotation file (schema: ``fineclip/data/schema.md``) with pycocotools.

Everything that is wrong with a record is either a clear error naming the file and record, or a
counted skip reported in ``AnnotationStats`` and logged once per file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from fineclip.errors import AnnotationError

log = logging.getLogger(__name__)



@dataclass
class ImageRecord:
    image_id: int
    path: Path
    width: int
    height: int
    captions: list[str]
    boxes: np.ndarray  # (K, 4) float32, x1 y1 x2 y2 in original pixels, clipped to the image
    region_captions: list[str]
    category_ids: np.ndarray  # (K,) int64
    segments_png: Path | None = None  # COCO panoptic: the PNG of segment ids (masks for mask pooling)
    segment_ids: np.ndarray | None = None  # COCO panoptic: (K,) segment id of each box


@dataclass
class RegionAnnotations:
    records: list[ImageRecord]
    categories: dict[int, str]  # category id -> name, in id order
    stats: Counter = field(default_factory=Counter)
    stuff_ids: frozenset[int] = frozenset()  # categories that are "stuff" (COCO panoptic isthing=0)
    missing: list[Path] = field(default_factory=list)  # image files that were not found (skipped)


def read_annotation_json(path: Path, required: tuple[str, ...] = ("images", "annotations", "categories")) -> dict:
    """The json object in ``path``, with a clear error for a missing/malformed file or a missing
    top-level list among ``required``."""
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"malformed json in {path}: {err.msg} at line {err.lineno}, column {err.colno}") from err
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path} is not UTF-8 text: {err}") from err
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be an object with {', '.join(map(repr, required))}")
    for key in required:
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: missing list '{key}'")
    return data


def check_fields(path: Path, kind: str, record: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        rid = record.get("id", "?")
        raise AnnotationError(f"{path}: {kind} id={rid} lacks field(s) {missing}")


def clean_box(bbox, width: float, height: float, min_box_area: float, stats: Counter) -> tuple | None:
    """A COCO ``[x, y, w, h]`` box as (x1, y1, x2, y2) clipped to the image, or None when it is empty
    (``empty_box``), or under ``min_box_area`` px² after clipping (``small_box``); clipping is
    counted as ``clipped_box``. A non-numeric bbox raises TypeError/ValueError."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        stats["empty_box"] += 1
        return None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        stats["clipped_box"] += 1
    if x2 <= x1 or y2 <= y1 or (x2 - x1) * (y2 - y1) < min_box_area:
        stats["small_box"] += 1
        return None
    return x1, y1, x2, y2


def load_region_annotations(
    ann_file: str | Path,
    image_root: str | Path | None = None,
    min_box_area: float = 64.0,
    require_captions: bool = True,
    require_region_captions: bool = True,
    check_files: bool = True,
) -> RegionAnnotations:
    """Parse ``ann_file`` into per-image records.

    Decisions (each counted in ``stats``): an image whose file is missing is skipped
    (``missing_image``); a box is clipped to its image (``clipped_box``); a box of zero or negative
    size (``empty_box``) or smaller than ``min_box_area`` px² after clipping (``small_box``) is
    dropped; when ``require_region_captions`` (training), a region with an empty or absent caption
    is dropped (``empty_region_caption``); empty image captions are dropped
    (``empty_caption``) and, when ``require_captions``, an image left with none is skipped
    (``no_caption``); a crowd box (``iscrowd=1``, a group of objects) is dropped (``crowd_box``).
    Images without regions are kept (``no_regions``): they take part in the
    global loss only. Structural problems (bad json, missing fields, unknown image or category
    ids, a non-numeric bbox) are errors naming the record.
    """
    path = Path(ann_file)
    root = Path(image_root) if image_root is not None else path.parent
    data = read_annotation_json(path)
    for image in data["images"]:
        check_fields(path, "image", image, ("id", "file_name", "width", "height"))
    for ann in data["annotations"]:
        check_fields(path, "annotation", ann, ("id", "image_id", "category_id", "bbox"))
    for cat in data["categories"]:
        check_fields(path, "category", cat, ("id", "name"))

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    categories = {c["id"]: c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])}

    captions: dict[int, list[str]] = {}
    stats: Counter = Counter()
    for cap in data.get("captions", []):
        check_fields(path, "caption", cap, ("image_id", "caption"))
        text = str(cap["caption"]).strip()
        if not text:
            stats["empty_caption"] += 1
            continue
        captions.setdefault(cap["image_id"], []).append(text)
    unknown = set(captions) - set(coco.imgs)
    if unknown:
        raise AnnotationError(f"{path}: captions refer to unknown image ids {sorted(unknown)[:5]}")

    records, missing = [], []
    for image_id in sorted(coco.imgs):
        image = coco.imgs[image_id]
        file = root / image["file_name"]
        if check_files and not file.is_file():
            stats["missing_image"] += 1
            missing.append(file)
            if stats["missing_image"] <= 5:
                log.warning("%s: image id=%s file %s not found; skipped", path.name, image_id, file)
            continue
        if require_captions and not captions.get(image_id):
            stats["no_caption"] += 1
            continue
        W, H = float(image["width"]), float(image["height"])
        boxes, region_captions, cat_ids = [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann["category_id"] not in categories:
                raise AnnotationError(f"{path}: annotation id={ann['id']} has unknown category_id {ann['category_id']}")
            if ann.get("iscrowd", 0):
                stats["crowd_box"] += 1
                continue
            try:
                box = clean_box(ann["bbox"], W, H, min_box_area, stats)
            except (TypeError, ValueError) as err:
                bad = f"{path}: annotation id={ann['id']} has a malformed bbox {ann['bbox']!r}"
                raise AnnotationError(bad) from err
            if box is None:
                continue
            text = str(ann.get("caption", "")).strip()
            if require_region_captions and not text:
                stats["empty_region_caption"] += 1
                continue
            boxes.append(box)
            region_captions.append(text)
            cat_ids.append(ann["category_id"])
        if not boxes:
            stats["no_regions"] += 1
        records.append(
            ImageRecord(
                image_id=image_id,
                path=file,
                width=int(W),
                height=int(H),
                captions=captions.get(image_id, []),
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                region_captions=region_captions,
                category_ids=np.asarray(cat_ids, dtype=np.int64),
            )
        )
    stats["images"] = len(records)
    stats["regions"] = sum(len(r.boxes) for r in records)
    if not records:
        raise AnnotationError(f"{path}: no usable image ({dict(stats)})")
    log.info("%s: %s", path.name, ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return RegionAnnotations(records=records, categories=categories, stats=stats, missing=missing)
