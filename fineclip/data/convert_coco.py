"""Build a fineclip training file (``fineclip/data/schema.md``) from COCO instances + captions and
a region-caption file, and report how many boxes and captions were kept, dropped, and why.

    python -m fineclip.data.convert_coco --instances annotations/instances_train2017.json \\
        --captions annotations/captions_train2017.json --region-captions region_captions.json \\
        --out annotations/fineclip_train2017.json

The region-caption file is a json list; each record gives a caption for either an existing COCO
box or a box proposal:

    {"annotation_id": 1768, "caption": "a man riding a brown horse"}
    {"image_id": 139, "bbox": [x, y, w, h], "caption": "a wooden chair", "category_id": 62}

A proposal's ``category_id`` is optional: without it the box gets the category "region" (id 0),
which only training uses. Crowd boxes and boxes under ``--min-box-area`` are dropped, as are COCO
boxes no record captions. The report is printed and written next to the output as
``<out>.report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from fineclip.data.annotations import AnnotationError, check_fields, read_annotation_json

PROPOSAL_CATEGORY = {"id": 0, "name": "region", "supercategory": "region"}


def _read_region_captions(path: Path) -> list[dict]:
    if not path.is_file():
        raise AnnotationError(f"region-caption file not found: {path}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"malformed json in {path}: {err.msg} at line {err.lineno}, column {err.colno}") from err
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a json list of region-caption records")
    return records


def convert(
    instances_json: str | Path,
    captions_json: str | Path,
    region_captions_json: str | Path,
    min_box_area: float = 64.0,
) -> tuple[dict, dict[str, Counter]]:
    """Returns (the fineclip-schema dict, {"boxes": counts, "captions": counts, "images": counts})."""
    instances = read_annotation_json(Path(instances_json))
    captions_path = Path(captions_json)
    captions = read_annotation_json(captions_path, required=("images", "annotations"))
    region_path = Path(region_captions_json)
    images = {im["id"]: im for im in instances["images"]}
    categories = {c["id"]: c for c in instances["categories"]}
    coco_boxes = {a["id"]: a for a in instances["annotations"]}
    boxes: Counter = Counter()
    caps: Counter = Counter()

    captioned: dict[int, str] = {}  # COCO annotation id -> caption
    proposals: list[dict] = []
    for i, rec in enumerate(_read_region_captions(region_path)):
        if not isinstance(rec, dict) or "caption" not in rec:
            raise AnnotationError(f"{region_path}: record {i} is not an object with a 'caption'")
        text = str(rec["caption"]).strip()
        if not text:
            boxes["dropped: empty region caption"] += 1
        elif "annotation_id" in rec:
            if rec["annotation_id"] not in coco_boxes:
                boxes["dropped: unknown annotation_id"] += 1
            else:
                captioned[rec["annotation_id"]] = text
        else:
            check_fields(region_path, f"record {i}", rec, ("image_id", "bbox"))
            if rec["image_id"] not in images:
                boxes["dropped: unknown image_id"] += 1
            elif rec.get("category_id", 0) not in categories and rec.get("category_id", 0) != 0:
                raise AnnotationError(f"{region_path}: record {i} has unknown category_id {rec['category_id']}")
            else:
                proposals.append({**rec, "caption": text})

    annotations = []

    def add_box(image_id: int, category_id: int, bbox, text: str) -> None:
        x, y, w, h = (float(v) for v in bbox)
        if w * h < min_box_area:
            boxes["dropped: box under min_box_area"] += 1
            return
        annotations.append({
            "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "caption": text,
        })
        boxes["kept"] += 1

    for ann_id, ann in coco_boxes.items():
        check_fields(Path(instances_json), "annotation", ann, ("id", "image_id", "category_id", "bbox"))
        if ann.get("iscrowd", 0):
            boxes["dropped: crowd box"] += 1
        elif ann_id not in captioned:
            boxes["dropped: COCO box without region caption"] += 1
        else:
            add_box(ann["image_id"], ann["category_id"], ann["bbox"], captioned[ann_id])
    for rec in proposals:
        add_box(rec["image_id"], rec.get("category_id", 0), rec["bbox"], rec["caption"])

    caption_records = []
    for ann in captions["annotations"]:
        check_fields(captions_path, "annotation", ann, ("image_id", "caption"))
        text = str(ann["caption"]).strip()
        if ann["image_id"] not in images:
            caps["dropped: unknown image_id"] += 1
        elif not text:
            caps["dropped: empty caption"] += 1
        else:
            caption_records.append({"id": len(caption_records) + 1, "image_id": ann["image_id"], "caption": text})
            caps["kept"] += 1

    with_caption = {c["image_id"] for c in caption_records}
    with_box = {a["image_id"] for a in annotations}
    image_counts = Counter(
        images=len(images),
        **{"without caption (skipped when training)": len(set(images) - with_caption)},
        **{"without region (global loss only)": len(set(images) - with_box)},
    )
    out_categories = sorted(categories.values(), key=lambda c: c["id"])
    if any(a["category_id"] == 0 for a in annotations):
        out_categories = [PROPOSAL_CATEGORY, *out_categories]
    data = {
        "info": {"description": f"fineclip schema from {Path(instances_json).name}, {captions_path.name}, "
                                f"{region_path.name}"},
        "images": list(images.values()),
        "categories": out_categories,
        "annotations": annotations,
        "captions": caption_records,
    }
    return data, {"boxes": boxes, "captions": caps, "images": image_counts}


def format_report(report: dict[str, Counter]) -> str:
    lines = []
    for section, counts in report.items():
        lines.append(f"{section}:")
        lines += [f"  {key:<45} {value:>9,}" for key, value in sorted(counts.items())]
    return "\n".join(lines)


def write_json_atomic(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", required=True, help="COCO instances json (e.g. instances_train2017.json)")
    parser.add_argument("--captions", required=True, help="COCO captions json (e.g. captions_train2017.json)")
    parser.add_argument("--region-captions", required=True, help="json list of region-caption records")
    parser.add_argument("--out", required=True, help="output json in the fineclip schema")
    parser.add_argument("--min-box-area", type=float, default=64.0)
    args = parser.parse_args(argv)
    try:
        data, report = convert(args.instances, args.captions, args.region_captions, args.min_box_area)
    except AnnotationError as err:
        sys.exit(f"error: {err}")
    out = Path(args.out)
    write_json_atomic(data, out)
    write_json_atomic({k: dict(v) for k, v in report.items()}, out.with_name(out.name + ".report.json"))
    print(format_report(report))
    print(f"wrote {out} ({len(data['images'])} images, {len(data['annotations'])} boxes, "
          f"{len(data['captions'])} captions)")


if __name__ == "__main__":
    main()
