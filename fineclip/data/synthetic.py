"""Synthetic scenes of coloured shapes, written in the fineclip annotation schema.

Each image holds 2-4 objects (one of 12 shapes, colour, size, texture, position) on a background
of varied colour and pattern. Every image gets several captions that describe the whole scene,
every object a box, a category (its shape; its colour with ``--classes colour``), an instance mask
of its visible pixels (COCO RLE) and a region caption that says more than its shape name, the way
an LVLM caption of the crop would ("a large striped red star"). Output is deterministic for a given seed:

    python -m fineclip.data.synthetic --out DIR --train 1920 --val 256 --size 64 --seed 0 [--classes colour]

writes ``DIR/{train,val}/*.png`` and ``DIR/{train,val}.json`` (schema: ``fineclip/data/schema.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from fineclip.data.captions import hard_negatives, rule_caption

VERSION = 8  # bump when the output for a given seed changes
SHAPES = (
    "circle", "square", "triangle", "cross", "star", "diamond",
    "hexagon", "ring", "heart", "crescent", "arrow", "pentagon",
)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
BACKGROUNDS = {
    "gray": (128, 128, 128),
    "beige": (215, 200, 170),
    "teal": (40, 110, 110),
    "brown": (110, 75, 45),
    "pink": (225, 170, 185),
    "navy": (30, 35, 80),
}
BACKGROUND_PATTERNS = ("plain", "noisy", "gradient", "checkered")
TEXTURES = ("solid", "striped", "dotted")
SIZES = {"small": (0.28, 0.36), "medium": (0.38, 0.46), "large": (0.48, 0.58)}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
ATTRIBUTE_KINDS = (tuple(COLOURS), TEXTURES, tuple(SIZES))  # what a hard negative swaps an attribute within
# What an object's category is. Shapes are the task of every synthetic table; a colour is visible in
# each 8-px patch, so a tiny model's dense tokens learn colours in a minute but shapes hardly at all.
CLASSES = {"shape": SHAPES, "colour": tuple(COLOURS)}


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    texture: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels

    def position(self, image_size: int) -> str:
        """Where the object's centre lies on a 3x3 grid: "top left", "centre", "right", ..."""
        cx = (self.box[0] + self.box[2]) / 2 / image_size
        cy = (self.box[1] + self.box[3]) / 2 / image_size
        row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
        col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
        return f"{row} {col}".strip() or "centre"

    def short_phrase(self) -> str:
        texture = "" if self.texture == "solid" else f"{self.texture} "
        return f"a {self.colour} {texture}{self.shape}"

    def region_details(self, rng: random.Random) -> list[str]:
        """The words a captioner says about the crop besides the shape: some of its size, texture and
        colour (captioners vary in how much detail they give), never the class name alone. The
        region caption is ``rule_caption(shape, details)``, and the annotation keeps the details as
        its ``attributes``."""
        details = [d for d in (self.size, self.texture, self.colour) if rng.random() < 0.6]
        return details or [self.colour]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw_background(rng: random.Random, size: int, colour: tuple[int, int, int], pattern: str):
    image = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(image)
    if pattern == "noisy":
        for _ in range(size * size // 6):
            x, y = rng.randrange(size), rng.randrange(size)
            d = rng.randint(-15, 15)
            draw.point((x, y), fill=tuple(max(0, min(255, c + d)) for c in colour))
    elif pattern == "gradient":
        for y in range(size):
            f = 0.7 + 0.6 * y / size
            draw.line([(0, y), (size, y)], fill=tuple(max(0, min(255, int(c * f))) for c in colour))
    elif pattern == "checkered":
        cell = max(4, size // 8)
        alt = tuple(max(0, min(255, c + 15)) for c in colour)
        for y in range(0, size, cell):
            for x in range(0, size, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=alt)
    return image


def _regular_polygon(cx: float, cy: float, radius: float, corners: int, turn: float = 0.0) -> list[tuple]:
    """Corners of a regular polygon, the first one straight up (rotated by ``turn`` radians)."""
    return [(cx + radius * math.sin(turn + 2 * math.pi * k / corners),
             cy - radius * math.cos(turn + 2 * math.pi * k / corners)) for k in range(corners)]


def _shape_mask(shape: str, box, size: int) -> Image.Image:
    """A binary mask (mode "L") of ``shape`` filling ``box``."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = box
    x2, y2 = x2 - 1, y2 - 1  # PIL's rectangles and ellipses include their far edge
    w, h = x2 - x1, y2 - y1
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, min(w, h) / 2
    if shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=255)
    elif shape == "square":
        draw.rectangle([x1, y1, x2, y2], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=255)
    elif shape == "cross":
        draw.rectangle([x1 + w / 3, y1, x1 + 2 * w / 3, y2], fill=255)
        draw.rectangle([x1, y1 + h / 3, x2, y1 + 2 * h / 3], fill=255)
    elif shape == "star":
        outer, inner = _regular_polygon(cx, cy, r, 5), _regular_polygon(cx, cy, 0.45 * r, 5, math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=255)
    elif shape == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, r, 6, math.pi / 6), fill=255)
    elif shape == "pentagon":
        draw.polygon(_regular_polygon(cx, cy, r, 5), fill=255)
    elif shape == "ring":
        draw.ellipse([x1, y1, x2, y2], fill=255)
        draw.ellipse([x1 + 0.3 * w, y1 + 0.3 * h, x2 - 0.3 * w, y2 - 0.3 * h], fill=0)
    elif shape == "heart":
        draw.ellipse([x1, y1, cx + 0.02 * w, y1 + 0.55 * h], fill=255)
        draw.ellipse([cx - 0.02 * w, y1, x2, y1 + 0.55 * h], fill=255)
        draw.polygon([(x1 + 0.02 * w, y1 + 0.38 * h), (x2 - 0.02 * w, y1 + 0.38 * h), (cx, y2)], fill=255)
    elif shape == "crescent":
        draw.ellipse([x1, y1, x2, y2], fill=255)
        draw.ellipse([x1 + 0.35 * w, y1 - 0.05 * h, x2 + 0.35 * w, y2 - 0.05 * h], fill=0)
    elif shape == "arrow":  # pointing right
        draw.rectangle([x1, y1 + 0.35 * h, x1 + 0.55 * w, y1 + 0.65 * h], fill=255)
        draw.polygon([(x1 + 0.5 * w, y1), (x2, cy), (x1 + 0.5 * w, y2)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _texture_layer(texture: str, colour, box, size: int) -> Image.Image:
    layer = Image.new("RGB", (size, size), colour)
    if texture == "solid":
        return layer
    draw = ImageDraw.Draw(layer)
    # a mild contrast: the pattern must not hide the silhouette
    dark = tuple(int(c * 0.7) for c in colour) if sum(colour) > 150 else (90, 90, 90)
    x1, y1, x2, y2 = (int(v) for v in box)
    step = max(3, (x2 - x1) // 5)
    if texture == "striped":
        for x in range(x1 - (y2 - y1), x2, step):
            draw.line([(x, y2), (x + (y2 - y1), y1)], fill=dark, width=max(1, step // 3))
    elif texture == "dotted":
        r = max(1, step // 4)
        for y in range(y1 + step // 2, y2, step):
            for x in range(x1 + step // 2, x2, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=dark)
    return layer


def _place_objects(rng: random.Random, size: int, count: int) -> list[SceneObject]:
    objects: list[SceneObject] = []
    for _ in range(200):
        if len(objects) == count:
            break
        size_name = rng.choice(list(SIZES))
        lo, hi = SIZES[size_name]
        side = rng.uniform(lo, hi) * size
        x1, y1 = rng.uniform(0, size - side), rng.uniform(0, size - side)
        box = (round(x1), round(y1), round(x1 + side), round(y1 + side))
        if any(_iou(box, o.box) > 0.1 for o in objects):
            continue
        objects.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                colour=rng.choice(list(COLOURS)),
                size=size_name,
                texture=rng.choice(TEXTURES),
                box=box,
            )
        )
    return objects


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _scene_captions(rng: random.Random, objects: list[SceneObject], background: str, size: int) -> list[str]:
    phrases = [o.short_phrase() for o in objects]
    shuffled = phrases[:]
    rng.shuffle(shuffled)
    n = NUMBER_WORDS.get(len(objects), str(len(objects)))
    return [
        f"{_join(phrases)} on a {background} background",
        f"{n} shapes on {background}: {_join(shuffled)}",
        f"on {background}: {_join([f'{o.colour} {o.shape} {o.position(size)}' for o in objects])}",
    ]


def render_scene(rng: random.Random, size: int):
    """Draw one scene; returns the image, its captions, its objects and each object's visible mask
    (bool (size, size) arrays: its own pixels minus those of objects drawn over it)."""
    background = rng.choice(list(BACKGROUNDS))
    pattern = rng.choice(BACKGROUND_PATTERNS)
    image = _draw_background(rng, size, BACKGROUNDS[background], pattern)
    objects = _place_objects(rng, size, rng.randint(2, 4))
    masks = []
    for obj in objects:
        mask = _shape_mask(obj.shape, obj.box, size)
        image.paste(_texture_layer(obj.texture, COLOURS[obj.colour], obj.box, size), (0, 0), mask)
        drawn = np.asarray(mask) > 0
        masks = [m & ~drawn for m in masks] + [drawn]
    return image, _scene_captions(rng, objects, background, size), objects, background, masks


def encode_mask(mask: np.ndarray) -> dict:
    """A bool (H, W) mask as COCO's compressed RLE, json-ready ({"size": [H, W], "counts": str})."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def write_split(out: Path, split: str, count: int, size: int, seed: int, classes: str = "shape") -> Path:
    """Render ``count`` scenes into ``out/split/`` and their annotations into ``out/split.json``; each
    object's category is its ``classes`` attribute ("shape" or "colour"). The scenes and captions do
    not depend on ``classes``."""
    if classes not in CLASSES:
        raise ValueError(f"classes must be one of {sorted(CLASSES)}, not {classes!r}")
    rng = random.Random(f"{seed}-{split}")
    (out / split).mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": s, "supercategory": classes} for i, s in enumerate(CLASSES[classes])]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations, captions = [], [], []
    for image_id in range(1, count + 1):
        image, scene_captions, objects, background, masks = render_scene(rng, size)
        file_name = f"{split}/{image_id:06d}.png"
        image.save(out / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for text in scene_captions:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
        for obj, mask in zip(objects, masks, strict=True):
            if not mask.any():  # hidden by the objects drawn over it
                continue
            details = obj.region_details(rng)
            rle = encode_mask(mask)
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))  # the visible pixels, as COCO's boxes
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id[getattr(obj, classes)],
                    "bbox": [x, y, w, h],
                    "area": float(mask.sum()),
                    "segmentation": rle,
                    "iscrowd": 0,
                    "caption": rule_caption(obj.shape, details),
                    "attributes": details,
                    "negatives": hard_negatives(obj.shape, details, ATTRIBUTE_KINDS,  # their own random stream
                                                random.Random(f"{seed}-{split}-{image_id}-{len(annotations)}")),
                }
            )
    ann_path = out / f"{split}.json"
    dataset = {
        "info": {"description": f"fineclip synthetic shapes, split {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
        "captions": captions,
    }
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{split}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dataset, f)
    os.replace(tmp, ann_path)
    return ann_path


