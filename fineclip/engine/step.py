"""One optimizer step, the same for the trainer, the benchmark and the reference-step test.

    features = model(batch, need=what the enabled loss terms use)    trunk, crops, text
    loss     = Σ_k w_k · L_k(features)                                 losses
    (loss / K).backward() for each of the K micro-batches           backward
    clip, optimizer.step(), clamp the logit scale                    optimizer
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from fineclip.engine.distributed import all_reduce_sum
from fineclip.losses import CompositeLoss
from fineclip.methods.teachers import Teacher
from fineclip.models import FineCLIPModel
from fineclip.timing import section


def resolve_precision(device: torch.device, precision: str) -> str:
    """"auto" is bf16 autocast on CUDA and fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"trainer.precision={precision!r}: use auto, fp32, bf16 or fp16")
    return precision


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def forward_loss(
    model: nn.Module, loss_fn: CompositeLoss, batch: dict, teacher: Teacher | None = None
) -> tuple[torch.Tensor, dict]:
    """The features the enabled loss terms need (through the DDP wrapper when ``model`` is one, so
    that gradients are averaged; those a teacher provides from the teacher, first, and handed to the
    student as ``taught``), combined into (total, {term: value})."""
    need = loss_fn.required_features
    from_teacher = need & teacher.provides if teacher is not None else frozenset()
    taught = {}
    if from_teacher:
        with section("teacher"):
            taught = teacher.features(batch, from_teacher)
    features = model(batch["images"], batch["captions"], batch["regions"], batch["region_captions"],
                     need=need - from_teacher, taught=taught)
    features.update(taught)
    with section("losses"):
        return loss_fn(features)


@dataclass
class StepResult:
    finite: bool  # False: a rank saw a NaN/inf loss and no parameter was updated
    loss: torch.Tensor | None = None  # mean over the micro-batches, detached, on the device
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # each term, mean over micro-batches
    stop_requested: bool = False  # some rank asked to stop (SIGTERM/SIGUSR1), known to every rank


def _check_every_rank(loss: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """(the loss is finite on every rank, some rank asked to stop): one all-reduce of two flags and
    the one host-device synchronisation of a checked step."""
    flags = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.new_tensor(float(stop_requested))])
    bad, stop = all_reduce_sum(flags.float()).tolist()
    return bad == 0, stop > 0


def train_step(
    model: FineCLIPModel,
    loss_fn: CompositeLoss,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict],
    *,
    ddp_model: nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    precision: str = "fp32",
    grad_clip: float = 0.0,
    check_finite: bool = False,
    teacher: Teacher | None = None,
    stop_requested: bool = False,
) -> StepResult:
    """One optimizer step over ``micro_batches`` (K > 1: gradient accumulation; each micro-batch is
    its own contrastive batch). Gradients are synchronised across ranks on the last micro-batch
    only. With ``check_finite`` a NaN/inf loss on any rank leaves every rank's weights untouched,
    and this rank's ``stop_requested`` travels in the same all-reduce (``StepResult.stop_requested``)."""
    device = model.pixel_mean.device
    forward_model = ddp_model if ddp_model is not None else model
    count = len(micro_batches)
    optimizer.zero_grad(set_to_none=True)
    if teacher is not None:
        teacher.begin_step()
    losses, parts_sum, stop_anywhere = [], {}, stop_requested
    for i, batch in enumerate(micro_batches):
        batch = move_batch(batch, device)
        defer_sync = ddp_model is not None and i < count - 1
        with ddp_model.no_sync() if defer_sync else contextlib.nullcontext():
            with autocast_context(device, precision):
                loss, parts = forward_loss(forward_model, loss_fn, batch, teacher)
            if check_finite:
                finite, stop_anywhere = _check_every_rank(loss, stop_requested)
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    return StepResult(finite=False, parts=parts, stop_requested=stop_anywhere)
            with section("backward"):
                scaled = loss / count
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        losses.append(loss.detach())
        for name, value in parts.items():
            parts_sum[name] = parts_sum.get(name, 0.0) + value.detach() / count
    with section("optimizer"):
        if grad_clip:
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.clamp_logit_scale()
    return StepResult(finite=True, loss=torch.stack(losses).mean(), parts=parts_sum, stop_requested=stop_anywhere)
