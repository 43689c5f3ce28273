"""Self-distillation of dense region features towards the model's own embedding of the crop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfDistillation(nn.Module):
    """L_SD = mean_j (1 − cos(p_j, v^r_j)).

    p_j: RoIAlign-pooled dense feature of region j; v^r_j: the same model's global embedding of
    the region crop (box enlarged 1.5×). As in the paper the crop side is *not* detached by default,
    so gradients reach both branches; ``detach_teacher=True`` gives the stop-gradient variant.
    ``region_valid`` (optional) excludes padded rows. Returns 0 when there is no region.
    """

    requires = frozenset({"region_emb", "crop_emb"})

    def __init__(self, detach_teacher: bool = False) -> None:
        super().__init__()
        self.detach_teacher = detach_teacher

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        student, teacher = features["region_emb"], features["crop_emb"]
        if self.detach_teacher:
            teacher = teacher.detach()
        distance = 1 - F.cosine_similarity(student, teacher, dim=-1)
        valid = features.get("region_valid")
        if valid is None:
            valid = torch.ones_like(distance, dtype=torch.bool)
        return torch.where(valid, distance, 0).sum() / valid.sum().clamp(min=1)
