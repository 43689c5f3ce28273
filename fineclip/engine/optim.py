"""AdamW (or SGD) with the usual CLIP weight-decay split, and a warmup + cosine schedule (timm)."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from fineclip.errors import ConfigError


def no_weight_decay(name: str, param: nn.Parameter, rule: str = "clip") -> bool:
    """Which tensors get no weight decay.

    "clip": 1-d tensors (biases, norm gains), embeddings, position embeddings, tokens and the logit scale.
    "ndim": the public DetailCLIP code's rule: tensors of fewer than 2 dims and names containing "bias",
    "ln" or "bn"; every other tensor, embeddings and the mask token included, is decayed.
    """
    if rule == "ndim":
        return param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
    if rule != "clip":
        raise ValueError(f"optim.optimizer.no_decay={rule!r}: use clip or ndim")
    return param.ndim < 2 or "logit_scale" in name or "embedding" in name or "pos_embed" in name or "token" in name


def build_optimizer(
    model: nn.Module,
    lr: float = 1e-5,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    name: str = "adamw",
    momentum: float = 0.0,
    no_decay: str = "clip",
) -> torch.optim.Optimizer:
    """AdamW (``name="adamw"``) or SGD (``name="sgd"``, with ``momentum``) over the trainable
    parameters, no weight decay where ``no_weight_decay(name, param, no_decay)`` says so."""
    decay, exempt = [], []
    for param_name, param in model.named_parameters():
        if param.requires_grad:
            (exempt if no_weight_decay(param_name, param, no_decay) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for p in decay + exempt)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name != "adamw":
        raise ValueError(f"optimizer name={name!r}: use adamw or sgd")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def warmup_length(total_steps: int, warmup_steps: int | None, warmup_fraction: float | None) -> int:
    """W: ``warmup_steps`` when given, else ``round(warmup_fraction · N)``. A warmup that does not end
    before the last step (W ≥ N) is refused: the cosine would never run."""
    if warmup_steps is None:
        fraction = 0.0 if warmup_fraction is None else float(warmup_fraction)
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"optim.scheduler.warmup_fraction={warmup_fraction}: use a fraction of the run in [0, 1)")
        return round(fraction * total_steps)
    if warmup_steps >= total_steps > 0:
        raise ConfigError(
            f"optim.scheduler.warmup_steps={warmup_steps} is not shorter than the run's {total_steps} optimizer steps: "
            "the lr would never reach its peak and the cosine would never run. Set a smaller warmup_steps, or "
            "optim.scheduler.warmup_steps=null optim.scheduler.warmup_fraction=0.05 (a fraction of the run)")
    return int(warmup_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int | None = None, min_lr: float = 0.0,
    warmup_lr: float = 0.0, warmup_fraction: float | None = None,
) -> CosineLRScheduler:
    """The lr of optimizer step k = 1 … N (N = ``total_steps``, W = ``warmup_length(...)``, peak = the
    optimizer's lr), set by ``scheduler.step_update(k)`` before the step:

        k ≤ W:  warmup_lr + (peak − warmup_lr) · k / W                      (linear warmup)
        k ≥ W:  min_lr + ½ (peak − min_lr) · (1 + cos(π · (k − W) / (N − W)))   (cosine)

    so step W runs at the peak and the last step, N, at ``min_lr``.
    """
    warmup_steps = warmup_length(total_steps, warmup_steps, warmup_fraction)
    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup_steps,
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
