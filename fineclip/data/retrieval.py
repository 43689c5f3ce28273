"""Image-text retrieval benchmarks: COCO captions files and Karpathy-split files.

- COCO ``captions_val2017.json`` (the 5K val2017 images): ``images`` + ``annotations`` with
  ``{"image_id", "caption"}``.
- The Karpathy-split format used for COCO 5K test and Flickr30K 1K test (``dataset_coco.json``,
  ``dataset_flickr30k.json``): ``{"images": [{"filename", "filepath"?, "split", "sentences":
  [{"raw": ...}], ...}]}``; the image is ``image_root/filepath/filename`` (``filepath`` is absent
  for Flickr30K).

Both give ``RegionAnnotations`` without boxes; at most ``max_captions`` captions per image are kept
(the Karpathy protocol's 5; extra ones are counted as ``extra_caption``; None keeps them all).
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


def _caption_record(image_id: int, file: Path, size: tuple[int, int], captions: list[str]) -> ImageRecord:
    return ImageRecord(
        image_id=image_id, path=file, width=size[0], height=size[1], captions=captions,
        boxes=np.zeros((0, 4), dtype=np.float32), region_captions=[], category_ids=np.zeros(0, dtype=np.int64),
    )


def _keep_captions(texts: list, stats: Counter, max_captions: int) -> list[str]:
    kept = []
    for text in texts:
        text = str(text).strip()
        if not text:
            stats["empty_caption"] += 1
        elif max_captions is not None and len(kept) == max_captions:
            stats["extra_caption"] += 1
        else:
            kept.append(text)
    return kept


def _finish(path: Path, records: list[ImageRecord], stats: Counter, missing: list[Path]) -> RegionAnnotations:
    stats["images"] = len(records)
    stats["captions"] = sum(len(r.captions) for r in records)
    if not records:
        raise AnnotationError(f"{path}: no usable image ({dict(stats)})")
    log.info("%s: %s", path.name, ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return RegionAnnotations(records=records, categories={}, stats=stats, missing=missing)


def load_coco_captions(
    captions_json: str | Path, image_root: str | Path, max_captions: int | None = 5, check_files: bool = True
) -> RegionAnnotations:
    """Images with their captions from a COCO captions file, in image-id order. Images whose file
    is missing (``missing_image``) or that have no caption (``no_caption``) are skipped."""
    path = Path(captions_json)
    data = read_annotation_json(path, required=("images", "annotations"))
    texts: dict[int, list] = {}
    for ann in data["annotations"]:
        check_fields(path, "annotation", ann, ("image_id", "caption"))
        texts.setdefault(ann["image_id"], []).append(ann["caption"])
    stats: Counter = Counter()
    records, missing = [], []
    for image in sorted(data["images"], key=lambda im: im.get("id", -1)):
        check_fields(path, "image", image, ("id", "file_name", "width", "height"))
        file = Path(image_root) / image["file_name"]
        if check_files and not file.is_file():
            stats["missing_image"] += 1
            missing.append(file)
            continue
        captions = _keep_captions(texts.get(image["id"], []), stats, max_captions)
        if not captions:
            stats["no_caption"] += 1
            continue
        records.append(_caption_record(image["id"], file, (int(image["width"]), int(image["height"])), captions))
    return _finish(path, records, stats, missing)


def load_karpathy_split(
    karpathy_json: str | Path,
    image_root: str | Path,
    split: str = "test",
    max_captions: int | None = 5,
    check_files: bool = True,
) -> RegionAnnotations:
    """The images of one split (``test``: COCO 5K / Flickr30K 1K) of a Karpathy-format file, in file
    order. Image sizes are read from the image headers (the format does not store them)."""
    path = Path(karpathy_json)
    data = read_annotation_json(path, required=("images",))
    stats: Counter = Counter()
    records, missing = [], []
    for index, image in enumerate(data["images"]):
        check_fields(path, "image", image, ("filename", "split", "sentences"))
        if image["split"] != split:
            continue
        file = Path(image_root) / image.get("filepath", "") / image["filename"]
        if check_files and not file.is_file():
            stats["missing_image"] += 1
            missing.append(file)
            continue
        captions = _keep_captions([s.get("raw", "") for s in image["sentences"]], stats, max_captions)
        if not captions:
            stats["no_caption"] += 1
            continue
        size = (1, 1)  # unknown without reading the file; only boxes would need it
        if check_files:
            try:
                with Image.open(file) as img:
                    size = img.size
            except OSError as err:
                raise AnnotationError(f"{path}: cannot read image {file}: {err}") from err
        image_id = int(image.get("cocoid", image.get("imgid", index)))
        records.append(_caption_record(image_id, file, size, captions))
    if not records and not stats:
        raise AnnotationError(f"{path}: no image with split={split!r}")
    return _finish(path, records, stats, missing)
