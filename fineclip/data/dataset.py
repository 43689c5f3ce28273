"""Dataset of images with captions and captioned regions, and the collate that flattens regions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fineclip.data.annotations import ImageRecord, RegionAnnotations, load_region_annotations
from fineclip.data.image_views import ViewRecipe, cut_views
from fineclip.data.proposals import with_proposals
from fineclip.errors import ImageLoadError

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def read_rgb(path: Path, image_id: int) -> Image.Image:
    """The decoded RGB image; a file that cannot be decoded is an ``ImageLoadError`` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot decode image id={image_id} file {path}: {err}") from err


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_image(img: Image.Image, size: tuple[int, int], mode: str = "squash",
                 interpolation: str = "bicubic") -> tuple[torch.Tensor, float, float]:
    """uint8 (3, H, W) of ``size`` and the (x, y) scale applied to the image's coordinates.

    "squash": resize to ``size`` ignoring the aspect ratio. "longest": scale so that the longest
    side fits, then pad right and bottom with black (the detection-style input).
    """
    W, H = img.size
    if mode == "squash":
        out = img.resize((size[1], size[0]), RESAMPLE[interpolation])
        return to_tensor(out), size[1] / W, size[0] / H
    if mode != "longest":
        raise ValueError(f"resize mode {mode!r}: use squash or longest")
    scale = min(size[0] / H, size[1] / W)
    new_w, new_h = round(W * scale), round(H * scale)
    canvas = torch.zeros((3, size[0], size[1]), dtype=torch.uint8)
    canvas[:, :new_h, :new_w] = to_tensor(img.resize((new_w, new_h), RESAMPLE[interpolation]))
    return canvas, scale, scale


def load_image(path: Path, image_id: int, size: tuple[int, int], mode: str = "squash",
               interpolation: str = "bicubic") -> torch.Tensor:
    """Read ``path`` as RGB and resize it to ``size`` (H, W) -> uint8 (3, H, W)."""
    return resize_image(read_rgb(path, image_id), size, mode, interpolation)[0]


def letterbox(img: Image.Image, size: int) -> torch.Tensor:
    """Longest side to ``size`` (bicubic), centred on a black ``size``² canvas -> uint8 (3, size, size)."""
    W, H = img.size
    scale = size / max(W, H)
    new_w, new_h = round(W * scale), round(H * scale)
    canvas = torch.zeros((3, size, size), dtype=torch.uint8)
    left, top = (size - new_w) // 2, (size - new_h) // 2
    canvas[:, top : top + new_h, left : left + new_w] = to_tensor(img.resize((new_w, new_h), Image.BICUBIC))
    return canvas


def region_crops(img: Image.Image, boxes: np.ndarray, thing: np.ndarray, size: int, mode: str) -> torch.Tensor:
    """uint8 (K, 3, size, size) crops cut from the full-resolution image.

    "letterbox": thing boxes enlarged 1.5x about the centre and clipped, stuff boxes as they are,
    each letterboxed (the CLIPSelf evaluation); "tight": each box as it is, squashed.
    """
    W, H = img.size
    crops = []
    for (x1, y1, x2, y2), is_thing in zip(boxes.tolist(), thing.tolist(), strict=True):
        if mode == "letterbox" and is_thing:
            cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, 0.75 * (x2 - x1), 0.75 * (y2 - y1)
            x1, y1, x2, y2 = max(cx - hw, 0), max(cy - hh, 0), min(cx + hw, W), min(cy + hh, H)
        crop = img.crop((x1, y1, x2, y2))
        crops.append(letterbox(crop, size) if mode == "letterbox" else to_tensor(crop.resize((size, size),
                                                                                              Image.BICUBIC)))
    return torch.stack(crops) if crops else torch.zeros((0, 3, size, size), dtype=torch.uint8)


def segment_masks(png: Path, segment_ids: np.ndarray, grid: tuple[int, int], mode: str) -> torch.Tensor:
    """(K, h, w) bool masks of panoptic segments on the dense feature grid: each full-resolution
    mask resized like the image (bicubic, on the 0/1 float mask) to the grid, kept where > 0."""
    from torchvision.transforms.functional import InterpolationMode, resize

    from fineclip.data.coco_panoptic import panoptic_segment_ids

    ids = torch.from_numpy(panoptic_segment_ids(png))
    masks = (ids[None] == torch.as_tensor(segment_ids)[:, None, None]).float()
    H, W = ids.shape
    if mode == "squash":
        new_h, new_w = grid
    else:
        scale = min(grid[0] / H, grid[1] / W)
        new_h, new_w = round(H * scale), round(W * scale)
    small = resize(masks, [new_h, new_w], InterpolationMode.BICUBIC, antialias=True) if len(masks) else masks
    out = torch.zeros((len(masks), *grid), dtype=torch.bool)
    out[:, :new_h, :new_w] = small[:, :new_h, :new_w] > 0
    return out


