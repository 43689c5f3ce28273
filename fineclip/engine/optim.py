"""AdamW with the usual CLIP weight-decay split, and a warmup + cosine schedule (timm)."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm gains, embeddings-like 1-d tensors and the logit scale get no weight decay."""
    return param.ndim < 2 or "logit_scale" in name or "embedding" in name or "pos_embed" in name or "token" in name


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-5,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0, warmup_lr: float = 0.0
) -> CosineLRScheduler:
    """Linear warmup for ``warmup_steps`` then cosine decay to ``min_lr`` at ``total_steps``;
    stepped per optimizer update with ``scheduler.step_update(step)``."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
