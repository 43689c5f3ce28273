"""Zero-shot image classification over a class-per-folder directory (the ImageNet val layout:
``root/<class>/<image>``), with class-name prompts: top-1 / top-5 accuracy over all images.

Class names are the folder names, or the values of ``root/class_names.json`` ({folder: name})
when it exists (ImageNet's folders are WordNet ids such as ``n01440764``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from fineclip.errors import AnnotationError
from fineclip.eval.evaluators import Evaluator
from fineclip.models.prompts import DEFAULT_TEMPLATES, class_embeddings


def image_folder(root: str | Path, size: int) -> tuple[ImageFolder, list[str]]:
    """The images of ``root`` as uint8 tensors at ``size`` × ``size`` (bicubic), and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"image folder not found: {root}")
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), interpolation=v2.InterpolationMode.BICUBIC,
                                                         antialias=True)])
    dataset = ImageFolder(str(root), transform=transform, loader=lambda p: _rgb(p))
    names = list(dataset.classes)
    mapping = root / "class_names.json"
    if mapping.is_file():
        lookup = json.loads(mapping.read_text())
        missing = [c for c in names if c not in lookup]
        if missing:
            raise AnnotationError(f"{mapping} names no class for folders {missing[:5]}")
        names = [lookup[c] for c in names]
    return dataset, names


def _rgb(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


@torch.no_grad()
def zero_shot_classification(model, root: str | Path, templates: Sequence[str], batch_size: int = 64,
                             device: torch.device | str = "cpu", num_workers: int = 0) -> dict[str, float]:
    """top-1 / top-5 (%) of argmax_c cos(v, t_c) over the images of ``root``, v the global image
    embedding and t_c the template-averaged embedding of class c."""
    dataset, names = image_folder(root, model.image_size[0])
    classes = class_embeddings(model.encode_text, names, templates).to(device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    for images, labels in loader:
        emb = model.encode_image(model.normalize_pixels(images.to(device)))
        top = (emb.float() @ classes.t()).topk(min(5, len(names)), dim=-1).indices.cpu()
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=-1).sum().item()
    model.train(was_training)
    return {"zeroshot/images": float(len(dataset)), "zeroshot/classes": float(len(names)),
            "zeroshot/top1": 100 * correct1 / len(dataset), "zeroshot/top5": 100 * correct5 / len(dataset)}


class ZeroShotClassification(Evaluator):
    """Zero-shot image classification over the class-per-folder directory ``root`` (off when None)."""

    name = "zeroshot"

    def __init__(self, root: str | None = None, templates: Sequence[str] | None = None) -> None:
        super().__init__(enabled=root is not None)
        self.root = root
        self.templates = list(templates or DEFAULT_TEMPLATES)

    def __call__(self, model, cfg, device, dataset=None, crop_model=None, progress: bool = True) -> dict:
        return zero_shot_classification(model, self.root, self.templates, cfg.eval.batch_size, device)

    def format(self, metrics: dict) -> list[str]:
        if "zeroshot/top1" not in metrics:
            return []
        return [f"zero-shot classification: {metrics['zeroshot/images']:.0f} images, "
                f"{metrics['zeroshot/classes']:.0f} classes   top-1 {metrics['zeroshot/top1']:.1f}   "
                f"top-5 {metrics['zeroshot/top5']:.1f}"]