@dataclass(frozen=True)
class Reading:
    """How images and their extras are read: what an evaluation protocol fixes (``fineclip.eval.protocols``).

    resize "squash" | "longest" (padded right/bottom); interpolation "bicubic" | "bilinear"; crop_mode
    "" | "letterbox" | "tight" with crops of ``crop_size`` cut from the full-resolution image; panoptic
    masks on the dense grid ``mask_grid`` (mask pooling), or None.
    """

    resize: str = "squash"
    interpolation: str = "bicubic"
    crop_mode: str = ""
    crop_size: int = 0
    mask_grid: tuple[int, int] | None = None

    @classmethod
    def of(cls, settings: Mapping | Reading | None) -> Reading:
        if settings is None or isinstance(settings, Reading):
            return settings or cls()
        values = dict(settings)
        if values.get("mask_grid") is not None:
            values["mask_grid"] = tuple(values["mask_grid"])
        return cls(**values)


class RegionCaptionDataset(Dataset):
    """One item per image: resized image, caption(s), boxes in resized pixels, region captions.

    train=True: one caption sampled per access, at most ``max_regions`` regions (a random subset
    when there are more). train=False: all captions and all regions (up to ``max_regions``, in
    file order). Sampling depends only on (seed, epoch, index), so it is the same with any number
    of workers and after a resume.

    ``box_reading`` is how a data set with categories is read (its box protocol), ``caption_reading``
    how a captions-only one is (its retrieval protocol); both squash bicubically by default.
    """

    def __init__(
        self,
        annotations: RegionAnnotations,
        image_size: int | tuple[int, int],
        train: bool = True,
        max_regions: int = 20,
        seed: int = 0,
        box_reading: Mapping | Reading | None = None,
        caption_reading: Mapping | Reading | None = None,
        views: ViewRecipe | None = None,
    ) -> None:
        self.records = annotations.records
        self.categories = annotations.categories
        self.stats = annotations.stats
        self.stuff_ids = annotations.stuff_ids
        self.missing = annotations.missing
        self.reading = Reading.of(box_reading if self.categories else caption_reading)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.train = train
        self.max_regions = max_regions
        self.seed = seed
        self.epoch = 0
        self.views = views  # augmented views cut from the full image (DetailCLIP's reference pipeline)

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
        proposals: dict | None = None,
        **reading,
    ) -> RegionCaptionDataset:
        """``proposals`` = {file, min_score, max_per_image}: the regions are the proposals of a
        COCO-format file instead of the file's own boxes (``fineclip/data/proposals.py``)."""
        annotations = load_region_annotations(
            ann_file, image_root, min_box_area=min_box_area, require_captions=require_captions,
            require_region_captions=train and not proposals,
        )
        if proposals:
            annotations = with_proposals(annotations, proposals["file"], proposals.get("min_score", 0.0),
                                         proposals.get("max_per_image", 100), min_box_area)
        return cls(annotations, image_size, train=train, max_regions=max_regions, seed=seed, **reading)

    @classmethod
    def from_panoptic(
        cls,
        panoptic_json: str,
        png_folder: str,
        image_root: str,
        image_size: int = 224,
        max_regions: int = 100,
        min_box_area: float = 64.0,
        reference_boxes: bool = False,
        **reading,
    ) -> RegionCaptionDataset:
        """COCO panoptic segments as boxes, for box classification (no captions)."""
        from fineclip.data.coco_panoptic import load_panoptic_boxes

        annotations = load_panoptic_boxes(panoptic_json, png_folder, image_root, min_box_area, max_regions,
                                          reference_boxes=reference_boxes)
        return cls(annotations, image_size, train=False, max_regions=max_regions, **reading)

    @classmethod
    def from_instances(
        cls,
        ann_file: str,
        image_root: str,
        image_size: int = 224,
        max_regions: int = 100,
        min_box_area: float = 64.0,
        **reading,
    ) -> RegionCaptionDataset:
        """A COCO instances file (e.g. ``instances_val2017.json``, 80 classes), for box classification."""
        return cls.from_file(ann_file, image_root, image_size, train=False, max_regions=max_regions,
                             min_box_area=min_box_area, require_captions=False, **reading)

    @classmethod
    def from_coco_captions(
        cls, captions_json: str, image_root: str, image_size: int = 224, max_captions: int | None = 5, **reading
    ) -> RegionCaptionDataset:
        """A COCO captions file (e.g. ``captions_val2017.json``: 5K images), for retrieval."""
        from fineclip.data.retrieval import load_coco_captions

        return cls(load_coco_captions(captions_json, image_root, max_captions), image_size, train=False, **reading)

    @classmethod
    def from_karpathy(
        cls, karpathy_json: str, image_root: str, split: str = "test", image_size: int = 224,
        max_captions: int | None = 5,
        **reading,
    ) -> RegionCaptionDataset:
        """One split of a Karpathy-format file (COCO 5K test, Flickr30K 1K test), for retrieval."""
        from fineclip.data.retrieval import load_karpathy_split

        return cls(load_karpathy_split(karpathy_json, image_root, split, max_captions), image_size, train=False,
                   **reading)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = self.make_item(record, read_rgb(record.path, record.image_id), index)
        item.pop("kept")
        return item

    def make_item(self, record: ImageRecord, original: Image.Image, index: int) -> dict:
        """The item of ``record`` whose decoded image is ``original``, sampled from (seed, epoch, ``index``);
        ``kept`` lists the indices of the record's regions it holds."""
        rng = np.random.default_rng((self.seed, self.epoch, index))
        reading = self.reading
        image, scale_x, scale_y = resize_image(original, self.image_size, reading.resize, reading.interpolation)
        keep = np.arange(len(record.boxes))
        if len(keep) > self.max_regions:
            if self.train:
                keep = np.sort(rng.choice(keep, self.max_regions, replace=False))
            else:
                keep = keep[: self.max_regions]
        # boxes are in the pixels of the image as the annotation file sizes it
        scale = np.array([scale_x * original.width / record.width, scale_y * original.height / record.height] * 2,
                         dtype=np.float32)
        boxes = torch.from_numpy(record.boxes[keep] * scale)
        if self.train:
            caption = record.captions[int(rng.integers(len(record.captions)))]
        else:
            caption = list(record.captions)
        item = {
            "image_id": record.image_id,
            "image": image,
            "caption": caption,
            "boxes": boxes,
            "region_captions": [record.region_captions[k] for k in keep],
            "category_ids": torch.from_numpy(record.category_ids[keep]),
            "kept": keep,
        }
        if self.views is not None:  # drawn from (seed, epoch, image id) alone: the same on any ranks/workers
            item["views"] = cut_views(original, self.views, np.random.default_rng((self.seed, self.epoch,
                                                                                   int(record.image_id), 1)))
        if reading.crop_mode:
            thing = np.array([int(c) not in self.stuff_ids for c in record.category_ids[keep]], dtype=bool)
            item["crops"] = region_crops(original, record.boxes[keep], thing, reading.crop_size, reading.crop_mode)
        if reading.mask_grid is not None:
            item["masks"] = segment_masks(record.segments_png, record.segment_ids[keep], reading.mask_grid,
                                          reading.resize)
        return item


def collate_regions(samples: list[dict]) -> dict:
    """Stack images; flatten regions into (M, 5) rows (batch_index, x1, y1, x2, y2)."""
    regions = [
        torch.cat([torch.full((len(s["boxes"]), 1), float(i)), s["boxes"]], dim=1) for i, s in enumerate(samples)
    ]
    extras = {}
    if "negatives" in samples[0]:  # per region, its hard-negative captions (shards)
        extras["region_negatives"] = [n for s in samples for n in s["negatives"]]
    if "skipped" in samples[0]:  # the unreadable samples that others stood in for (shards), for the loader to count
        extras["skipped"] = [name for s in samples for name in s["skipped"]]
    return {
        **extras,
        "image_ids": torch.tensor([s["image_id"] for s in samples]),
        "images": torch.stack([s["image"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "regions": torch.cat(regions).reshape(-1, 5),
        "region_captions": [c for s in samples for c in s["region_captions"]],
        "category_ids": torch.cat([s["category_ids"] for s in samples]),
        **{key: torch.cat([s[key] for s in samples]) for key in ("crops", "masks") if key in samples[0]},
        **({"views": torch.stack([s["views"] for s in samples])} if "views" in samples[0] else {}),
    }
