"""Open-vocabulary detection data: a COCO-format instances file read with a base/novel class split.

Training keeps the annotations of base classes only (and the images that have one, as mmdet filters
empty ones) and applies large-scale jitter: resize keeping the ratio so that the long side is r·S,
r ~ U(0.1, 2.0); a random crop of at most S×S (boxes shifted and clipped, those under 0.01 px dropped, an
empty crop allowed); a horizontal flip with probability 0.5; padding to S×S. The jitter of an image and the
seed of its detector samples (the target's ``seed``) depend on (seed, epoch, index) only. Evaluation resizes every image
keeping the ratio into S×S and pads it; ``scale`` maps the detections back to the file's pixels.
Labels are 1…C in the split's class order (0 is the background). With ``masks`` (OV-LVIS) each box's
instance mask (the annotation's polygons or RLE, pycocotools) takes the same resize, crop and flip.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fineclip.errors import AnnotationError


@dataclass(frozen=True)
class OVSplit:
    names: tuple[str, ...]  # the C classes, label = index + 1, in the file's category order
    category_ids: tuple[int, ...]
    novel: frozenset[str]

    @property
    def novel_mask(self) -> torch.Tensor:
        """(C + 1,) bool, background first."""
        return torch.tensor([False] + [n in self.novel for n in self.names])

    def class_weight(self, background: float) -> torch.Tensor:
        """(C + 1,): background ``background``, base 1, novel 0."""
        return torch.tensor([background] + [0.0 if n in self.novel else 1.0 for n in self.names])


def read_split(ann_file: str | Path, base: tuple[str, ...] | None, novel: tuple[str, ...] | None) -> OVSplit:
    """The split's classes as the file names them; a class of the split missing from the file is an error.
    ``base`` and ``novel`` both None: LVIS's split by the file's own ``frequency`` field, the rare classes
    novel and the frequent and common ones base (v1: 337 / 405 + 461, CLIPSelf's seen/unseen lists)."""
    data = _load(ann_file)
    if base is None and novel is None:
        if any("frequency" not in c for c in data["categories"]):
            raise AnnotationError(f"{ann_file}: data.base/data.novel are null (split by LVIS frequency), but the "
                                  "file's categories have no 'frequency' field")
        base = tuple(c["name"] for c in data["categories"] if c["frequency"] in ("f", "c"))
        novel = tuple(c["name"] for c in data["categories"] if c["frequency"] == "r")
    by_name = {c["name"]: c["id"] for c in data["categories"]}
    missing = [n for n in (*base, *novel) if n not in by_name]
    if missing:
        raise AnnotationError(f"{ann_file}: the class split names classes the file does not have: {missing}")
    wanted = set(base) | set(novel)
    chosen = [c for c in data["categories"] if c["name"] in wanted]
    return OVSplit(tuple(c["name"] for c in chosen), tuple(c["id"] for c in chosen), frozenset(novel))


def image_file(image: dict) -> str:
    """An image record's path under the image root: ``file_name``, or LVIS's ``coco_url`` without the host
    (``train2017/000000391895.jpg``, the image root then being the COCO folder)."""
    if "file_name" in image:
        return image["file_name"]
    if "coco_url" in image:
        return "/".join(image["coco_url"].split("/")[-2:])
    raise AnnotationError(f"image id={image.get('id')} has neither 'file_name' nor 'coco_url'")


def _load(ann_file: str | Path) -> dict:
    import json

    path = Path(ann_file)
    if not path.is_file():
        raise AnnotationError(f"annotation file not found: {path}")
    return json.loads(path.read_text())


def keep_ratio_size(height: int, width: int, factor: float) -> tuple[int, int]:
    return int(height * factor + 0.5), int(width * factor + 0.5)


class OVDetectionSet(Dataset):
    def __init__(self, ann_file: str, image_root: str, split: OVSplit, size: int, train: bool, seed: int = 0,
                 scale_range: tuple[float, float] = (0.1, 2.0), masks: bool = False) -> None:
        from pycocotools.coco import COCO

        self.coco = COCO()
        self.coco.dataset = _load(ann_file)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        self.ann_file, self.root, self.split, self.size, self.train = ann_file, Path(image_root), split, size, train
        self.seed, self.epoch, self.scale_range, self.masks = seed, 0, scale_range, masks
        label_of = {cid: i + 1 for i, cid in enumerate(split.category_ids)}
        named = zip(split.category_ids, split.names, strict=True)
        allowed = {cid for cid, name in named if not (train and name in split.novel)}  # training: base only
        self.records = []
        for image_id in sorted(self.coco.imgs):
            anns = [a for a in self.coco.imgToAnns.get(image_id, []) if a["category_id"] in allowed
                    and not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
            if train and not anns:
                continue
            boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                             dtype=np.float32).reshape(-1, 4)
            labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
            self.records.append((image_id, image_file(self.coco.imgs[image_id]), boxes, labels,
                                 [a["id"] for a in anns]))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image_id, file_name, boxes, labels, ann_ids = self.records[index]
        path = self.root / file_name
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except OSError as err:
            raise AnnotationError(f"cannot read image id={image_id} {path}: {err}") from err
        masks = [Image.fromarray(self.coco.annToMask(self.coco.anns[i]) * 255) for i in ann_ids] if self.masks else []
        seed = None
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, masks, boxes, labels, scale = self._jitter(image, masks, boxes, labels, rng)
            seed = int(rng.integers(2**62))  # the detector's RPN / RoI samples of this image
        else:
            scale = min(self.size / image.height, self.size / image.width)
            height, width = keep_ratio_size(image.height, image.width, scale)
            image, boxes = image.resize((width, height), Image.BILINEAR), boxes * scale
            masks = [m.resize((width, height), Image.BILINEAR) for m in masks]
        target = {"boxes": torch.from_numpy(boxes).float().reshape(-1, 4), "labels": torch.from_numpy(labels),
                  "image_id": image_id, "scale": scale}
        if seed is not None:
            target["seed"] = seed
        if self.masks:
            target["masks"] = torch.stack([self._canvas(m)[0] >= 128 for m in masks]).to(torch.uint8) if masks else \
                torch.zeros(0, self.size, self.size, dtype=torch.uint8)
        return self._canvas(image), target

    def _canvas(self, image: Image.Image) -> torch.Tensor:
        """(channels, S, S) uint8: the image at the top left, zeros elsewhere."""
        array = torch.from_numpy(np.asarray(image).copy())
        array = array[None] if array.dim() == 2 else array.permute(2, 0, 1)
        pixels = torch.zeros(array.shape[0], self.size, self.size, dtype=torch.uint8)
        pixels[:, : array.shape[1], : array.shape[2]] = array
        return pixels

    def _jitter(self, image, masks, boxes, labels, rng):
        ratio = rng.uniform(*self.scale_range)
        scale = self.size * ratio / max(image.height, image.width)
        height, width = keep_ratio_size(image.height, image.width, scale)
        image, boxes = image.resize((width, height), Image.BILINEAR), boxes * scale
        crop_h, crop_w = min(height, self.size), min(width, self.size)
        top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        window = (left, top, left + crop_w, top + crop_h)
        image = image.crop(window)
        masks = [m.resize((width, height), Image.BILINEAR).crop(window) for m in masks]
        boxes = (boxes - np.array([left, top, left, top], dtype=np.float32)).clip(0, [crop_w, crop_h, crop_w, crop_h])
        keep = ((boxes[:, 2] - boxes[:, 0]) > 0.01) & ((boxes[:, 3] - boxes[:, 1]) > 0.01)
        boxes, labels, masks = boxes[keep], labels[keep], [m for m, k in zip(masks, keep, strict=False) if k]
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            masks = [m.transpose(Image.FLIP_LEFT_RIGHT) for m in masks]
            boxes = np.stack([crop_w - boxes[:, 2], boxes[:, 1], crop_w - boxes[:, 0], boxes[:, 3]], axis=1)
        return image, masks, boxes.astype(np.float32), labels, scale


def collate(samples):
    return [s[0] for s in samples], [s[1] for s in samples]

