"""Self-distillation of dense region features towards the model's own embedding of the crop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fineclip.losses.gather import global_count, world_size


class SelfDistillation(nn.Module):
    """L_SD = mean_j (1 − cos(p_j, v^r_j)) over all regions j of the global batch.

    p_j: RoIAlign-pooled dense feature of region j; v^r_j: the same model's global embedding of
    the region crop (box enlarged 1.5×). As in the paper the crop side is *not* detached by default,
    so gradients reach both branches; ``detach_teacher=True`` gives the stop-gradient variant.
    0 when there is no region.
    """

    def __init__(self, detach_teacher: bool = False) -> None:
        super().__init__()
        self.detach_teacher = detach_teacher
        # a detached teacher needs no autograd graph for the crop pass at all
        self.crop_key = "crop_emb_nograd" if detach_teacher else "crop_emb"
        self.requires = frozenset({"region_emb", self.crop_key})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        student, teacher = features["region_emb"], features[self.crop_key]
        if self.detach_teacher:
            teacher = teacher.detach()
        total = (1 - F.cosine_similarity(student, teacher, dim=-1)).sum()
        return total * world_size() / global_count(student.shape[0], student.device).clamp(min=1)
