"""Semantic segmentation from dense features: zero-shot (each token against the class prompts) and
a linear probe (a 1×1 convolution trained on frozen features), both scored by mIoU.

    IoU_c = TP_c / (TP_c + FP_c + FN_c) over all pixels of the split whose label is not ignored;
    mIoU  = mean of IoU_c over the classes with TP + FP + FN > 0 (a class that neither occurs nor
            is predicted has no IoU; one that is predicted but never occurs has IoU 0).

Data: the instance masks of a fineclip-schema file (the synthetic scenes: each object's class,
background ignored) or ADE20K in its released layout (``ADEChallengeData2016/images|annotations/
{training,validation}``, 150 classes, label 0 ignored).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fineclip.data.annotations import read_annotation_json
from fineclip.errors import AnnotationError

log = logging.getLogger(__name__)
IGNORE = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class, over pixels not ignored."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def class_iou(confusion: torch.Tensor) -> torch.Tensor:
    """IoU per class (float64), NaN for a class with TP + FP + FN = 0."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    """mIoU in percent over the classes that have an IoU."""
    iou = class_iou(confusion)
    return float(100 * iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else float("nan")


@dataclass
class SegmentationSet:
    """Images and label maps, both at ``size`` × ``size`` (image bicubic, labels nearest)."""

    images: list[Path]
    labels: list  # each: a callable returning the (H, W) uint8 label map at the original size
    class_names: list[str]
    size: int

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with Image.open(self.images[index]) as img:
            image = img.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        label = Image.fromarray(self.labels[index]()).resize((self.size, self.size), Image.NEAREST)
        return (torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
                torch.from_numpy(np.asarray(label).astype(np.int64)))

    def original(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The (H, W, 3) uint8 image and its (H, W) uint8 label map at the image's own size."""
        with Image.open(self.images[index]) as img:
            image = np.asarray(img.convert("RGB"))
        label = self.labels[index]()
        if label.shape != image.shape[:2]:
            raise AnnotationError(f"{self.images[index]}: label map {label.shape} does not match the image "
                                  f"{image.shape[:2]}")
        return image, label

    @classmethod
    def from_instances(cls, ann_file: str, image_root: str | None = None, size: int = 224) -> SegmentationSet:
        """Semantic maps from the ``segmentation`` of every annotation (class index in category-id
        order; pixels of no object ignored). An annotation without a mask is an error."""
        from pycocotools.coco import COCO

        path = Path(ann_file)
        root = Path(image_root) if image_root else path.parent
        data = read_annotation_json(path)
        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        cat_ids = sorted(coco.cats)
        index_of = {c: i for i, c in enumerate(cat_ids)}
        for ann in data["annotations"]:
            if "segmentation" not in ann:
                raise AnnotationError(f"{path}: annotation id={ann['id']} has no segmentation mask")

        def label_map(image_id: int):
            def build() -> np.ndarray:
                info = coco.imgs[image_id]
                label = np.full((info["height"], info["width"]), IGNORE, dtype=np.uint8)
                for ann in coco.imgToAnns.get(image_id, []):
                    label[coco.annToMask(ann) > 0] = index_of[ann["category_id"]]
                return label
            return build

        ids = sorted(coco.imgs)
        return cls([root / coco.imgs[i]["file_name"] for i in ids], [label_map(i) for i in ids],
                   [coco.cats[c]["name"] for c in cat_ids], size)

    @classmethod
    def from_ade20k(cls, root: str, split: str = "validation", size: int = 512) -> SegmentationSet:
        """ADE20K as released: ``root/images/<split>/*.jpg``, ``root/annotations/<split>/*.png``
        (0 = other, ignored; 1-150 the classes), class names from ``root/objectInfo150.txt``."""
        base = Path(root)
        images = sorted((base / "images" / split).glob("*.jpg"))
        if not images:
            raise AnnotationError(f"no ADE20K images in {base / 'images' / split}")
        names_file = base / "objectInfo150.txt"
        if not names_file.is_file():
            raise AnnotationError(f"ADE20K class names not found: {names_file}")
        rows = [line.split("\t") for line in names_file.read_text().splitlines()[1:] if line.strip()]
        names = [row[-1].split(";")[0].strip() for row in rows]
        if len(names) != 150:
            raise AnnotationError(f"{names_file}: expected 150 classes, read {len(names)}")

        def label_map(image: Path):
            png = base / "annotations" / split / f"{image.stem}.png"

            def build() -> np.ndarray:
                if not png.is_file():
                    raise AnnotationError(f"ADE20K label map not found: {png}")
                label = np.asarray(Image.open(png)).astype(np.int64) - 1  # 0 (other) -> -1
                return np.where(label < 0, IGNORE, label).astype(np.uint8)
            return build

        return cls(images, [label_map(p) for p in images], names, size)


