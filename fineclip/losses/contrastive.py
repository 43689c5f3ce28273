"""Contrastive objectives: global (image ↔ caption) and regional (region ↔ region caption)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def symmetric_infonce(
    a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """½ [CE(s·a·bᵀ, diag) + CE(s·b·aᵀ, diag)] over the rows marked valid.

    a, b: (N, D) L2-normalised, row i of a pairs with row i of b. ``valid`` (N,) bool marks real
    rows; padded rows are removed from every softmax (as columns) and from the mean (as rows).
    Returns 0 (still attached to the graph) when no row is valid.
    """
    logits = logit_scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    if valid is None and a.shape[0] > 0:
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    if valid is None:
        valid = torch.ones(0, dtype=torch.bool, device=a.device)
    # a finite "minus infinity": exp() of it is 0, and a row with no valid column stays finite
    padded = torch.finfo(logits.dtype).min
    per_row_ab = F.cross_entropy(logits.masked_fill(~valid[None, :], padded), target, reduction="none")
    per_row_ba = F.cross_entropy(logits.t().masked_fill(~valid[None, :], padded), target, reduction="none")
    count = valid.sum().clamp(min=1)
    ab = torch.where(valid, per_row_ab, 0).sum() / count
    ba = torch.where(valid, per_row_ba, 0).sum() / count
    return (ab + ba) / 2


class GlobalContrastive(nn.Module):
    """L_GC = ½ [CE(s·v·tᵀ, diag) + CE(s·t·vᵀ, diag)]: image embeddings v vs caption embeddings t."""

    requires = frozenset({"image_emb", "text_emb"})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return symmetric_infonce(features["image_emb"], features["text_emb"], features["logit_scale"])


class RegionalContrastive(nn.Module):
    """L_RC = ½ [CE(s·p·t^rᵀ, diag) + CE(s·t^r·pᵀ, diag)] over all real regions of the batch.

    p: pooled dense region features, t^r: region-caption embeddings. Regions form a flat ragged
    list; an optional ``region_valid`` mask keeps padding out of every softmax. Images without
    regions simply contribute no rows.
    """

    requires = frozenset({"region_emb", "region_text_emb"})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return symmetric_infonce(
            features["region_emb"], features["region_text_emb"], features["logit_scale"],
            features.get("region_valid"),
        )
