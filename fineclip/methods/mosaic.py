"""CLIM's region source: mosaics of the batch's own images, whose grid cells are the regions.

A batch of B images is cut, in batch order, into g groups of 2², g of 3² and g of 4² images (``sizes``),
g = B // Σ s², the last B mod Σ s² images staying single. Image k of a group of s² lands in row k // s,
column k mod s of its mosaic; the mosaic's cells in the same row-major order are its boxes, so region i of
the concatenated cells belongs to image i of the batch.
"""

from __future__ import annotations

import torch


def mosaic_groups(batch_size: int, sizes: tuple[int, ...] = (2, 3, 4)) -> tuple[list[int], int]:
    """(the side s of each mosaic, in batch order; the number of single images left at the end)."""
    per_round = sum(s * s for s in sizes)
    if batch_size < per_round:
        raise ValueError(f"a batch of {batch_size} images per rank cannot fill one mosaic of each size {sizes} "
                         f"({per_round} images)")
    rounds = batch_size // per_round
    return [s for s in sizes for _ in range(rounds)], batch_size % per_round


def tile(images: torch.Tensor, side: int) -> torch.Tensor:
    """(side², C, H, W) -> (C, side·H, side·W), image k at row k // side, column k mod side."""
    count, channels, height, width = images.shape
    if count != side * side:
        raise ValueError(f"{count} images do not tile a {side} x {side} mosaic")
    return images.reshape(side, side, channels, height, width).permute(2, 0, 3, 1, 4).reshape(
        channels, side * height, side * width)


def cell_boxes(side: int, height: float, width: float) -> torch.Tensor:
    """(side², 4) x1 y1 x2 y2 of the cells of a ``height`` × ``width`` mosaic, row-major."""
    ys, xs = torch.linspace(0, height, side + 1), torch.linspace(0, width, side + 1)
    return torch.stack([torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]]) for i in range(side) for j in range(side)])
