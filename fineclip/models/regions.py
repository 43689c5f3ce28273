"""Region operations on a batch: RoIAlign pooling of dense features and on-device region crops.

Regions are a flat, ragged list: ``regions`` is (M, 5) with rows (batch_index, x1, y1, x2, y2) in
pixels of the (resized) batch images, the layout ``torchvision.ops.roi_align`` takes directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def pool_regions(dense: torch.Tensor, regions: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Average the dense features inside each box, then L2-normalise.

    dense: (B, D, h, w) per-token features; regions: (M, 5) in pixels of images (H, W).
    p_j = normalize(RoIAlign(X, box_j · h/H, output 1×1, aligned=True)).
    """
    h, w = dense.shape[-2:]
    H, W = image_size
    if h * W != w * H:
        raise ValueError(f"dense grid {h}x{w} does not match image aspect {H}x{W}")
    pooled = roi_align(
        dense, regions.to(dense.dtype), output_size=(1, 1), spatial_scale=h / H,
        sampling_ratio=-1, aligned=True,
    )
    return F.normalize(pooled.flatten(1), dim=-1)


def enlarge_boxes(regions: torch.Tensor, scale: float, image_size: tuple[int, int]) -> torch.Tensor:
    """Scale each box about its centre by ``scale`` and clip it to the image."""
    H, W = image_size
    idx, x1, y1, x2, y2 = regions.unbind(-1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) * scale / 2, (y2 - y1) * scale / 2
    return torch.stack(
        [
            idx,
            (cx - half_w).clamp(0, W),
            (cy - half_h).clamp(0, H),
            (cx + half_w).clamp(0, W),
            (cy + half_h).clamp(0, H),
        ],
        dim=-1,
    )


def crop_regions(images: torch.Tensor, regions: torch.Tensor, output_size: int) -> torch.Tensor:
    """Cut every region out of its image and resize (squash) it to output_size², in one batched op.

    Bilinear sampling at the output pixel centres (RoIAlign on pixels, aligned=True); when a crop
    is shrunk, RoIAlign averages several samples per output pixel, which acts as an anti-alias.
    Returns (M, C, S, S).
    """
    return roi_align(
        images, regions.to(images.dtype), output_size=(output_size, output_size), spatial_scale=1.0,
        sampling_ratio=-1, aligned=True,
    )
