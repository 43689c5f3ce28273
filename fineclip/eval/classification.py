"""Zero-shot image classification over a class-per-folder directory (the ImageNet val layout:
``root/<class>/<image>``), with class-name prompts: top-1 / top-5 accuracy over all images.

Class names are the folder names, or the values of ``root/class_names.json`` ({folder: name})
when it exists (ImageNet's folders are WordNet ids such as ``n01440764``).

Protocols (``eval.zeroshot_protocol``; recorded as ``zeroshot/protocol`` next to the numbers):

- ``zeroshot_openai`` (CLIP's published ImageNet protocol): shortest side resized to the model's size
  (bicubic), centre crop; each class embedded with OpenAI's 80 ImageNet templates (open_clip's
  ``OPENAI_IMAGENET_TEMPLATES``), the normalised mean of the normalised prompt embeddings.
- ``zeroshot_openai_7``: the same images, the 7-template ensemble some papers use
  (``SIMPLE_IMAGENET_TEMPLATES``).
- ``zeroshot_proxy``: squashed to the model's size, the 8 generic templates of ``models/prompts.py``: a
  quick check, not a published protocol.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from fineclip.errors import AnnotationError, ProtocolError
from fineclip.eval.evaluators import Evaluator
from fineclip.models.prompts import DEFAULT_TEMPLATES, prompt_embeddings


@dataclass(frozen=True)
class ZeroShotProtocol:
    name: str
    resize: str  # "shortest_crop": shortest side to the size, centre crop; "squash": both sides to the size
    templates: tuple  # callables name -> prompt, or format strings with one {}


ZEROSHOT_PROTOCOLS = {
    "zeroshot_openai": ZeroShotProtocol("zeroshot_openai", "shortest_crop", tuple(OPENAI_IMAGENET_TEMPLATES)),
    "zeroshot_openai_7": ZeroShotProtocol("zeroshot_openai_7", "shortest_crop", tuple(SIMPLE_IMAGENET_TEMPLATES)),
    "zeroshot_proxy": ZeroShotProtocol("zeroshot_proxy", "squash", tuple(DEFAULT_TEMPLATES)),
}


def zeroshot_protocol(name: str) -> ZeroShotProtocol:
    if name not in ZEROSHOT_PROTOCOLS:
        raise ProtocolError(f"eval.zeroshot_protocol={name}: use one of {sorted(ZEROSHOT_PROTOCOLS)}")
    return ZEROSHOT_PROTOCOLS[name]


def class_prompts(names: Sequence[str], templates: Sequence) -> list[list[str]]:
    """Each class's prompts: every template (a format string or a callable) applied to its name."""
    return [[t(name) if callable(t) else t.format(name) for t in templates] for name in names]


def image_folder(root: str | Path, size: int, resize: str = "squash") -> tuple[ImageFolder, list[str]]:
    """The images of ``root`` as uint8 (3, size, size) tensors, read as ``resize`` says (bicubic,
    antialiased), and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"image folder not found: {root}")
    bicubic = v2.InterpolationMode.BICUBIC
    if resize == "squash":
        steps = [v2.Resize((size, size), interpolation=bicubic, antialias=True)]
    elif resize == "shortest_crop":
        steps = [v2.Resize(size, interpolation=bicubic, antialias=True), v2.CenterCrop(size)]
    else:
        raise ProtocolError(f"zero-shot resize {resize!r}: use squash or shortest_crop")
    transform = v2.Compose([v2.PILToTensor(), *steps])
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
def zero_shot_classification(model, root: str | Path, templates: Sequence, batch_size: int = 64,
                             device: torch.device | str = "cpu", num_workers: int = 0,
                             resize: str = "squash") -> dict[str, float]:
    """top-1 / top-5 (%) of argmax_c cos(v, t_c) over the images of ``root``, v the global image
    embedding and t_c the template-averaged embedding of class c."""
    dataset, names = image_folder(root, model.image_size[0], resize)
    classes = prompt_embeddings(model.encode_text, class_prompts(names, templates)).to(device)
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
            "zeroshot/templates": float(len(templates)),
            "zeroshot/top1": 100 * correct1 / len(dataset), "zeroshot/top5": 100 * correct5 / len(dataset)}


class ZeroShotClassification(Evaluator):
    """Zero-shot image classification over the class-per-folder directory ``root`` (off when None) under
    ``protocol``; ``templates`` replace the protocol's (the metrics then name it ``<protocol>+templates``)."""

    name = "zeroshot"

    def __init__(self, root: str | None = None, protocol: str = "zeroshot_openai",
                 templates: Sequence[str] | None = None) -> None:
        super().__init__(enabled=root is not None)
        self.root = root
        self.protocol = zeroshot_protocol(protocol)
        self.templates = tuple(templates) if templates else self.protocol.templates
        self.protocol_name = self.protocol.name + ("+templates" if templates else "")

    def __call__(self, model, cfg, device, dataset=None, crop_model=None, progress: bool = True) -> dict:
        metrics = zero_shot_classification(model, self.root, self.templates, cfg.eval.batch_size, device,
                                           resize=self.protocol.resize)
        return {"zeroshot/protocol": self.protocol_name, **metrics}

    def format(self, metrics: dict) -> list[str]:
        if "zeroshot/top1" not in metrics:
            return []
        return [f"zero-shot classification [{metrics.get('zeroshot/protocol', '?')}]: "
                f"{metrics['zeroshot/images']:.0f} images, "
                f"{metrics['zeroshot/classes']:.0f} classes   top-1 {metrics['zeroshot/top1']:.1f}   "
                f"top-5 {metrics['zeroshot/top5']:.1f}"]
