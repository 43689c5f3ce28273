"""RoIAlign over pyramid levels of explicit strides (mmdet's ``SingleRoIExtractor``), which torchvision's
``MultiScaleRoIAlign`` cannot express: it rounds the scales to powers of two (wrong for patch 14: strides
3.5, 7, 14, 28) and pools with ``aligned=False``.

    level(box) = clamp(⌊log2(√(w·h) / finest_scale + 1e-6)⌋, 0, L − 1),   finest_scale = 56
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.ops import roi_align


def as_rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """(K, 5) rows (image index, x1, y1, x2, y2) of one (n_i, 4) box tensor per image, as ``roi_align`` takes."""
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])


def roi_levels(boxes: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """The pyramid level of each (x1, y1, x2, y2) box."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


class StridedRoIAlign(nn.Module):
    def __init__(self, featmap_names: Sequence[str], strides: Sequence[float], output_size: int = 7,
                 sampling_ratio: int = 0, finest_scale: float = 56.0) -> None:
        super().__init__()
        if len(featmap_names) != len(strides):
            raise ValueError("one stride per pooled feature map")
        self.featmap_names, self.strides = list(featmap_names), [float(s) for s in strides]
        self.output_size, self.sampling_ratio, self.finest_scale = output_size, sampling_ratio, finest_scale

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """(K, C, output, output) for the K boxes of ``proposals`` (one tensor per image), in their order."""
        rois = as_rois(proposals)
        levels = roi_levels(rois[:, 1:], len(self.strides), self.finest_scale)
        first = features[self.featmap_names[0]]
        out = first.new_zeros(len(rois), first.shape[1], self.output_size, self.output_size)
        for level, (name, stride) in enumerate(zip(self.featmap_names, self.strides, strict=True)):
            index = torch.nonzero(levels == level).squeeze(1)
            if len(index):
                out[index] = roi_align(features[name], rois[index], self.output_size, spatial_scale=1 / stride,
                                       sampling_ratio=self.sampling_ratio, aligned=True).to(out.dtype)
        return out

