"""How often a text heatmap peaks inside the pixels the text names: the number behind the heatmap
pictures, on a data set with instance masks (the synthetic scenes, COCO).

    class    for each class present in an image, the heatmap of its prompt ("a {class}") against the
             union of that class's masks in the image
    caption  for each object, the heatmap of its own region caption against its own mask

A hit is a heatmap whose argmax pixel (``text_heatmap``, upsampled to the image) lies in the mask;
chance is the mask's share of the image (a peak at a uniformly random pixel). A miss lies either on
another object or on the background (no object's mask): ``on_objects`` counts the peaks on any.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fineclip.eval.maps import text_heatmap


@dataclass
class PeakRate:
    inside: int = 0    # heatmaps that peak inside their mask
    total: int = 0     # heatmaps measured
    chance: float = 0.0  # summed mask shares of the image
    on_objects: int = 0  # heatmaps that peak inside any object's mask of the image

    @property
    def rate(self) -> float:
        return self.inside / max(self.total, 1)

    @property
    def chance_rate(self) -> float:
        return self.chance / max(self.total, 1)


def _targets(coco, anns: list[dict], masks: list[np.ndarray], text: str, template: str) -> list[tuple[str, np.ndarray]]:
    """(text, bool mask it should peak in) for one image's annotations and their masks; empty masks
    left out."""
    if text == "caption":
        pairs = [(a["caption"], m) for a, m in zip(anns, masks, strict=True)]
    else:
        by_class: dict[int, np.ndarray] = {}
        for a, mask in zip(anns, masks, strict=True):
            by_class[a["category_id"]] = by_class.get(a["category_id"], np.zeros_like(mask)) | mask
        names = {c["id"]: c["name"] for c in coco.loadCats(list(by_class))}
        pairs = [(template.format(names[c]), m) for c, m in by_class.items()]
    return [(t, m) for t, m in pairs if m.any()]


@torch.no_grad()
def heatmap_peak_rate(model, ann_file: str | Path, image_root: str | Path | None = None, text: str = "class",
                      template: str = "a {}", max_images: int | None = None) -> PeakRate:
    """Peak hits of ``model``'s text heatmaps over the images of ``ann_file`` (fineclip/COCO schema
    with ``segmentation`` masks). Each image is resized to the model's input; the heatmap is
    upsampled back to the image's own size, where the mask lives."""
    from pycocotools.coco import COCO

    if text not in ("class", "caption"):
        raise ValueError(f"text must be 'class' or 'caption', not {text!r}")
    ann_file = Path(ann_file)
    root = Path(image_root) if image_root else ann_file.parent
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO(str(ann_file))
    device = next(model.parameters()).device
    result = PeakRate()
    for image_id in sorted(coco.getImgIds())[:max_images]:
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        missing = [a["id"] for a in anns if "segmentation" not in a]
        if missing:
            raise ValueError(f"{ann_file}: annotation {missing[0]} (image {image_id}) has no segmentation mask")
        masks = [coco.annToMask(a).astype(bool) for a in anns]
        pairs = _targets(coco, anns, masks, text, template)
        if not pairs:
            continue
        objects = np.any(masks, axis=0)
        with Image.open(root / coco.imgs[image_id]["file_name"]) as img:
            image = img.convert("RGB").resize(model.image_size[::-1], Image.BICUBIC)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).to(device)
        _, dense = model.encode_image_dense(model.normalize_pixels(pixels[None]), with_global=False)
        texts = model.encode_text([t for t, _ in pairs]).float()
        for (_, mask), text_emb in zip(pairs, texts, strict=True):
            heat = text_heatmap(dense[0], text_emb, mask.shape)
            row, col = divmod(int(heat.argmax()), mask.shape[1])
            result.inside += int(mask[row, col])
            result.on_objects += int(objects[row, col])
            result.chance += float(mask.mean())
            result.total += 1
    return result
