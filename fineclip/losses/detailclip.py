"""DetailCLIP's loss: L_CLIP + L_CLS + L_Patch + L_Rec (all weight 1), the terms as functions and as
loss-term modules over the features that the student (FineCLIPModel) and ``DetailCLIPTeacher`` give.

Notation: K head outputs, τ_s the student temperature (0.1), τ_t the teacher's (CLS 0.04; patch
0.07, 0.04 during the first epoch), c a running centre of the teacher's outputs.

    L_CLIP  = mean over the V views of L_GC(view embedding, caption embedding)          (CLIP)
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

from fineclip.losses.composite import CompositeLoss
from fineclip.losses.contrastive import GlobalContrastive
from fineclip.losses.gather import all_mean


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


# -- the loss terms over features ----------------------------------------------------------------
# the student's (FineCLIPModel.forward): view_emb (V, B, D), student_cls (V, B, K), student_patch
# (V·B, R, K) at the removed tokens, rec_pred (V·B, N, patch²·3); the teacher's (DetailCLIPTeacher):
# views (V·B, 3, S, S) normalised pixels, keep (V·B, N), teacher_cls (V, B, K), teacher_patch
# (V·B, R, K), centers (2, K) = (c_cls, c_patch) before this step's update, teacher_temperature
# (2,) = (τ_t CLS, τ_t patch) of this epoch.
class ViewContrastive(nn.Module):
    """L_CLIP: the mean over views of the global image–text InfoNCE of each view's embedding."""

    requires = frozenset({"view_emb", "text_emb", "logit_scale"})

    def __init__(self) -> None:
        super().__init__()
        self.contrastive = GlobalContrastive()

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        views = features["view_emb"]
        return torch.stack([self.contrastive({"image_emb": v, "text_emb": features["text_emb"],
                                              "logit_scale": features["logit_scale"]}) for v in views]).mean()


class CLSDistillation(nn.Module):
    """L_CLS (``dino_cls_loss``) across the views."""

    requires = frozenset({"student_cls", "teacher_cls", "centers", "teacher_temperature"})

    def __init__(self, student_temperature: float = 0.1) -> None:
        super().__init__()
        self.student_temperature = student_temperature

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return dino_cls_loss(features["student_cls"], features["teacher_cls"], features["centers"][0],
                             self.student_temperature, features["teacher_temperature"][0])


class PatchDistillation(nn.Module):
    """L_Patch (``ibot_patch_loss``) on the removed tokens (the same number in every image)."""

    requires = frozenset({"student_patch", "teacher_patch", "centers", "teacher_temperature"})

    def __init__(self, student_temperature: float = 0.1) -> None:
        super().__init__()
        self.student_temperature = student_temperature

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        student = features["student_patch"]
        removed = torch.ones(student.shape[:2], dtype=torch.bool, device=student.device)
        return ibot_patch_loss(student, features["teacher_patch"], removed, features["centers"][1],
                               self.student_temperature, features["teacher_temperature"][1])


class MaskedReconstruction(nn.Module):
    """L_Rec (``reconstruction_loss``) on the removed patches of each view."""

    requires = frozenset({"rec_pred", "views", "keep"})

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = features["rec_pred"]
        patch = round((pred.shape[-1] / 3) ** 0.5)
        dtype = torch.promote_types(pred.dtype, torch.float32)  # at least fp32 under autocast
        return reconstruction_loss(pred.to(dtype), features["views"].to(dtype), ~features["keep"], patch)


class DetailCLIPLoss(CompositeLoss):
    """L = w_clip·L_CLIP + w_cls·L_CLS + w_patch·L_Patch + w_rec·L_Rec (DetailCLIP: all 1, τ_s = 0.1)."""

    def __init__(self, clip_weight: float = 1.0, cls_weight: float = 1.0, patch_weight: float = 1.0,
                 rec_weight: float = 1.0, student_temperature: float = 0.1) -> None:
        super().__init__(
            terms={"clip": ViewContrastive(), "cls": CLSDistillation(student_temperature),
                   "patch": PatchDistillation(student_temperature),
                   "rec": MaskedReconstruction()},
            weights={"clip": clip_weight, "cls": cls_weight, "patch": patch_weight, "rec": rec_weight},
        )
