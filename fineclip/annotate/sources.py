"""Where the images come from: a folder (every image file under it, sorted, ids 1…N in that order)
or a COCO-format json (its images, ids and image captions; its boxes for ``proposals=gt``).
Records are small; images are opened one at a time by ``load_image``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fineclip.data.annotations import read_annotation_json
from fineclip.errors import AnnotationError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class SourceBox:
    bbox: list[float]  # COCO x, y, w, h
    category_id: int | None = None
    attributes: list[str] = field(default_factory=list)


@dataclass
class ImageRecord:
    image_id: int
    file_name: str  # relative to the source's root
    path: Path
    captions: list[str] = field(default_factory=list)
    boxes: list[SourceBox] = field(default_factory=list)


@dataclass
class ImageSource:
    records: list[ImageRecord]
    categories: list[dict]  # COCO categories (empty for a folder)
    root: Path
    kind: str  # "folder" or "json"


def read_source(images: str, image_root: str | None = None, captions: str | None = None) -> ImageSource:
    """A folder of images, or a COCO-format json (``image_root``: the folder its ``file_name``\\ s are
    relative to; default the json's folder). Image captions are a fineclip ``captions`` list or, as in
    COCO's captions files, annotations with a ``caption`` and no ``bbox``; ``captions``: another COCO
    captions file whose captions are added (by image id)."""
    path = Path(images)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise AnnotationError(f"images={images}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under it")
        records = [ImageRecord(i + 1, str(f.relative_to(path)), f) for i, f in enumerate(files)]
        return ImageSource(records, [], path, "folder")
    if not path.is_file():
        raise AnnotationError(f"images={images}: neither a folder nor a json file")
    data = read_annotation_json(path, required=("images",))
    root = Path(image_root) if image_root else path.parent
    by_id = {}
    for image in data["images"]:
        if "id" not in image or "file_name" not in image:
            raise AnnotationError(f"{path}: an image record without id or file_name: {image}")
        by_id[image["id"]] = ImageRecord(image["id"], image["file_name"], root / image["file_name"])
    for record in data.get("captions", []):
        if record.get("image_id") in by_id:
            by_id[record["image_id"]].captions.append(record["caption"])
    for ann in data.get("annotations", []):
        record = by_id.get(ann.get("image_id"))
        if record is None:
            raise AnnotationError(f"{path}: annotation id={ann.get('id')} refers to an unknown image_id")
        if "bbox" in ann:
            if not ann.get("iscrowd", 0):
                record.boxes.append(SourceBox([float(v) for v in ann["bbox"]], ann.get("category_id"),
                                              list(ann.get("attributes", []))))
        elif "caption" in ann:
            record.captions.append(ann["caption"])
    if captions:
        extra = read_annotation_json(Path(captions), required=("annotations",))
        for ann in extra["annotations"]:
            if ann.get("image_id") in by_id and str(ann.get("caption", "")).strip():
                by_id[ann["image_id"]].captions.append(str(ann["caption"]).strip())
    return ImageSource(list(by_id.values()), list(data.get("categories", [])), root, "json")


def load_image(record: ImageRecord) -> Image.Image:
    """The record's image as RGB; raises ``OSError`` (or ``ValueError``) when it cannot be read."""
    with Image.open(record.path) as image:
        return image.convert("RGB")
