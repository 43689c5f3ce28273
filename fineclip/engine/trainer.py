"""The training loop: one process, any device. Built from a resolved Hydra config."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.engine.checkpoint import save_epoch_checkpoint
from fineclip.engine.metrics_log import MetricsLogger
from fineclip.eval import evaluate, format_metrics
from fineclip.losses import CompositeLoss
from fineclip.models import FineCLIPModel

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA by default ("auto"), plain fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"trainer.precision={precision!r}: use auto, fp32 or bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def training_step(model: FineCLIPModel, loss_fn: CompositeLoss, batch: dict) -> tuple[torch.Tensor, dict]:
    """Forward the features the enabled loss terms need, and combine them."""
    features = model(
        batch["images"], batch["captions"], batch["regions"], batch["region_captions"],
        need=loss_fn.required_features,
    )
    return loss_fn(features)


def build_eval_dataset(cfg: DictConfig, image_size: int) -> RegionCaptionDataset | None:
    if cfg.data.get("val") is None:
        return None
    return instantiate(cfg.data.val, image_size=image_size)


def run_evaluation(model, dataset, cfg: DictConfig, device) -> dict[str, float]:
    return evaluate(
        model, dataset, templates=list(cfg.eval.templates), batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers, device=device, progress=cfg.trainer.progress,
    )


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train as configured; returns the final evaluation metrics (empty without a val set)."""
    run_dir = Path(run_dir)
    tcfg = cfg.trainer
    seed_everything(cfg.seed)
    device = resolve_device(tcfg.device)

    model: FineCLIPModel = instantiate(cfg.model).to(device)
    loss_fn: CompositeLoss = instantiate(cfg.loss).to(device)
    image_size = model.image_size[0]
    train_set: RegionCaptionDataset = instantiate(cfg.data.train, image_size=image_size)
    val_set = build_eval_dataset(cfg, image_size)
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True, generator=generator,
        num_workers=cfg.data.num_workers, collate_fn=collate_regions, pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {cfg.data.batch_size}")
    total_steps = len(loader) * tcfg.epochs
    optimizer = instantiate(cfg.optim.optimizer, model=model)
    scheduler = instantiate(cfg.optim.scheduler, optimizer=optimizer, total_steps=total_steps)
    logger = MetricsLogger(run_dir, tensorboard=tcfg.tensorboard)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info(
        "training %s on %s: %d images, %d steps (%d epochs x %d), losses %s",
        cfg.model.name, device, len(train_set), total_steps, tcfg.epochs, len(loader), dict(loss_fn.weights),
    )

    step = 0
    for epoch in range(tcfg.epochs):
        model.train()
        train_set.set_epoch(epoch)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{tcfg.epochs}", disable=not tcfg.progress, dynamic_ncols=True)
        tick, seen = time.perf_counter(), 0
        for batch in bar:
            batch = move_batch(batch, device)
            with autocast_context(device, tcfg.precision):
                loss, parts = training_step(model, loss_fn, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at step {step} ({ {k: v.item() for k, v in parts.items()} }); "
                    f"last good checkpoint: {run_dir / 'checkpoints'}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            model.clamp_logit_scale()
            step += 1
            scheduler.step_update(step)
            seen += len(batch["images"])
            if step % tcfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - tick
                metrics = {"train/loss": loss.item(), **{f"train/loss_{k}": v.item() for k, v in parts.items()}}
                metrics["train/lr"] = optimizer.param_groups[0]["lr"]
                metrics["train/logit_scale"] = model.logit_scale.item()
                metrics["train/images_per_s"] = seen / max(elapsed, 1e-9)
                logger.log(step, metrics, epoch=epoch)
                bar.set_postfix(
                    loss=f"{metrics['train/loss']:.3f}",
                    **{k: f"{v.item():.3f}" for k, v in parts.items()},
                    img_s=f"{metrics['train/images_per_s']:.0f}",
                )
                tick, seen = time.perf_counter(), 0
        bar.close()
        save_epoch_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "config": OmegaConf.to_container(cfg, resolve=True),
            },
            run_dir / "checkpoints",
            epoch + 1,
            keep=tcfg.keep_checkpoints,
        )
        if tcfg.eval_every and val_set is not None and (epoch + 1) % tcfg.eval_every == 0 and epoch + 1 < tcfg.epochs:
            metrics = run_evaluation(model, val_set, cfg, device)
            logger.log(step, {f"val/{k}": v for k, v in metrics.items()}, epoch=epoch)

    metrics: dict[str, float] = {}
    if val_set is not None:
        metrics = run_evaluation(model, val_set, cfg, device)
        logger.log(step, {f"val/{k}": v for k, v in metrics.items()}, epoch=tcfg.epochs - 1)
        (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
        print(f"\nfinal evaluation ({len(val_set)} val images):\n{format_metrics(metrics)}")
    logger.close()
    print(f"run directory: {run_dir}")
    return metrics

