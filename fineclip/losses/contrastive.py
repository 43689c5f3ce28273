"""Contrastive objectives: global (image ↔ caption) and regional (region ↔ region caption).

Both work on one process or many: every rank scores its own rows against the rows of all ranks
(gathered with gradient), and the per-rank values are scaled so that their mean over ranks — what
DDP's gradient averaging optimises — equals the loss of one process holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fineclip.losses.gather import gather_ragged_rows, gather_rows, rank, world_size


def infonce_row_sum(
    a: torch.Tensor,
    b: torch.Tensor,
    all_a: torch.Tensor,
    all_b: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
    column_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_i ½ [CE(s·a_i·all_bᵀ, offset+i) + CE(s·b_i·all_aᵀ, offset+i)] over the local rows i.

    a, b (n, D): this rank's pairs (row i of a with row i of b); all_a, all_b (N, D): every rank's
    rows, this rank's at ``offset``. Columns where ``column_valid`` is False (padding) take no part
    in any softmax.
    """
    target = torch.arange(a.shape[0], device=a.device) + offset
    logits_ab = logit_scale * a @ all_b.t()
    logits_ba = logit_scale * b @ all_a.t()
    if column_valid is not None:
        # a finite "minus infinity": exp() of it is 0 and no row becomes NaN
        padded = torch.finfo(logits_ab.dtype).min
        logits_ab = logits_ab.masked_fill(~column_valid[None, :], padded)
        logits_ba = logits_ba.masked_fill(~column_valid[None, :], padded)
    ce_ab = F.cross_entropy(logits_ab, target, reduction="sum")
    ce_ba = F.cross_entropy(logits_ba, target, reduction="sum")
    return (ce_ab + ce_ba) / 2


class GlobalContrastive(nn.Module):
    """L_GC = ½ [CE(s·v·tᵀ, diag) + CE(s·t·vᵀ, diag)], averaged over the images of the global batch.

    v: image embeddings, t: caption embeddings (L2-normalised), s: the shared logit scale.
    """

    requires = frozenset({"image_emb", "text_emb", "logit_scale"})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return paired_infonce(features["image_emb"], features["text_emb"], features["logit_scale"])


def paired_infonce(v: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """½ [CE(s·v·tᵀ, diag) + CE(s·t·vᵀ, diag)] over the pairs of all ranks, averaged over the global batch; every
    rank holds the same number of pairs."""
    offset = rank() * v.shape[0]
    return infonce_row_sum(v, t, gather_rows(v), gather_rows(t), logit_scale, offset) / v.shape[0]


class RegionalContrastive(nn.Module):
    """L_RC = ½ [CE(s·p·t^rᵀ, diag) + CE(s·t^r·pᵀ, diag)], averaged over all regions of the global batch.

    p: RoIAlign-pooled dense region features, t^r: region-caption embeddings. Regions are a ragged
    flat list (their number differs per image and per rank); images without regions contribute no
    row; the padding added to gather them across ranks never enters a softmax. 0 without regions.

    ``region_key="crop_emb"`` puts the global embedding of each region's crop in place of p: the
    crop ↔ region-caption loss of plain CLIP training on region crops (used for pretraining).
    """

    def __init__(self, region_key: str = "region_emb") -> None:
        super().__init__()
        self.region_key = region_key
        self.requires = frozenset({region_key, "region_text_emb", "logit_scale"})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        p, tr = features[self.region_key], features["region_text_emb"]
        all_p, valid, offset = gather_ragged_rows(p)
        all_tr, _, _ = gather_ragged_rows(tr)
        total = infonce_row_sum(p, tr, all_p, all_tr, features["logit_scale"], offset, valid)
        count = valid.sum()
        return total * world_size() / count.clamp(min=1)


class MosaicContrastive(nn.Module):
    """CLIM's loss: L = ½ [CE(s·u·wᵀ, diag) + CE(s·w·uᵀ, diag)], averaged over the source images of the global
    batch, where u = [RoI(dense(mosaic), cell) for every cell ; v(single) for every single image] and
    w = [t(the cell's source caption) ; t(the single's caption)] (L2-normalised), in the batch's image order.

    The image rows are the mosaics, then the singles (``MosaicRegions``); how many mosaics follows from the
    cell count and ``sizes`` (one round of mosaics holds Σ s² cells).
    """

    requires = frozenset({"region_emb", "region_text_emb", "image_emb", "text_emb", "logit_scale"})

    def __init__(self, sizes: tuple[int, ...] = (2, 3, 4)) -> None:
        super().__init__()
        self.sizes = tuple(int(s) for s in sizes)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        cells = features["region_emb"].shape[0]
        mosaics = cells // sum(s * s for s in self.sizes) * len(self.sizes)
        u = torch.cat([features["region_emb"], features["image_emb"][mosaics:]])
        w = torch.cat([features["region_text_emb"], features["text_emb"][mosaics:]])
        return paired_infonce(u, w, features["logit_scale"])  # every rank holds the same number of source images
