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

FineCLIP's released files are read as they are:

- region captions as one json **object** ``{"<file_name>_<x>_<y>_<w>_<h>.jpg": caption}`` (the box in
  integer pixels, COCO x/y/w/h): each key becomes a region of the image of that file name;
- ``--proposals coco_proposals.json`` (COCO instances format, category ids ignored; CLIPSelf ships
  a file of the same name): the boxes come from it instead, each matched to a key by file name and
  its box truncated (or else rounded) to integers;
- ``--retrieval-list test.json`` (``[{"image": file_name, "caption": [str, ...]}]``, COCO and
  Flickr30K) with ``--image-root``: a retrieval-only file (images and captions, no regions).

Keys that match no image (or no proposal box) and proposal boxes without a caption are counted in
the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from fineclip.data.annotations import check_fields, read_annotation_json
from fineclip.errors import AnnotationError

PROPOSAL_CATEGORY = {"id": 0, "name": "region", "supercategory": "region"}


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise AnnotationError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(f"malformed json in {path}: {err.msg} at line {err.lineno}, column {err.colno}") from err


def _read_region_captions(path: Path) -> list[dict] | dict:
    records = _read_json(path, "region-caption")
    if not isinstance(records, (list, dict)):
        raise AnnotationError(f"{path}: expected a json list of region-caption records or a released "
                              "{\"<file_name>_<x>_<y>_<w>_<h>.jpg\": caption} object")
    return records


def parse_region_key(key: str) -> tuple[str, tuple[int, int, int, int]] | None:
    """"000000391895.jpg_359_146_112_213.jpg" -> ("000000391895.jpg", (359, 146, 112, 213)); None if
    the key does not have that form."""
    stem = key[:-4] if key.endswith(".jpg") else key
    parts = stem.rsplit("_", 4)
    if len(parts) != 5 or not parts[0]:
        return None
    try:
        return parts[0], tuple(int(v) for v in parts[1:])
    except ValueError:
        return None


def released_region_records(mapping: dict, file_to_id: dict[str, int], proposals: list[dict] | None,
                            counts: Counter) -> list[dict]:
    """Region records ``{"image_id", "bbox", "caption"}`` from a released key -> caption object: the
    key's box, or (with ``proposals``) the proposal box whose integer box is the key's."""
    by_key: dict[tuple, str] = {}
    for key, caption in mapping.items():
        parsed = parse_region_key(key)
        if parsed is None or parsed[0] not in file_to_id:
            counts["dropped: region-caption key matching no image"] += 1
            continue
        by_key[(file_to_id[parsed[0]], parsed[1])] = str(caption)
    if proposals is None:
        return [{"image_id": image_id, "bbox": list(box), "caption": text} for (image_id, box), text in by_key.items()]
    records, used = [], set()
    for proposal in proposals:
        bbox = [float(v) for v in proposal["bbox"]]
        for key in ((proposal["image_id"], tuple(int(v) for v in bbox)),
                    (proposal["image_id"], tuple(round(v) for v in bbox))):
            if key in by_key:
                records.append({"image_id": proposal["image_id"], "bbox": bbox, "caption": by_key[key]})
                used.add(key)
                break
        else:
            counts["dropped: proposal box without region caption"] += 1
    counts["dropped: region-caption key matching no proposal box"] += len(set(by_key) - used)
    return records


def retrieval_list(path: str | Path, image_root: str | Path) -> tuple[dict, Counter]:
    """A retrieval test list ``[{"image": file_name, "caption": [str, ...]}]`` as a fineclip-schema
    file of images and captions (sizes read from the image headers under ``image_root``)."""
    from PIL import Image

    path, root = Path(path), Path(image_root)
    items = _read_json(path, "retrieval list")
    if not isinstance(items, list):
        raise AnnotationError(f"{path}: expected a json list of {{\"image\", \"caption\"}} records")
    images, captions, counts = [], [], Counter()
    for i, item in enumerate(items):
        check_fields(path, f"record {i}", item, ("image", "caption"))
        texts = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
        try:
            with Image.open(root / item["image"]) as im:
                width, height = im.size
        except OSError as err:
            raise AnnotationError(f"{path}: record {i}: cannot read image {root / item['image']}: {err}") from err
        images.append({"id": i + 1, "file_name": item["image"], "width": width, "height": height})
        for text in texts:
            if str(text).strip():
                captions.append({"id": len(captions) + 1, "image_id": i + 1, "caption": str(text).strip()})
            else:
                counts["dropped: empty caption"] += 1
    counts.update(images=len(images), captions=len(captions))
    data = {"info": {"description": f"retrieval test list {path.name}"}, "images": images, "annotations": [],
            "categories": [], "captions": captions}
    return data, counts


def convert(
    instances_json: str | Path,
    captions_json: str | Path,
    region_captions_json: str | Path,
    min_box_area: float = 64.0,
    proposals_json: str | Path | None = None,
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
    region_records = _read_region_captions(region_path)
    released = isinstance(region_records, dict)
    if released:  # FineCLIP's release: the regions are the keys' (or the proposals file's) boxes
        proposal_boxes = None
        if proposals_json is not None:
            proposal_boxes = read_annotation_json(Path(proposals_json), required=("annotations",))["annotations"]
        file_to_id = {im["file_name"]: image_id for image_id, im in images.items()}
        region_records = released_region_records(region_records, file_to_id, proposal_boxes, boxes)
    elif proposals_json is not None:
        raise AnnotationError("--proposals goes with a released region-caption object (keys "
                              "<file_name>_<x>_<y>_<w>_<h>.jpg), not a list of records")
    for i, rec in enumerate(region_records):
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

    for ann_id, ann in coco_boxes.items() if not released else ():
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
    parser.add_argument("--instances", help="COCO instances json (e.g. instances_train2017.json)")
    parser.add_argument("--captions", help="COCO captions json (e.g. captions_train2017.json)")
    parser.add_argument("--region-captions", help="json list of region-caption records, or FineCLIP's released "
                                                  "{\"<file_name>_<x>_<y>_<w>_<h>.jpg\": caption} object")
    parser.add_argument("--proposals", help="with a released object: coco_proposals.json, the boxes to caption")
    parser.add_argument("--retrieval-list", help="a released retrieval test list [{image, caption: [...]}] "
                                                 "(instead of the three files above)")
    parser.add_argument("--image-root", help="with --retrieval-list: the folder of its images")
    parser.add_argument("--out", required=True, help="output json in the fineclip schema")
    parser.add_argument("--min-box-area", type=float, default=64.0)
    args = parser.parse_args(argv)
    try:
        if args.retrieval_list:
            if not args.image_root:
                parser.error("--retrieval-list needs --image-root (image sizes are read from the files)")
            data, counts = retrieval_list(args.retrieval_list, args.image_root)
            report = {"retrieval": counts}
        else:
            missing = [f"--{n}" for n in ("instances", "captions", "region-captions")
                       if not getattr(args, n.replace("-", "_"))]
            if missing:
                parser.error(f"missing {', '.join(missing)} (or use --retrieval-list)")
            data, report = convert(args.instances, args.captions, args.region_captions, args.min_box_area,
                                   args.proposals)
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