def generate(out: str | Path, train: int, val: int, size: int = 64, seed: int = 0, classes: str = "shape") -> Path:
    """Write the train and val splits under ``out``. A ``DONE`` marker holding the parameters makes
    it idempotent; a folder made with other parameters (or an older generator) is rewritten."""
    out = Path(out)
    marker = out / "DONE"
    params = {"version": VERSION, "train": train, "val": val, "size": size, "seed": seed}
    if classes != "shape":  # so that the folders made before the option existed stay valid
        params["classes"] = classes
    if marker.exists() and json.loads(marker.read_text()) == params:
        return out
    write_split(out, "train", train, size, seed, classes)
    write_split(out, "val", val, size, seed, classes)
    marker.write_text(json.dumps(params))
    return out


def prepare_synthetic(data_cfg) -> None:
    """For a data config with a ``synthetic`` section, create the scenes under ``root`` on first use."""
    syn = data_cfg.get("synthetic")
    if not syn:
        return
    if not (Path(data_cfg.root) / "DONE").exists():  # first use
        print(f"generating synthetic scenes into {data_cfg.root}", flush=True)
    generate(data_cfg.root, train=syn.train, val=syn.val, size=syn.size, seed=syn.seed,
             classes=syn.get("classes", "shape"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=1920, help="number of training images")
    parser.add_argument("--val", type=int, default=256, help="number of validation images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", choices=sorted(CLASSES), default="shape", help="what an object's category is")
    args = parser.parse_args(argv)
    out = generate(args.out, args.train, args.val, args.size, args.seed, args.classes)
    print(f"wrote {args.train} train and {args.val} val scenes to {out}")


if __name__ == "__main__":
    main()
