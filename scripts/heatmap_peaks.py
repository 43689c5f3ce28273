"""How often a text heatmap peaks inside the pixels it names, on the synthetic val scenes, for a checkpoint.

    --text class    (default) for each class in an image, the heatmap of "a {class}" against the pixels
                    of that class; chance is the class's share of the image
    --text caption  for each object, the heatmap of its own region caption ("a large striped red star")
                    against that object's mask; chance is the mask's share of the image

    python scripts/heatmap_peaks.py RUN/checkpoints/last.pt [--text caption] [--template "a {}"]
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from fineclip.evaluate import load_model
from fineclip.viz.maps import text_heatmap


def targets(annotations: list[dict], names: dict[int, str], mode: str, template: str) -> list[tuple[str, np.ndarray]]:
    """(text, bool mask it should peak in) for one image's annotations."""
    masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in annotations]
    if mode == "caption":
        return [(a["caption"], m) for a, m in zip(annotations, masks, strict=True)]
    by_class: dict[int, np.ndarray] = {}
    for a, m in zip(annotations, masks, strict=True):
        by_class[a["category_id"]] = by_class.get(a["category_id"], np.zeros_like(m)) | m
    return [(template.format(names[c]), m) for c, m in by_class.items()]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--text", choices=("class", "caption"), default="class")
    parser.add_argument("--template", default="a {}", help="the class prompt (--text class)")
    args = parser.parse_args()
    model, _ = load_model(OmegaConf.create({"checkpoint": args.checkpoint, "model": None}))
    model.eval()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    root = Path(state["config"]["data"]["root"])
    data = json.loads((root / "val.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    inside = chance = total = 0
    for info in data["images"]:
        pairs = [(t, m) for t, m in targets(per_image.get(info["id"], []), names, args.text, args.template) if m.any()]
        if not pairs:
            continue
        image = Image.open(root / info["file_name"]).convert("RGB").resize(model.image_size[::-1], Image.BICUBIC)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        _, dense = model.encode_image_dense(model.normalize_pixels(pixels[None]), with_global=False)
        texts = model.encode_text([t for t, _ in pairs]).float()
        for (_, mask), text in zip(pairs, texts, strict=True):
            heat = text_heatmap(dense[0], text, mask.shape)
            inside += int(mask[divmod(int(heat.argmax()), mask.shape[1])])
            chance += float(mask.mean())
            total += 1
    what = "class's pixels" if args.text == "class" else "object's mask"
    print(f"{total} {args.text} texts on {len(per_image)} val images: the heatmap peaks inside the {what} for "
          f"{100 * inside / total:.1f} % (chance: {100 * chance / total:.1f} %)")


if __name__ == "__main__":
    main()
