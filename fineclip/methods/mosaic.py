"""CLIM's region source: mosaics of the batch's own images, whose grid cells are the regions.

A batch of B images is cut, in batch order, into g groups of 2², g of 3² and g of 4² images (``sizes``),
g = B // Σ s², the last B mod Σ s² images staying single. Image k of a group of s² lands in row k // s,
column k mod s of its mosaic; the mosaic's cells in the same row-major order are its boxes, so region i of
the concatenated cells belongs to image i of the batch.

Differences from CLIM's code: a mosaic is resized to the model's own input size (CLIM: to 1024 px while its
single images stay at the loader's size, two resolutions in one step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fineclip.methods.regions import RegionSource


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


class MosaicRegions(RegionSource):
    """The batch as CLIM trains on it: its mosaics (each resized bicubically to the batch's image size), then
    its single images; the regions are the mosaics' cells, each captioned with its source image's caption.
    A mosaic's own caption (unused by ``method=clim``'s loss) is its first image's. Deterministic in the batch:
    the same on any number of ranks (groups are formed per rank) and after a resume."""

    name = "mosaic"

    def __init__(self, sizes: tuple[int, ...] = (2, 3, 4)) -> None:
        self.sizes = tuple(int(s) for s in sizes)

    def __call__(self, batch: dict, epoch: int) -> dict:
        images, captions, ids = batch["images"], list(batch["captions"]), batch["image_ids"]
        height, width = images.shape[-2:]
        sides, _ = mosaic_groups(len(images), self.sizes)
        mosaics, regions, first, heads = [], [], 0, []
        for index, side in enumerate(sides):
            mosaic = F.interpolate(tile(images[first:first + side * side].float(), side)[None], size=(height, width),
                                   mode="bicubic", align_corners=False)[0]
            mosaics.append(mosaic.round().clamp(0, 255).to(torch.uint8) if images.dtype == torch.uint8
                           else mosaic.clamp(0, 1).to(images.dtype))
            cells = cell_boxes(side, height, width)
            regions.append(torch.cat([torch.full((len(cells), 1), float(index)), cells], dim=1))
            heads.append(first)
            first += side * side
        return {
            "image_ids": torch.cat([ids[heads], ids[first:]]),
            "images": torch.cat([torch.stack(mosaics), images[first:]]),
            "captions": [captions[h] for h in heads] + captions[first:],
            "regions": torch.cat(regions).to(images.device),
            "region_captions": captions[:first],
            "category_ids": torch.zeros(first, dtype=torch.long),
        }
