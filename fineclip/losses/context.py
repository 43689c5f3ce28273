"""DeCLIP's context distillation: the student's patch-to-patch affinities follow a frozen vision foundation
model's (DINOv2 by default).

    S_T = t̂ᵀ t̂           t̂: the VFM's patch features (B, C_t, H, W), each L2-normalised, flattened to HW columns
    S_S = mean_p ĉ_pᵀ ĉ_p  ĉ_p: the student's context features (its last block's Q — or K, V — projections of
                          the patch tokens, heads concatenated; P = 2 in csa mode, Q and K, averaged as DeCLIP's
                          csa branch does), resized bilinearly to H × W when the grids differ, each L2-normalised
    L_context = mean over the B·HW rows i of ‖S_T[i] − S_S[i]‖₂

DDP: the rows of all ranks are averaged together (the sum over this rank's rows, times the world size, over
the global row count), so N ranks give the loss of one process holding their images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fineclip.losses.gather import global_count, world_size


def affinities(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, HW, HW) cosine similarities between every two positions."""
    flat = F.normalize(features.flatten(2), dim=1)
    return flat.transpose(1, 2) @ flat


def context_row_distances(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B·HW,) ‖S_T[i] − S_S[i]‖₂ for every row. ``student``: (B, N, C) or (P, B, N, C) patch tokens of a
    square grid; ``teacher``: (B, C_t, H, W) the VFM's patch features."""
    student = student[None] if student.dim() == 3 else student
    side = int(round(student.shape[2] ** 0.5))
    if side * side != student.shape[2]:
        raise ValueError(f"context features of {student.shape[2]} tokens are not a square grid")
    grid = student.transpose(2, 3).flatten(0, 1).reshape(-1, student.shape[3], side, side)
    if grid.shape[-2:] != teacher.shape[-2:]:
        grid = F.interpolate(grid, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    s_student = affinities(grid).unflatten(0, student.shape[:2]).mean(dim=0)
    return (affinities(teacher.to(grid.dtype)) - s_student).norm(dim=-1).flatten()


class ContextDistillation(nn.Module):
    """L_context (module docstring) over ``context`` (the student's) and ``vfm_context`` (the teacher's)."""

    requires = frozenset({"context", "vfm_context"})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = context_row_distances(features["context"], features["vfm_context"].detach())
        return rows.sum() * world_size() / global_count(rows.shape[0], rows.device).clamp(min=1)
