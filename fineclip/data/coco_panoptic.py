"""COCO panoptic boxes for box classification: every segment of every image, 133 categories.

Thing segments take their box from the json; stuff segments the tight box of their mask, decoded
from the panoptic PNG (segment id = R + 256·G + 256²·B). Boxes under ``min_box_area`` px² are
dropped and at most ``max_boxes`` are kept per image, in json order. The result is a
``RegionAnnotations`` whose records have no captions, usable with ``RegionCaptionDataset``.

``reference_boxes=True`` extracts boxes exactly as the public CLIPSelf/FineCLIP evaluation does,
so that numbers compare with the published ones: the first ``max_boxes`` segments of the image
are taken *before* small ones are dropped, and a stuff box's far edges are the index of its last
pixel (x_max, y_max) rather than one past it.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from fineclip.data.annotations import ImageRecord, RegionAnnotations, check_fields, read_annotation_json
from fineclip.errors import AnnotationError

log = logging.getLogger(__name__)


def panoptic_segment_ids(png_path: Path) -> np.ndarray:
    """(H, W) int64 segment ids of a COCO panoptic PNG."""
    try:
        with Image.open(png_path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int64)
    except OSError as err:
        raise AnnotationError(f"cannot read panoptic PNG {png_path}: {err}") from err
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def mask_box(ids: np.ndarray, segment_id: int, inclusive: bool = False) -> tuple[float, float, float, float] | None:
    """Tight box (x1, y1, x2, y2) in pixels of the pixels equal to ``segment_id``: far edges one past
    the last pixel, or with ``inclusive`` the last pixel's index (the reference evaluation's box)."""
    ys, xs = np.nonzero(ids == segment_id)
    if len(xs) == 0:
        return None
    end = 0 if inclusive else 1
    return float(xs.min()), float(ys.min()), float(xs.max() + end), float(ys.max() + end)


def load_panoptic_boxes(
    panoptic_json: str | Path,
    png_folder: str | Path,
    image_root: str | Path,
    min_box_area: float = 64.0,
    max_boxes: int = 100,
    check_files: bool = True,
    reference_boxes: bool = False,
) -> RegionAnnotations:
    path = Path(panoptic_json)
    data = read_annotation_json(path)
    categories = {c["id"]: c for c in data["categories"]}
    images = {im["id"]: im for im in data["images"]}
    stats: Counter = Counter()
    records, missing = [], []
    for ann in data["annotations"]:
        check_fields(path, "annotation", ann, ("image_id", "file_name", "segments_info"))
        image = images.get(ann["image_id"])
        if image is None:
            raise AnnotationError(f"{path}: annotation for unknown image id={ann['image_id']}")
        file = Path(image_root) / image["file_name"]
        if check_files and not file.is_file():
            stats["missing_image"] += 1
            missing.append(file)
            log.warning("%s: image id=%s file %s not found; skipped", path.name, image["id"], file)
            continue
        ids = None
        png = Path(png_folder) / ann["file_name"]
        boxes, cat_ids, seg_ids = [], [], []
        segments = ann["segments_info"]
        if reference_boxes and len(segments) > max_boxes:
            stats["over_max_boxes"] += len(segments) - max_boxes
            segments = segments[:max_boxes]
        for seg in segments:
            category = categories.get(seg["category_id"])
            if category is None:
                bad = f"{path}: segment id={seg.get('id')} has unknown category_id {seg['category_id']}"
                raise AnnotationError(bad)
            if category.get("isthing", 1):
                x, y, w, h = (float(v) for v in seg["bbox"])
                box = (x, y, x + w, y + h)
            else:
                if ids is None:
                    ids = panoptic_segment_ids(png)
                box = mask_box(ids, seg["id"], inclusive=reference_boxes)
                if box is None:
                    stats["empty_mask"] += 1
                    continue
            if (box[2] - box[0]) * (box[3] - box[1]) < min_box_area:
                stats["small_box"] += 1
                continue
            if len(boxes) == max_boxes:
                stats["over_max_boxes"] += 1
                continue
            boxes.append(box)
            cat_ids.append(seg["category_id"])
            seg_ids.append(seg["id"])
        records.append(
            ImageRecord(
                image_id=image["id"], path=file, width=int(image["width"]), height=int(image["height"]),
                captions=[], boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                region_captions=[""] * len(boxes), category_ids=np.asarray(cat_ids, dtype=np.int64),
                segments_png=png, segment_ids=np.asarray(seg_ids, dtype=np.int64),
            )
        )
    stats["images"] = len(records)
    stats["regions"] = sum(len(r.boxes) for r in records)
    log.info("%s: %s", path.name, ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    names = {cid: c["name"] for cid, c in sorted(categories.items())}
    stuff = frozenset(cid for cid, c in categories.items() if not c.get("isthing", 1))
    return RegionAnnotations(records=records, categories=names, stats=stats, stuff_ids=stuff, missing=missing)
