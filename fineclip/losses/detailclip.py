"""DetailCLIP's self-supervised terms and projection head (the method's wiring comes separately).

Notation: K head outputs, τ_s the student temperature (0.1), τ_t the teacher's (CLS 0.04; patch
0.07, 0.04 during the first epoch), c a running centre of the teacher's outputs.

    L_CLS   = mean over view pairs u ≠ v and images b of  −Σ_k q_vbk · log p_ubk
              q_vb = softmax((t_vb − c_cls)/τ_t), p_ub = softmax(s_ub/τ_s)            (DINO)
    L_Patch = mean over images b of  [Σ_{n removed} −Σ_k q_bnk · log p_bnk] / #removed_b
              q_bn = softmax((t_bn − c_patch)/τ_t), p_bn = softmax(s_bn/τ_s)         (iBOT)
    L_Rec   = mean over removed patches of mean_j (x̂_j − x̃_j)², x̃ the patch's pixels normalised by
              their own mean and unbiased variance: (x − μ)/√(σ² + 1e-6)             (MAE)
    c ← m·c + (1 − m)·mean of the teacher outputs of the step, m = 0.9 (after the loss)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from fineclip.losses.gather import all_mean


class DetailCLIPHead(nn.Module):
    """MLP in → hidden → hidden → bottleneck (GELU), L2-normalise, then a weight-normalised linear
    bottleneck → out without bias whose direction is learnt and norm fixed at 1 (DINO's head;
    768 → 2048 → 2048 → 256 → 8192 for ViT-B). Shared by the CLS and the patch tokens."""

    def __init__(self, in_dim: int, hidden: int = 2048, bottleneck: int = 256, out_dim: int = 8192) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def teacher_patch_temperature(epoch: int, first: float = 0.04, after: float = 0.07) -> float:
    """The teacher's patch temperature: ``first`` during epoch 0, ``after`` from then on."""
    return first if epoch == 0 else after


def dino_cls_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                  student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """L_CLS for (V, B, K) student and teacher CLS outputs of V views (no gradient to the teacher)."""
    q = F.softmax((teacher.detach() - center) / teacher_temp, dim=-1)
    log_p = F.log_softmax(student / student_temp, dim=-1)
    views = student.shape[0]
    terms = [-(q[v] * log_p[u]).sum(-1).mean() for u in range(views) for v in range(views) if u != v]
    return torch.stack(terms).mean()


def ibot_patch_loss(student: torch.Tensor, teacher: torch.Tensor, removed: torch.Tensor, center: torch.Tensor,
                    student_temp: float = 0.1, teacher_temp: float = 0.07) -> torch.Tensor:
    """L_Patch for (B, N, K) outputs on N patch tokens and a (B, N) bool mask of removed tokens."""
    q = F.softmax((teacher.detach() - center) / teacher_temp, dim=-1)
    per_token = -(q * F.log_softmax(student / student_temp, dim=-1)).sum(-1)  # (B, N)
    removed = removed.float()
    return ((per_token * removed).sum(-1) / removed.sum(-1).clamp(min=1)).mean()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, patch·patch·3), patches in row-major order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def reconstruction_loss(pred: torch.Tensor, images: torch.Tensor, removed: torch.Tensor, patch: int,
                        eps: float = 1e-6) -> torch.Tensor:
    """L_Rec for (B, N, patch²·3) predictions, images (B, 3, H, W) and a (B, N) removed mask."""
    target = patchify(images, patch)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + eps).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    removed = removed.float()
    return (per_patch * removed).sum() / removed.sum().clamp(min=1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """c ← m·c + (1 − m)·(mean of ``teacher`` over every leading dimension, and over all ranks)."""
    batch_mean = all_mean(teacher.reshape(-1, teacher.shape[-1]).mean(0))
    return center * momentum + batch_mean * (1 - momentum)
