"""The F-ViT detector from torchvision's Faster R-CNN parts (settings of CLIPSelf's OV-COCO configs):

- backbone ``FrozenViTPyramid`` (P2–P6, 256 channels);
- RPN: 2 convs, anchors 8·stride (32…512 at patch 16, 28…448 at patch 14) × ratios 0.5/1/2 at the
  pyramid's exact strides, IoU 0.7/0.3, 256 samples ½ positive, 2000 proposals per level before and 1000
  after NMS 0.7 (``rpn_pre_nms``, ``rpn_post_nms``);
- RoI head: ``StridedRoIAlign`` 7×7 on P2–P5, 4 convs (BN) + 2 fc to the CLIP width, ``OVBoxPredictor``
  and ``OVRoIHeads`` (512 samples ``roi_samples``, ¼ positive, IoU 0.5; test: score 0.01, NMS 0.4, 100 per
  image); the synthetic CPU config narrows channels, samples and proposals;
- OV-LVIS (``masks``): a class-agnostic mask head, RoIAlign 14×14, 4 convs (no norm), deconvolution to 28×28;
- transform: normalise and batch only; the data set resizes (LSJ crops are not rescaled again).

The RPN's and the RoI head's positive/negative samples of an image are drawn from a generator seeded by the
image's ``seed`` target (the data set's (seed, epoch, index)), so that they do not depend on the rank or the
batch the image is in: N ranks train as one process, and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from fineclip.detect.heads import OVBoxPredictor, OVRoIHeads
from fineclip.detect.poolers import StridedRoIAlign
from fineclip.detect.pyramid import FrozenViTPyramid
from fineclip.models import FineCLIPModel

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # mmdet's 123.675 … / 58.395 … ÷ 255


class StridedAnchorGenerator(AnchorGenerator):
    """Anchors at the pyramid's exact strides (torchvision's own divides sizes with integers: 3 for 3.5)."""

    def __init__(self, sizes, aspect_ratios, strides) -> None:
        super().__init__(sizes, aspect_ratios)
        self.strides = [float(s) for s in strides]

    def forward(self, image_list, feature_maps):
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's sampler, each image's draw from its own seed when ``seeds`` is set."""

    seeds: list[int] | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]):
        if self.seeds is None:
            return super().__call__(matched_idxs)
        positive, negative = [], []
        for matched, seed in zip(matched_idxs, self.seeds, strict=True):
            with torch.random.fork_rng(devices=[matched.device] if matched.is_cuda else []):
                torch.manual_seed(seed)
                pos, neg = super().__call__([matched])
            positive += pos
            negative += neg
        return positive, negative


class NoResizeTransform(GeneralizedRCNNTransform):
    def resize(self, image, target=None):
        return image, target


class OVFasterRCNN(nn.Module):
    def __init__(self, backbone: FrozenViTPyramid, rpn: RegionProposalNetwork, roi_heads: OVRoIHeads,
                 transform: GeneralizedRCNNTransform) -> None:
        super().__init__()
        self.backbone, self.rpn, self.roi_heads, self.transform = backbone, rpn, roi_heads, transform

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Training: the loss dict; evaluation: one dict of boxes, scores and labels per image."""
        seeds = [int(t["seed"]) for t in targets] if targets and "seed" in targets[0] else None
        self.rpn.fg_bg_sampler.seeds = seeds
        self.roi_heads.fg_bg_sampler.seeds = None if seeds is None else [s + 1 for s in seeds]
        batch, targets = self.transform(images, targets)
        features, dense = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets,
                                                dense=None if self.training else dense)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return detections

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen CLIP tower (rebuilt from its own checkpoint)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.vit.")}


def build_detector(clip_model: FineCLIPModel, class_embeddings: torch.Tensor, class_weight: torch.Tensor,
                   novel: torch.Tensor, cfg: DictConfig) -> OVFasterRCNN:
    """``class_embeddings``, ``class_weight``, ``novel``: (C + 1) rows/entries, background first."""
    backbone = FrozenViTPyramid(clip_model, cfg.taps, cfg.fpn_channels)
    channels = cfg.fpn_channels
    strides = backbone.strides
    anchors = StridedAnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides), strides)
    rpn = RegionProposalNetwork(
        anchors, RPNHead(backbone.out_channels, 3, conv_depth=2), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
        batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n={"training": cfg.rpn_pre_nms, "testing": cfg.rpn_pre_nms},
        post_nms_top_n={"training": cfg.rpn_post_nms, "testing": cfg.rpn_post_nms}, nms_thresh=0.7)
    dim = class_embeddings.shape[1]
    head = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [dim, dim], norm_layer=nn.BatchNorm2d)
    roi_heads = OVRoIHeads(
        StridedRoIAlign(["0", "1", "2", "3"], strides[:4], 7, 0), head,
        OVBoxPredictor(dim, class_embeddings, cfg.det_temperature),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=cfg.roi_samples, positive_fraction=0.25,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img, class_weight=class_weight, novel=novel, alpha=cfg.alpha,
        beta=cfg.beta, clip_temperature=cfg.clip_temperature, clip_stride=backbone.patch)
    size = int(clip_model.image_size[0])
    if cfg.get("masks"):
        roi_heads.mask_roi_pool = StridedRoIAlign(["0", "1", "2", "3"], strides[:4], 14, 0)
        roi_heads.mask_head = MaskRCNNHeads(channels, [channels] * 4, 1)
        roi_heads.mask_predictor = MaskRCNNPredictor(channels, channels, 1)
    rpn.fg_bg_sampler = SeededSampler(256, 0.5)
    roi_heads.fg_bg_sampler = SeededSampler(cfg.roi_samples, 0.25)
    mean, std = clip_model.pixel_mean.flatten().tolist(), clip_model.pixel_std.flatten().tolist()
    if cfg.get("pixel_norm", "clip") == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    transform = NoResizeTransform(size, size, mean, std, size_divisible=1)
    return OVFasterRCNN(backbone, rpn, roi_heads, transform)