@torch.no_grad()
def dense_features(model, dataset: SegmentationSet, batch_size: int = 32,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D, h, w) normalised dense tokens of every image and the (N, H, W) label maps."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([im for im, _ in items]).to(device)
        _, dense = model.encode_image_dense(model.normalize_pixels(images), with_global=False)
        feats.append(dense.float().cpu())
        labels.append(torch.stack([lab for _, lab in items]))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def predict(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) token logits -> (B, H, W) classes, the logits upsampled bilinearly first."""
    if logits.shape[-2:] != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1)


def zero_shot_miou(features: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                   chunk: int = 64) -> float:
    """Each token is classified by its cosine similarity to the class embeddings (C, D)."""
    classes = F.normalize(class_emb.float(), dim=-1)
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for start in range(0, len(features), chunk):
        feats = F.normalize(features[start : start + chunk].float(), dim=1)
        logits = torch.einsum("bdhw,cd->bchw", feats, classes)
        confusion += confusion_matrix(predict(logits, labels.shape[-2:]), labels[start : start + chunk], len(classes))
    return mean_iou(confusion)


def linear_probe_miou(
    train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
    val_labels: torch.Tensor, num_classes: int, steps: int = 500, batch_size: int = 16, lr: float = 1e-2,
    seed: int = 0,
) -> float:
    """A 1×1 convolution (D → C, with bias) on frozen features, trained for ``steps`` steps of AdamW
    on random batches of the train split with cross-entropy on the upsampled logits (ignored
    pixels left out), then scored on the val split."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = torch.nn.Conv2d(train_features.shape[1], num_classes, kernel_size=1)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    size = train_labels.shape[-2:]
    for _ in range(steps):
        index = torch.randint(len(train_features), (batch_size,), generator=generator)
        logits = F.interpolate(probe(train_features[index]), size=size, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, train_labels[index], ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(val_features), 64):
            pred = predict(probe(val_features[start : start + 64]), val_labels.shape[-2:])
            confusion += confusion_matrix(pred, val_labels[start : start + 64], num_classes)
    return mean_iou(confusion)


# what ``segmentation_metrics`` measures: zero-shot labels and a 1x1-conv probe on the value-path dense tokens
# at the model's size, images and label maps squashed, no augmentation, ``probe_steps`` AdamW steps. A quick
# proxy: not the published mmseg linear head (normal tokens of several blocks, 512 crops, 160k iterations,
# sliding-window inference at full resolution)
SEG_PROXY = "seg_proxy"


def segmentation_metrics(model, seg_cfg, templates, batch_size: int = 32, device="cpu",
                         probe_steps: int = 500) -> dict[str, float]:
    """Zero-shot and linear-probe mIoU of ``model``'s dense features on the data config's
    ``segmentation`` section (``train`` and ``val`` sets, instantiated at the model's image size)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fineclip.models.prompts import class_embeddings

    def build(node) -> SegmentationSet:  # resolved in place: its paths point into the data config
        return instantiate(OmegaConf.to_container(node, resolve=True), size=model.image_size[0])

    val = build(seg_cfg.val)
    val_feats, val_labels = dense_features(model, val, batch_size, device)
    with torch.no_grad():
        class_emb = class_embeddings(model.encode_text, val.class_names, templates).cpu()
    metrics = {"seg/protocol": SEG_PROXY, "seg/images": float(len(val)),
               "seg/zero_shot_miou": zero_shot_miou(val_feats, val_labels, class_emb)}
    if seg_cfg.get("train") is not None and probe_steps > 0:
        train = build(seg_cfg.train)
        train_feats, train_labels = dense_features(model, train, batch_size, device)
        metrics["seg/linear_probe_miou"] = linear_probe_miou(
            train_feats, train_labels, val_feats, val_labels, len(val.class_names), steps=probe_steps)
    return metrics
