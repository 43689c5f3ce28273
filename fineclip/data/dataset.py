"""Dataset of images with captions and captioned regions, and the collate that flattens regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fineclip.data.annotations import RegionAnnotations, load_region_annotations


class ImageLoadError(RuntimeError):
    """An image file that cannot be decoded; the message names the file and the image id."""


def load_image(path: Path, image_id: int, size: tuple[int, int]) -> torch.Tensor:
    """Read ``path`` as RGB, squash it to ``size`` (H, W) with bicubic resampling -> uint8 (3, H, W)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot decode image id={image_id} file {path}: {err}") from err
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class RegionCaptionDataset(Dataset):
    """One item per image: resized image, caption(s), boxes in resized pixels, region captions.

    train=True: one caption sampled per access, at most ``max_regions`` regions (a random subset
    when there are more). train=False: all captions and all regions (up to ``max_regions``, in
    file order). Sampling depends only on (seed, epoch, index), so it is the same with any number
    of workers and after a resume.
    """

    def __init__(
        self,
        annotations: RegionAnnotations,
        image_size: int | tuple[int, int],
        train: bool = True,
        max_regions: int = 20,
        seed: int = 0,
    ) -> None:
        self.records = annotations.records
        self.categories = annotations.categories
        self.stats = annotations.stats
        self.stuff_ids = annotations.stuff_ids
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.train = train
        self.max_regions = max_regions
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_file(
        cls,
        ann_file: str,
        image_root: str | None = None,
        image_size: int = 224,
        train: bool = True,
        max_regions: int = 20,
        min_box_area: float = 64.0,
        seed: int = 0,
        require_captions: bool = True,
    ) -> RegionCaptionDataset:
        annotations = load_region_annotations(
            ann_file, image_root, min_box_area=min_box_area, require_captions=require_captions,
            require_region_captions=train,
        )
        return cls(annotations, image_size, train=train, max_regions=max_regions, seed=seed)

    @classmethod
    def from_panoptic(
        cls,
        panoptic_json: str,
        png_folder: str,
        image_root: str,
        image_size: int = 224,
        max_regions: int = 100,
        min_box_area: float = 64.0,
    ) -> RegionCaptionDataset:
        """COCO panoptic segments as boxes, for box classification (no captions)."""
        from fineclip.data.coco_panoptic import load_panoptic_boxes

        annotations = load_panoptic_boxes(panoptic_json, png_folder, image_root, min_box_area, max_regions)
        return cls(annotations, image_size, train=False, max_regions=max_regions)

    @classmethod
    def from_instances(
        cls,
        ann_file: str,
        image_root: str,
        image_size: int = 224,
        max_regions: int = 100,
        min_box_area: float = 64.0,
    ) -> RegionCaptionDataset:
        """A COCO instances file (e.g. ``instances_val2017.json``, 80 classes), for box classification."""
        return cls.from_file(ann_file, image_root, image_size, train=False, max_regions=max_regions,
                             min_box_area=min_box_area, require_captions=False)

    @classmethod
    def from_coco_captions(
        cls, captions_json: str, image_root: str, image_size: int = 224, max_captions: int = 5
    ) -> RegionCaptionDataset:
        """A COCO captions file (e.g. ``captions_val2017.json``: 5K images), for retrieval."""
        from fineclip.data.retrieval import load_coco_captions

        return cls(load_coco_captions(captions_json, image_root, max_captions), image_size, train=False)

    @classmethod
    def from_karpathy(
        cls, karpathy_json: str, image_root: str, split: str = "test", image_size: int = 224, max_captions: int = 5
    ) -> RegionCaptionDataset:
        """One split of a Karpathy-format file (COCO 5K test, Flickr30K 1K test), for retrieval."""
        from fineclip.data.retrieval import load_karpathy_split

        return cls(load_karpathy_split(karpathy_json, image_root, split, max_captions), image_size, train=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = load_image(record.path, record.image_id, self.image_size)
        keep = np.arange(len(record.boxes))
        if len(keep) > self.max_regions:
            if self.train:
                keep = np.sort(rng.choice(keep, self.max_regions, replace=False))
            else:
                keep = keep[: self.max_regions]
        scale = np.array(
            [self.image_size[1] / record.width, self.image_size[0] / record.height] * 2, dtype=np.float32
        )
        boxes = torch.from_numpy(record.boxes[keep] * scale)
        if self.train:
            caption = record.captions[int(rng.integers(len(record.captions)))]
        else:
            caption = list(record.captions)
        return {
            "image_id": record.image_id,
            "image": image,
            "caption": caption,
            "boxes": boxes,
            "region_captions": [record.region_captions[k] for k in keep],
            "category_ids": torch.from_numpy(record.category_ids[keep]),
        }


def collate_regions(samples: list[dict]) -> dict:
    """Stack images; flatten regions into (M, 5) rows (batch_index, x1, y1, x2, y2)."""
    regions = [
        torch.cat([torch.full((len(s["boxes"]), 1), float(i)), s["boxes"]], dim=1) for i, s in enumerate(samples)
    ]
    return {
        "image_ids": torch.tensor([s["image_id"] for s in samples]),
        "images": torch.stack([s["image"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "regions": torch.cat(regions).reshape(-1, 5),
        "region_captions": [c for s in samples for c in s["region_captions"]],
        "category_ids": torch.cat([s["category_ids"] for s in samples]),
    }
