"""Region proposals in COCO format as a data set's regions (RegionCLIP, CLIPSelf's proposal mode).

A proposals file is either COCO's detection-results list ``[{"image_id", "bbox": [x, y, w, h],
"score"}, ...]`` or an instances-style object whose ``annotations`` hold such records (``score``
optional, 1.0 when absent). Boxes are in the pixels of the images as the annotation file sizes
them, like the data set's own boxes. Proposals have no captions.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from fineclip.data.annotations import RegionAnnotations, clean_box
from fineclip.errors import AnnotationError

log = logging.getLogger(__name__)


def read_proposals(path: str | Path) -> list[dict]:
    """The proposal records of ``path`` (either layout), each checked for image_id and a numeric bbox."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"proposals file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"malformed proposals file {path}: {err}") from err
    records = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a list of proposals or an object with 'annotations'")
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "image_id" not in record or "bbox" not in record:
            raise AnnotationError(f"{path}: proposal #{index} needs image_id and bbox: {record!r}"[:300])
    return records


def with_proposals(
    annotations: RegionAnnotations,
    path: str | Path,
    min_score: float = 0.0,
    max_per_image: int = 100,
    min_box_area: float = 64.0,
) -> RegionAnnotations:
    """``annotations`` with each image's regions replaced by its proposals: those scoring at least
    ``min_score``, the ``max_per_image`` best, clipped and filtered like the file's own boxes.
    Region captions become "" and category ids 0. Skips are counted (``stats``) and logged."""
    stats: Counter = Counter()
    by_image: dict[int, list[tuple[float, tuple]]] = {}
    sizes = {r.image_id: (r.width, r.height) for r in annotations.records}
    for index, record in enumerate(read_proposals(path)):
        image_id = record["image_id"]
        if image_id not in sizes:
            stats["proposal_unknown_image"] += 1
            continue
        score = float(record.get("score", 1.0))
        if score < min_score:
            stats["proposal_low_score"] += 1
            continue
        try:
            box = clean_box(record["bbox"], *sizes[image_id], min_box_area, stats)
        except (TypeError, ValueError) as err:
            raise AnnotationError(f"{path}: proposal #{index} has a malformed bbox {record['bbox']!r}") from err
        if box is not None:
            by_image.setdefault(image_id, []).append((score, box))
    records = []
    for r in annotations.records:
        ranked = sorted(by_image.get(r.image_id, []), key=lambda item: -item[0])
        stats["proposal_over_max"] += max(0, len(ranked) - max_per_image)
        boxes = np.asarray([box for _, box in ranked[:max_per_image]], dtype=np.float32).reshape(-1, 4)
        stats["proposals"] += len(boxes)
        stats["proposal_no_regions"] += int(len(boxes) == 0)
        records.append(replace(r, boxes=boxes, region_captions=[""] * len(boxes),
                               category_ids=np.zeros(len(boxes), dtype=np.int64)))
    log.info("%s: %s", Path(path).name, ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return replace(annotations, records=records, stats=annotations.stats + stats)
