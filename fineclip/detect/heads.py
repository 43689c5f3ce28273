"""F-ViT's open-vocabulary box head on torchvision's ``RoIHeads``.

Classifier: the RoI feature through one fc (+ ReLU, kept as the reference keeps it) to the CLIP embedding
width, L2-normalised, against the normalised text embeddings of [background, class 1 … C] at a learned
temperature T_det (init 50). Regression: one fc + ReLU, then 4 class-agnostic deltas (coder weights
10, 10, 5, 5 ≡ mmdet's stds 0.1, 0.1, 0.2, 0.2), L1 loss.

Training loss (weights w_c: base 1, novel 0, background 0.6 on OV-COCO / 0.9 on OV-LVIS):

    logits_c = −inf where w_c < 1e-5 (a novel class is never predicted in training)
    L_cls = (1/N) Σ_i w_{y_i} · CE(logits_i, y_i),     L_box = (1/N) Σ_{i positive} |Δ_i − Δ*_i|₁

Test score fusion with the frozen CLIP map (RoIAlign 1×1 on the dense map, normalised):

    p_det = softmax(logits),  p_clip = softmax(T_vlm · ⟨r, t_c⟩)  over the same C + 1 columns
    s_c = p_det^(1−α) · p_clip^α  for base classes and background,   p_det^(1−β) · p_clip^β  for novel ones

then per-class NMS above a score threshold, the best ``detections_per_img`` kept. OV-LVIS adds a class-agnostic
mask head (RoIAlign 14×14, 4 convs, a 2× deconvolution to one 28×28 mask per box).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.ops import batched_nms, roi_align
from torchvision.ops import boxes as box_ops

from fineclip.detect.poolers import as_rois


class OVBoxPredictor(nn.Module):
    def __init__(self, in_features: int, class_embeddings: torch.Tensor, temperature: float = 50.0) -> None:
        super().__init__()
        dim = class_embeddings.shape[1]
        self.cls_fc = nn.Linear(in_features, dim)
        self.reg_fc = nn.Linear(in_features, in_features)
        self.bbox_pred = nn.Linear(in_features, 4)
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))  # (C + 1, D)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        embedding = F.normalize(F.relu(self.cls_fc(x)), dim=-1)
        return self.temperature * embedding @ self.class_embeddings.t(), self.bbox_pred(F.relu(self.reg_fc(x)))


def ov_fastrcnn_loss(class_logits: torch.Tensor, box_regression: torch.Tensor, labels: torch.Tensor,
                     regression_targets: torch.Tensor, class_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted, masked classification loss and the class-agnostic L1 box loss (module docstring)."""
    logits = class_logits.masked_fill(class_weight < 1e-5, float("-inf"))
    per_box = F.cross_entropy(logits, labels, reduction="none") * class_weight[labels]
    loss_cls = per_box.sum() / max(len(labels), 1)
    positive = labels > 0
    loss_box = (box_regression[positive] - regression_targets[positive]).abs().sum() / max(len(labels), 1)
    return loss_cls, loss_box


def fuse_scores(class_logits: torch.Tensor, clip_logits: torch.Tensor, novel: torch.Tensor, alpha: float,
                beta: float) -> torch.Tensor:
    """Geometric interpolation of the detector's and the frozen CLIP's class probabilities (C + 1 columns)."""
    p_det, p_clip = class_logits.softmax(-1), clip_logits.softmax(-1)
    exponent = torch.where(novel, torch.tensor(beta, device=novel.device), torch.tensor(alpha, device=novel.device))
    return p_det ** (1 - exponent) * p_clip ** exponent


class OVRoIHeads(RoIHeads):
    """torchvision's RoI heads with F-ViT's loss and fused, class-agnostic-box inference."""

    def __init__(self, *args, class_weight: torch.Tensor, novel: torch.Tensor, alpha: float, beta: float,
                 clip_temperature: float, clip_stride: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("class_weight", class_weight.float())  # (C + 1,), background first
        self.register_buffer("novel", novel.bool())  # (C + 1,)
        self.alpha, self.beta, self.clip_temperature, self.clip_stride = alpha, beta, clip_temperature, clip_stride

    def forward(self, features, proposals, image_shapes, targets=None, dense=None):
        if self.training:
            proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals,
                                                                                          image_shapes)))
        if self.training:
            loss_cls, loss_box = ov_fastrcnn_loss(class_logits, box_regression, torch.cat(labels),
                                                  torch.cat(regression_targets), self.class_weight)
            losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
            if self.has_mask():
                losses["loss_mask"] = self.mask_loss(features, proposals, image_shapes, targets, matched, labels)
            return [], losses
        results = self.detections(class_logits, box_regression, proposals, image_shapes, dense)
        if self.has_mask():
            boxes = [r["boxes"] for r in results]
            logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
            for r, probs in zip(results, logits.sigmoid().split([len(b) for b in boxes]), strict=True):
                r["masks"] = probs  # (N, 1, 28, 28), one class-agnostic mask per box
        return results, {}

    def mask_loss(self, features, proposals, image_shapes, targets, matched, labels) -> torch.Tensor:
        """Class-agnostic: the one mask channel of each positive RoI against its ground truth's mask (binary
        cross-entropy on the 28×28 grid, torchvision's ``maskrcnn_loss`` with every label mapped to channel 0)."""
        positive = [torch.where(lab > 0)[0] for lab in labels]
        boxes = [p[i] for p, i in zip(proposals, positive, strict=True)]
        logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        channel = [torch.zeros_like(t["labels"]) for t in targets]
        return maskrcnn_loss(logits, boxes, [t["masks"] for t in targets], channel,
                             [m[i] for m, i in zip(matched, positive, strict=True)])

    def clip_logits(self, dense: torch.Tensor, proposals: list[torch.Tensor]) -> torch.Tensor:
        pooled = roi_align(dense, as_rois(proposals).to(dense.dtype), (1, 1), spatial_scale=1 / self.clip_stride,
                           sampling_ratio=0, aligned=True).flatten(1)
        embeddings = self.box_predictor.class_embeddings
        return self.clip_temperature * F.normalize(pooled.float(), dim=-1) @ embeddings.t()

    def detections(self, class_logits, box_regression, proposals, image_shapes, dense) -> list[dict]:
        counts = [len(p) for p in proposals]
        boxes = self.box_coder.decode_single(box_regression.float(), torch.cat(proposals).float())
        if dense is not None and (self.alpha > 0 or self.beta > 0):
            scores = fuse_scores(class_logits.float(), self.clip_logits(dense, proposals), self.novel, self.alpha,
                                 self.beta)
        else:
            scores = class_logits.float().softmax(-1)
        results = []
        for box, score, shape in zip(boxes.split(counts), scores.split(counts), image_shapes, strict=True):
            box = box_ops.clip_boxes_to_image(box, shape)
            num_classes = score.shape[1] - 1
            labels = torch.arange(1, num_classes + 1, device=box.device).repeat(len(box))
            box, score = box.repeat_interleave(num_classes, 0), score[:, 1:].reshape(-1)  # one box per class
            keep = score > self.score_thresh
            box, score, labels = box[keep], score[keep], labels[keep]
            keep = box_ops.remove_small_boxes(box, 1e-2)
            box, score, labels = box[keep], score[keep], labels[keep]
            keep = batched_nms(box, score, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": box[keep], "scores": score[keep], "labels": labels[keep]})
        return results
