"""Box proposers: which regions of an image get a caption. Each returns, per image, a list of
``Proposal``\\ s (COCO x, y, w, h in pixels of the image, a score, a source tag).

- ``GTProposals`` — the source json's own boxes (``proposals=gt``; crowd boxes left out).
- ``FileProposals`` — a COCO-format proposals file: a detection-results list
  ``[{"image_id", "bbox", "score"}]`` or ``{"annotations": [...]}`` (``proposals=file``). YOLO-family
  detectors enter this way: write their boxes as such a list (x, y, w, h in pixels, one record per
  box, ``image_id`` the id the images have here).
- ``DetectorProposals`` — a torchvision detection model from a local checkpoint, class-agnostic.
- ``HFProposals`` — any ``transformers`` object-detection model from a local folder, class-agnostic.

The two model proposers keep boxes scoring at least ``score_threshold``, merge classes with one
class-agnostic NMS at ``nms_iou``, drop boxes under ``min_area`` px² and keep the
``max_per_image`` best.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torchvision.ops import nms
from torchvision.transforms.functional import pil_to_tensor

from fineclip.annotate.sources import ImageRecord
from fineclip.data.proposals import read_proposals
from fineclip.errors import AnnotationError


@dataclass
class Proposal:
    bbox: list[float]  # x, y, w, h
    score: float
    source: str
    category_id: int | None = None
    attributes: list[str] = field(default_factory=list)


class GTProposals:
    name = "gt"

    def __call__(self, records: list[ImageRecord], images: list[Image.Image]) -> list[list[Proposal]]:
        return [[Proposal(b.bbox, 1.0, "gt", b.category_id, b.attributes) for b in r.boxes] for r in records]


class FileProposals:
    name = "file"

    def __init__(self, path: str, min_score: float = 0.0, max_per_image: int = 100) -> None:
        self.source = f"file:{Path(path).name}"
        self.by_image: dict[int, list[Proposal]] = defaultdict(list)
        for record in read_proposals(path):
            score = float(record.get("score", 1.0))
            if score >= min_score:
                self.by_image[record["image_id"]].append(Proposal([float(v) for v in record["bbox"]], score,
                                                                  self.source, record.get("category_id")))
        for proposals in self.by_image.values():
            proposals.sort(key=lambda p: -p.score)
            del proposals[max_per_image:]

    def __call__(self, records, images) -> list[list[Proposal]]:
        return [list(self.by_image.get(r.image_id, [])) for r in records]


def class_agnostic(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float, nms_iou: float,
                   min_area: float, max_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, 4) x1 y1 x2 y2 boxes and scores of one image after the score floor, one NMS over all
    classes, the area floor and the top ``max_per_image``, best first."""
    keep = scores >= score_threshold
    boxes, scores = boxes[keep], scores[keep]
    keep = nms(boxes.float(), scores.float(), nms_iou)  # sorted by score
    boxes, scores = boxes[keep], scores[keep]
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep = area >= min_area
    return boxes[keep][:max_per_image], scores[keep][:max_per_image]


def _to_proposals(boxes: torch.Tensor, scores: torch.Tensor, source: str) -> list[Proposal]:
    return [Proposal([x1, y1, x2 - x1, y2 - y1], s, source)
            for (x1, y1, x2, y2), s in zip(boxes.tolist(), scores.tolist(), strict=True)]


class DetectorProposals:
    """``torchvision.models.detection.<architecture>`` with random weights, then the state dict of
    ``checkpoint`` (a local file; nothing is downloaded). ``num_classes`` is the checkpoint's
    (91 for the COCO-trained torchvision weights)."""

    name = "detector"

    def __init__(self, checkpoint: str, architecture: str = "fasterrcnn_resnet50_fpn_v2", num_classes: int = 91,
                 score_threshold: float = 0.3, nms_iou: float = 0.5, min_area: float = 64.0,
                 max_per_image: int = 20, device: str = "cpu", model_options: dict | None = None) -> None:
        from torchvision.models import detection

        if not hasattr(detection, architecture):
            raise ValueError(f"proposals.architecture={architecture!r} is not a torchvision detection model")
        path = Path(checkpoint)
        if not path.is_file():
            raise AnnotationError(f"proposals.checkpoint={checkpoint}: file not found")
        model = getattr(detection, architecture)(weights=None, weights_backbone=None, num_classes=num_classes,
                                                 **(model_options or {}))
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        # the class-agnostic filter below does the thresholding; let the model return everything
        model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 300
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.source = f"detector:{architecture}"
        self.options = (score_threshold, nms_iou, min_area, max_per_image)

    @torch.no_grad()
    def __call__(self, records, images) -> list[list[Proposal]]:
        batch = [pil_to_tensor(im).float().div(255).to(self.device) for im in images]
        outputs = self.model(batch)
        return [_to_proposals(*class_agnostic(o["boxes"].cpu(), o["scores"].cpu(), *self.options), self.source)
                for o in outputs]


class HFProposals:
    """A ``transformers`` object-detection model and its image processor from a local folder."""

    name = "hf"

    def __init__(self, path: str, score_threshold: float = 0.3, nms_iou: float = 0.5, min_area: float = 64.0,
                 max_per_image: int = 20, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        if not (Path(path) / "config.json").is_file():
            raise AnnotationError(f"proposals.path={path}: no Hugging Face config.json there")
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForObjectDetection.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = torch.device(device)
        self.source = f"hf:{Path(path).name}"
        self.options = (score_threshold, nms_iou, min_area, max_per_image)

    @torch.no_grad()
    def __call__(self, records, images) -> list[list[Proposal]]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = torch.tensor([(im.height, im.width) for im in images])
        results = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        return [_to_proposals(*class_agnostic(r["boxes"].cpu(), r["scores"].cpu(), *self.options), self.source)
                for r in results]
