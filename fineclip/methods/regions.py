"""Region sources: which boxes the region losses see. The data set's own boxes need nothing
here; ``GridRegions`` replaces them with CLIPSelf's random grid layouts; a proposals file
(``regions=proposals``) is read by the data set (``fineclip/data/proposals.py``)."""

from __future__ import annotations

import numpy as np
import torch


def grid_layouts(max_split: int = 6) -> list[tuple[int, int]]:
    """Every (rows r, columns c) with r = 1 … max_split and c = ⌈r/2⌉ … min(2r, max_split)."""
    return [(r, c) for r in range(1, max_split + 1) for c in range((r + 1) // 2, min(2 * r, max_split) + 1)]


class GridRegions:
    """CLIPSelf's image patches as regions: for each image a layout (r, c) drawn uniformly from
    ``grid_layouts(max_split)``, the image cut into r × c equal cells, at most ``max_cells`` of them
    kept at random. The draw depends only on (seed, epoch, image id): the same on any number of
    ranks and after a resume. Cells have no captions (region losses that need text cannot use them).
    """

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
        """The batch with its regions replaced by grid cells (rows batch_index, x1, y1, x2, y2)."""
        height, width = batch["images"].shape[-2:]
        rows, count = [], 0
        for index, image_id in enumerate(batch["image_ids"].tolist()):
            cells = self.cells(int(image_id), epoch, height, width)
            rows.append(torch.cat([torch.full((len(cells), 1), float(index)), cells], dim=1))
            count += len(cells)
        return {**batch, "regions": torch.cat(rows), "region_captions": [""] * count,
                "category_ids": torch.zeros(count, dtype=torch.long)}
