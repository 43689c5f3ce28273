"""``seg_linear_ibot``: the linear segmentation protocol of iBOT (``evaluation/semantic_segmentation/configs/
linear/vit_base_512_ade20k_160k.py``), which DetailCLIP's "ADE20K (Linear)" column reports.

- Backbone frozen (eval mode). Features: the tokens of blocks 4, 6, 8, 12 as the blocks compute them (normal
  attention, no final norm, CLS dropped), each (B, width, H/p, W/p), concatenated (mmseg ``resize_concat``).
- Head (mmseg ``FCNHead`` with ``num_convs=0``): dropout 0 and one 1×1 convolution 4·width → C. With
  ``num_convs=0`` mmseg builds no norm layer, so the config's SyncBN is unused; ``batch_norm=true`` adds a
  BatchNorm before the convolution (DINOv2's linear head) as an option.
- Training: ``iters`` iterations of batch ``batch_size`` (160k × 16), cross-entropy on the logits upsampled
  bilinearly to the crop (label 255 ignored); AdamW lr 7e-4, betas (0.9, 0.999), weight decay 0.05; linear
  warmup over 1,500 iterations from ratio 1e-6, then poly decay (power 1, min lr 0).
- Train pipeline (``seg_augment.py``): resize keeping the ratio into (2048·r, 512·r), r ~ U(0.5, 2); random
  512 crop with no class over 75 % (10 tries); flip 0.5; photometric distortion; normalise; pad to 512.
- Inference: resize keeping the ratio into (2048, 512); sliding 512 windows at stride 341, the logits of
  overlapping windows averaged; upsampled bilinearly to the image's own size; mIoU over the classes at full
  resolution (ADE20K: 150, label 0 ignored).

A CPU run changes ``iters``/``batch_size``/``blocks``/``crop``: the metrics then name the protocol with the
changed values (``seg_linear_ibot[iters=4,...]``), never as the published one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fineclip.eval.seg_augment import augment, resize_keep_ratio
from fineclip.eval.segmentation import IGNORE, SegmentationSet, confusion_matrix, mean_iou

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearSegProtocol:
    blocks: tuple[int, ...] = (4, 6, 8, 12)  # 1-based block indices of the tokens concatenated
    crop: int = 512
    stride: int = 341
    iters: int = 160_000
    batch_size: int = 16
    lr: float = 7e-4
    weight_decay: float = 0.05
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0
    cat_max_ratio: float = 0.75
    batch_norm: bool = False

    @property
    def name(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                   if getattr(self, f.name) != f.default]
        return "seg_linear_ibot" + (f"[{','.join(changed)}]" if changed else "")

    @property
    def scale(self) -> tuple[int, int]:
        """mmseg's ``img_scale`` (2048, 512): the longest side at most 4 crops, the shortest one crop."""
        return 4 * self.crop, self.crop

    def learning_rate(self, it: int) -> float:
        """mmcv's poly policy with linear warmup, at iteration ``it`` (0-based)."""
        lr = self.lr * (1 - it / self.iters) ** self.power
        if it < self.warmup_iters:
            lr *= 1 - (1 - it / self.warmup_iters) * (1 - self.warmup_ratio)
        return lr


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` windows (y1, y2, x1, x2): a grid at ``stride``, the last window of each
    row/column moved back to end at the border."""
    windows = []
    for i in range(max(height - crop + stride - 1, 0) // stride + 1):
        for j in range(max(width - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            windows.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return windows


def slide_logits(logits_of, image: torch.Tensor, num_classes: int, crop: int, stride: int) -> torch.Tensor:
    """(C, H, W) logits of a (3, H, W) image: each window's logits (``logits_of`` on a (1, 3, crop, crop)
    batch, at the crop's size), windows smaller than ``crop`` padded with 0 and cut back, overlaps averaged."""
    _, height, width = image.shape
    total = torch.zeros(num_classes, height, width)
    count = torch.zeros(1, height, width)
    for y1, y2, x1, x2 in slide_windows(height, width, crop, stride):
        window = F.pad(image[:, y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1)))
        total[:, y1:y2, x1:x2] += logits_of(window[None])[0, :, : y2 - y1, : x2 - x1].float().cpu()
        count[:, y1:y2, x1:x2] += 1
    return total / count


class LinearHead(nn.Module):
    """Concatenated block tokens → (BatchNorm) → 1×1 convolution."""

    def __init__(self, channels: int, num_classes: int, batch_norm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.conv = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(features))


@torch.no_grad()
def block_tokens(model, pixels: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """The tokens of the given 1-based blocks (normal attention, no final norm, prefix tokens dropped),
    concatenated: (B, len(blocks)·width, H/p, W/p); open_clip's ``forward_intermediates``."""
    out = model.clip.visual.forward_intermediates(pixels, indices=[b - 1 for b in blocks], stop_early=True,
                                                  intermediates_only=True, output_fmt="NCHW")
    return torch.cat(out["image_intermediates"], dim=1)


def _check_blocks(model, blocks: tuple[int, ...]) -> None:
    depth = len(model.tower.blocks())
    if not blocks or max(blocks) > depth or min(blocks) < 1:
        raise ValueError(f"seg_linear_ibot reads blocks {list(blocks)}, but the model has {depth} blocks: "
                         "set eval.seg_linear.blocks to blocks it has")


def train_head(model, train: SegmentationSet, protocol: LinearSegProtocol, device, seed: int = 0) -> LinearHead:
    """The linear head trained on frozen block tokens of augmented crops of ``train``."""
    rng = np.random.default_rng(seed)
    mean, std = model.pixel_mean.cpu()[0], model.pixel_std.cpu()[0]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = LinearHead(len(protocol.blocks) * model.tower.width, len(train.class_names), protocol.batch_norm)
    head = head.to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=protocol.lr, betas=(0.9, 0.999),
                                  weight_decay=protocol.weight_decay)
    for it in range(protocol.iters):
        batch = [augment(*train.original(int(i)), protocol, rng, mean, std)
                 for i in rng.integers(len(train), size=protocol.batch_size)]
        pixels = torch.stack([b[0] for b in batch]).to(device)
        labels = torch.stack([b[1] for b in batch]).to(device)
        logits = head(block_tokens(model, pixels, protocol.blocks))
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE)
        for group in optimizer.param_groups:
            group["lr"] = protocol.learning_rate(it)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (it + 1) % 1000 == 0:
            log.info("seg_linear_ibot: iteration %d/%d, loss %.4f", it + 1, protocol.iters, loss.item())
    return head.eval()


@torch.no_grad()
def evaluate_head(model, head: LinearHead, val: SegmentationSet, protocol: LinearSegProtocol, device) -> float:
    """mIoU of sliding-window predictions at each image's own resolution."""
    num_classes = len(val.class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    mean, std = model.pixel_mean.cpu()[0], model.pixel_std.cpu()[0]

    def logits_of(window):
        logits = head(block_tokens(model, window.to(device), protocol.blocks))
        return F.interpolate(logits, size=window.shape[-2:], mode="bilinear", align_corners=False)

    for index in range(len(val)):
        image, label = val.original(index)
        resized = resize_keep_ratio(image, protocol.scale)
        pixels = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255 - mean) / std
        logits = slide_logits(logits_of, pixels, num_classes, protocol.crop, protocol.stride)
        logits = F.interpolate(logits[None], size=label.shape, mode="bilinear", align_corners=False)[0]
        confusion += confusion_matrix(logits.argmax(0), torch.from_numpy(label.astype(np.int64)), num_classes)
    return mean_iou(confusion)


def linear_segmentation_metrics(model, train: SegmentationSet, val: SegmentationSet, protocol: LinearSegProtocol,
                                device) -> dict:
    """Train the head on ``train`` and score it on ``val``, with the model rebuilt at the crop size."""
    from fineclip.models.factory import at_size

    _check_blocks(model, protocol.blocks)
    backbone = model if model.image_size[0] == protocol.crop else at_size(model, protocol.crop)
    backbone = backbone.to(device).eval()
    head = train_head(backbone, train, protocol, device)
    return {"seg/protocol": protocol.name, "seg/images": float(len(val)),
            "seg/linear_miou": evaluate_head(backbone, head, val, protocol, device)}
