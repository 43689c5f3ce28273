"""Region sources: which boxes the region losses see, behind one interface.

    source = instantiate(cfg.regions)         configs/regions/*.yaml, each with a _target_
    train_set = instantiate(cfg.data.train, **source.dataset_arguments())
    batch = source(batch, epoch)              each micro-batch, before the step

- ``BoxRegions``: the data set's own boxes and region captions (nothing to do).
- ``GridRegions``: CLIPSelf's random grid layouts replace each image's boxes (no captions).
- ``ProposalRegions``: the boxes of a COCO-format proposals file, read by the data set (no captions).

A new source is a new module with a ``RegionSource`` subclass and a ``configs/regions/<name>.yaml``.
"""

from __future__ import annotations

import numpy as np
import torch

from fineclip.errors import ConfigError


class RegionSource:
    """``name``: how the source is called in configs and result tables; ``has_captions``: whether its
    regions carry captions (a loss term that reads region captions needs them)."""

    name = "regions"
    has_captions = True

    def dataset_arguments(self) -> dict:
        """Extra constructor arguments of the training set (e.g. where to read proposals)."""
        return {}

    def __call__(self, batch: dict, epoch: int) -> dict:
        """The micro-batch with this source's regions (rows batch_index, x1, y1, x2, y2 in pixels)."""
        return batch

    def check_loss(self, required_features: frozenset[str]) -> None:
        """Refuse a loss that reads region captions when this source has none."""
        if not self.has_captions and "region_text_emb" in required_features:
            raise ConfigError(f"regions={self.name} gives regions without captions, but the loss reads region "
                              "captions: use a loss without L_RC (e.g. loss=sd, method=clipself or method=regionclip) "
                              "or regions=boxes")


class BoxRegions(RegionSource):
    """The data set's own boxes and their captions."""

    name = "boxes"


class GridRegions(RegionSource):
    """CLIPSelf's image patches as regions: for each image a layout (r, c) drawn uniformly from
    ``grid_layouts(max_split)``, the image cut into r × c equal cells, at most ``max_cells`` of them
    kept at random. The draw depends only on (seed, epoch, image id): the same on any number of
    ranks and after a resume. Cells have no captions (region losses that need text cannot use them).
    """

    name = "grid"
    has_captions = False

    def __init__(self, max_split: int = 6, max_cells: int = 20, seed: int = 0) -> None:
        self.layouts = grid_layouts(max_split)
        self.max_cells = max_cells
        self.seed = seed

    def cells(self, image_id: int, epoch: int, height: int, width: int) -> torch.Tensor:
        """(K, 4) boxes x1 y1 x2 y2 in pixels of a ``height`` × ``width`` image."""
        rng = np.random.default_rng((self.seed, epoch, image_id))
        rows, cols = self.layouts[rng.integers(len(self.layouts))]
        ys, xs = np.linspace(0, height, rows + 1), np.linspace(0, width, cols + 1)
        boxes = [(xs[j], ys[i], xs[j + 1], ys[i + 1]) for i in range(rows) for j in range(cols)]
        keep = rng.permutation(len(boxes))[: self.max_cells]
        return torch.tensor([boxes[k] for k in sorted(keep)], dtype=torch.float32)

    def __call__(self, batch: dict, epoch: int) -> dict:
        """The batch with its regions replaced by grid cells."""
        height, width = batch["images"].shape[-2:]
        rows, count = [], 0
        for index, image_id in enumerate(batch["image_ids"].tolist()):
            cells = self.cells(int(image_id), epoch, height, width)
            rows.append(torch.cat([torch.full((len(cells), 1), float(index)), cells], dim=1))
            count += len(cells)
        return {**batch, "regions": torch.cat(rows), "region_captions": [""] * count,
                "category_ids": torch.zeros(count, dtype=torch.long)}


def grid_layouts(max_split: int = 6) -> list[tuple[int, int]]:
    """Every (rows r, columns c) with r = 1 … max_split and c = ⌈r/2⌉ … min(2r, max_split)."""
    return [(r, c) for r in range(1, max_split + 1) for c in range((r + 1) // 2, min(2 * r, max_split) + 1)]


class ProposalRegions(RegionSource):
    """Region proposals of a COCO-format file (``fineclip/data/proposals.py``) as the training set's
    regions: those scoring at least ``min_score``, the best ``max_per_image`` of each image."""

    name = "proposals"
    has_captions = False

    def __init__(self, file: str | None = None, min_score: float = 0.0, max_per_image: int = 100) -> None:
        if file in (None, "", "???"):
            raise ConfigError("regions=proposals needs regions.file=<COCO-format proposals json>")
        self.file, self.min_score, self.max_per_image = file, min_score, max_per_image

    def dataset_arguments(self) -> dict:
        return {"proposals": {"file": self.file, "min_score": self.min_score, "max_per_image": self.max_per_image}}
