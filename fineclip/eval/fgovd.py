"""Fine-grained region–text discrimination (FG-OVD as FG-CLIP evaluates it): for each box, its positive caption and
its N negatives (attribute-swapped captions) are scored against the box's RoI feature; a box is right when the
positive scores highest. Top-1 accuracy per difficulty split (hard / medium / easy / trivial).

FG-CLIP's protocol (fgclip/eval/fgovd_eval.py): the image squashed to the model's square input, the box mapped to the
token grid, RoIAlign 1×1 of the dense features, softmax(100·cos) over the 1 + N captions, correct iff index 0 (the
positive) is the maximum; boxes with fewer than 10 negatives are kept. Sources read:

- FG-OVD's benchmark files (LVIS-format json: each annotation's ``category_id`` is its positive caption, its
  ``neg_category_ids`` the negatives; the category names are the captions): ``1_attributes.json`` = hard,
  ``2_attributes.json`` = medium, ``3_attributes.json`` = easy, ``shuffle_negatives.json`` = trivial;
- FG-CLIP's flattened jsonl (``img_path``, ``bbox`` [x, y, w, h], ``pos_expression`` [1], ``neg_expression`` [N]);
- a fineclip-schema json whose regions have ``attributes`` (the synthetic scenes): ``synthetic_fgovd`` builds the
  four splits by swapping 1, 2 or 3 of a region's attributes (hard, medium, easy) or taking other regions'
  captions (trivial) — the CPU stand-in, **not** FG-OVD.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from fineclip.data.captions import attribute_swaps as swap_attributes
from fineclip.data.captions import rule_caption
from fineclip.data.dataset import read_rgb, resize_image
from fineclip.errors import AnnotationError
from fineclip.eval.evaluators import Evaluator

SPLITS = ("hard", "medium", "easy", "trivial")
FGOVD_FILES = {"1_attributes": "hard", "2_attributes": "medium", "3_attributes": "easy",
               "shuffle_negatives": "trivial"}


@dataclass
class FGBox:
    image: Path
    box: tuple[float, float, float, float]  # x, y, w, h in the image's pixels
    positive: str
    negatives: list[str] = field(default_factory=list)


def read_fgovd_json(path: str | Path, image_root: str | Path) -> list[FGBox]:
    """FG-OVD's LVIS-format benchmark file."""
    path, root = Path(path), Path(image_root)
    data = json.loads(path.read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    files = {i["id"]: i["file_name"] for i in data["images"]}
    try:
        return [FGBox(root / files[a["image_id"]], tuple(a["bbox"]), names[a["category_id"]],
                      [names[n] for n in a.get("neg_category_ids", [])]) for a in data["annotations"]]
    except KeyError as err:
        raise AnnotationError(f"{path}: an annotation refers to an unknown image or category id {err}") from err


def read_fgclip_jsonl(path: str | Path, image_root: str | Path) -> list[FGBox]:
    """FG-CLIP's flattened FG-OVD file, one box a line."""
    path, root = Path(path), Path(image_root)
    boxes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            boxes.append(FGBox(root / item["img_path"], tuple(item["bbox"]), item["pos_expression"][0],
                               list(item["neg_expression"])))
        except (json.JSONDecodeError, KeyError, IndexError) as err:
            raise AnnotationError(f"{path}:{number}: not an FG-CLIP FG-OVD record ({err})") from err
    return boxes


def attribute_swaps(attributes: Sequence[str], changed: int) -> list[list[str]]:
    """``captions.attribute_swaps`` over the synthetic scenes' colours, textures and sizes."""
    from fineclip.data.synthetic import ATTRIBUTE_KINDS

    return swap_attributes(attributes, changed, ATTRIBUTE_KINDS)


def synthetic_fgovd(ann_file: str | Path, image_root: str | Path | None = None, negatives: int = 10,
                    seed: int = 0) -> dict[str, list[FGBox]]:
    """The four splits from a schema json whose regions carry ``attributes`` (module docstring): up to ``negatives``
    negatives a box, drawn from (seed, box) alone. A box with fewer attributes than a split swaps is not in it."""
    path = Path(ann_file)
    root = Path(image_root) if image_root is not None else path.parent
    data = json.loads(path.read_text())
    files = {i["id"]: i["file_name"] for i in data["images"]}
    shapes = {c["id"]: c["name"] for c in data["categories"]}
    captions = [a["caption"] for a in data["annotations"]]
    splits: dict[str, list[FGBox]] = {s: [] for s in SPLITS}
    for ann in data["annotations"]:
        attributes, shape = ann.get("attributes"), shapes[ann["category_id"]]
        if not attributes:
            continue
        if shape not in ann["caption"]:  # colour classes: the class is an attribute, the shape is not known here
            continue
        rng = random.Random(f"{seed}-{ann['id']}")
        image, box = root / files[ann["image_id"]], tuple(ann["bbox"])
        for changed, split in ((1, "hard"), (2, "medium"), (3, "easy")):
            if len(attributes) >= changed:
                options = [rule_caption(shape, a) for a in attribute_swaps(attributes, changed)]
                chosen = rng.sample(options, min(negatives, len(options)))
                splits[split].append(FGBox(image, box, ann["caption"], chosen))
        others = sorted({c for c in captions if c != ann["caption"]})
        splits["trivial"].append(FGBox(image, box, ann["caption"], rng.sample(others, min(negatives, len(others)))))
    return splits


@torch.no_grad()
def fgovd_top1(model, boxes: Sequence[FGBox], device, batch_size: int = 32) -> tuple[float, int]:
    """(top-1 accuracy in %, boxes): per box, is the positive the best-scoring of its 1 + N captions?"""
    model.eval()
    correct, by_image = 0, {}
    for b in boxes:
        by_image.setdefault(b.image, []).append(b)
    images = sorted(by_image)
    size = model.image_size
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels, rows = [], []
        for i, path in enumerate(chunk):
            original = read_rgb(path, -1)
            image, sx, sy = resize_image(original, size, "squash", "bicubic")
            pixels.append(image)
            for b in by_image[path]:
                x, y, w, h = b.box
                rows.append(([i, x * sx, y * sy, (x + w) * sx, (y + h) * sy], b))
        batch = torch.stack(pixels).to(device)
        _, dense = model.encode_image_dense(model.normalize_pixels(batch), with_global=False)
        regions = torch.tensor([r for r, _ in rows], dtype=torch.float32, device=device)
        features = model.pool_regions(dense, regions).float()
        texts = list(dict.fromkeys(t for _, b in rows for t in (b.positive, *b.negatives)))
        position = {t: i for i, t in enumerate(texts)}
        text_emb = model.encode_text_pool(texts).float().to(features.device)
        for feature, (_, b) in zip(features, rows, strict=True):
            scores = text_emb[[position[t] for t in (b.positive, *b.negatives)]] @ feature
            correct += int(torch.argmax(scores) == 0)  # a tie goes to the positive, as argmax takes the first
    return 100.0 * correct / max(len(boxes), 1), len(boxes)


class FGOVD(Evaluator):
    """``fgovd/<split>/top1`` for every split of ``files`` ({split: path}: FG-OVD json or FG-CLIP jsonl under
    ``image_root``), or with ``synthetic=true`` of the synthetic splits of the evaluation set's own json."""

    name = "fgovd"

    def __init__(self, enabled: bool = False, files: dict | None = None, image_root: str | None = None,
                 synthetic: bool = False, negatives: int = 10, batch_size: int = 32) -> None:
        super().__init__(enabled)
        self.files, self.image_root, self.synthetic = dict(files or {}), image_root, synthetic
        self.negatives, self.batch_size = negatives, batch_size

    def splits(self, cfg: DictConfig) -> dict[str, list[FGBox]]:
        if self.synthetic:
            val = cfg.data.val
            return synthetic_fgovd(val.ann_file, val.get("image_root"), self.negatives, cfg.seed)
        splits = {}
        for split, file in self.files.items():
            reader = read_fgclip_jsonl if str(file).endswith(".jsonl") else read_fgovd_json
            splits[split] = reader(file, self.image_root)
        return splits

    def __call__(self, model, cfg: DictConfig, device, dataset=None, crop_model=None, progress: bool = True) -> dict:
        metrics: dict = {"fgovd/protocol": "fgovd_synthetic" if self.synthetic else "fgovd_fgclip"}
        for split, boxes in self.splits(cfg).items():
            if boxes:
                top1, count = fgovd_top1(model, boxes, device, self.batch_size)
                metrics[f"fgovd/{split}/top1"], metrics[f"fgovd/{split}/boxes"] = top1, float(count)
        return metrics

    def format(self, metrics: dict) -> list[str]:
        splits = [s for s in (*SPLITS, *self.files) if f"fgovd/{s}/top1" in metrics]
        if not splits:
            return []
        parts = "   ".join(f"{s} {metrics[f'fgovd/{s}/top1']:.1f} ({int(metrics[f'fgovd/{s}/boxes'])})"
                           for s in dict.fromkeys(splits))
        return [f"fine-grained boxes [{metrics['fgovd/protocol']}]: top-1 {parts}"]
