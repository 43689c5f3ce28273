"""The training loop: one process or DDP, any device, exactly resumable. Built from a Hydra config."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.data.sampler import GlobalBatchSampler
from fineclip.engine import distributed as dist_utils
from fineclip.engine.checkpoint import load_checkpoint, load_latest_checkpoint, save_step_checkpoint
from fineclip.engine.metrics_log import MetricsLogger, peak_memory_gb
from fineclip.eval import format_metrics
from fineclip.eval.runner import build_eval_set, evaluate_from_config
from fineclip.losses import CompositeLoss
from fineclip.models import FineCLIPModel

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf and ``trainer.on_nonfinite=stop``."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Every RNG state, as types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def move_batch(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def training_step(model, loss_fn: CompositeLoss, batch: dict) -> tuple[torch.Tensor, dict]:
    """Forward the features the enabled loss terms need (through the DDP wrapper when there is
    one, so that gradients are averaged), and combine them."""
    features = model(
        batch["images"], batch["captions"], batch["regions"], batch["region_captions"],
        need=loss_fn.required_features,
    )
    return loss_fn(features)


def compile_blocks(model: FineCLIPModel) -> None:
    """torch.compile every transformer block in place (works whichever path calls them), and the
    whole image tower's forward, which the crop pass runs (one graph from pixels to embedding)."""
    for module in model.clip.modules():
        if type(module).__name__ in ("ResidualAttentionBlock", "CustomResidualAttentionBlock", "EvaBlock", "Block"):
            module.compile()
    model.clip.visual.compile()


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption) ask the loop to save and exit.

    After the checkpoint is written, ``hand_over`` calls the handler that was installed before
    (submitit's, which requeues the job) so that a requeued run continues with resume=auto.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def hand_over(self) -> None:
        if not self.signal_name:
            return
        signum = signal.Signals[self.signal_name]
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def find_resume_state(run_dir: Path, resume: str | None) -> dict | None:
    """``resume``: null (start fresh), "auto" (newest good checkpoint of the run, if any), or a path."""
    if not resume:
        return None
    if resume == "auto":
        found = load_latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
            return None
        path, state = found
    else:
        path, state = Path(resume), load_checkpoint(resume)
    log.info("resuming from %s (epoch %d, step %d)", path, state["epoch"], state["global_step"])
    return state


def train(cfg: DictConfig, run_dir: str | Path, dist_info: dist_utils.DistInfo | None = None) -> dict[str, float]:
    """Train as configured; returns the final evaluation metrics (empty without a val set)."""
    run_dir = Path(run_dir)
    tcfg = cfg.trainer
    dist_info = dist_info or dist_utils.DistInfo()
    main = dist_info.is_main
    seed_everything(cfg.seed)
    device = resolve_device(tcfg.device, dist_info.local_rank)
    precision = resolve_precision(device, tcfg.precision)

    model: FineCLIPModel = instantiate(cfg.model).to(device)
    if tcfg.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    if tcfg.compile:
        compile_blocks(model)
    loss_fn: CompositeLoss = instantiate(cfg.loss).to(device)
    image_size = model.image_size[0]
    train_set: RegionCaptionDataset = instantiate(cfg.data.train, image_size=image_size)
    val_set = build_eval_set(cfg, image_size) if main else None
    accumulate = max(1, int(tcfg.accumulate_steps))
    sampler = GlobalBatchSampler(len(train_set), cfg.data.batch_size, cfg.seed, dist_info.rank, dist_info.world_size)
    steps_per_epoch = sampler.steps_per_epoch // accumulate  # optimizer steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training images are fewer than one global batch of "
            f"{cfg.data.batch_size} x {dist_info.world_size} ranks x {accumulate} accumulation steps"
        )
    total_steps = steps_per_epoch * tcfg.epochs
    optimizer = instantiate(cfg.optim.optimizer, model=model)
    scheduler = instantiate(cfg.optim.scheduler, optimizer=optimizer, total_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ddp_model = model
    if dist_info.enabled:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    epoch, step_in_epoch, step = 0, 0, 0
    state = find_resume_state(run_dir, tcfg.resume)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"][min(dist_info.rank, len(state["rng"]) - 1)])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["global_step"]
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
    logger = MetricsLogger(run_dir, tensorboard=tcfg.tensorboard) if main else None
    if main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info(
            "training %s on %s x%d (%s): %d images, %d steps (%d epochs x %d), batch %d/rank, losses %s",
            cfg.model.name, device, dist_info.world_size, precision, len(train_set), total_steps, tcfg.epochs,
            steps_per_epoch, cfg.data.batch_size, dict(loss_fn.weights),
        )

    def save(reason: str) -> None:
        rngs = [None] * dist_info.world_size
        if dist_info.enabled:
            torch.distributed.all_gather_object(rngs, rng_states())
        else:
            rngs = [rng_states()]
        if main:
            path = save_step_checkpoint(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "global_step": step,
                    "rng": rngs,
                    "config": OmegaConf.to_container(cfg, resolve=True),
                },
                run_dir / "checkpoints",
                step,
                keep=tcfg.keep_checkpoints,
            )
            log.info("saved %s (%s)", path, reason)
        dist_utils.barrier()

    stop = StopRequest()
    skipped = 0
    try:
        while epoch < tcfg.epochs:
            model.train()
            train_set.set_epoch(epoch)
            sampler.set_epoch(epoch, start_step=step_in_epoch * accumulate)
            loader = DataLoader(
                train_set, batch_size=cfg.data.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                collate_fn=collate_regions, pin_memory=device.type == "cuda", drop_last=True,
            )
            bar = tqdm(
                total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                disable=not (tcfg.progress and main), dynamic_ncols=True,
            )
            tick, seen = time.perf_counter(), 0
            epoch_start, epoch_first_step = time.perf_counter(), step_in_epoch
            batches = iter(loader)
            while step_in_epoch < steps_per_epoch:
                optimizer.zero_grad(set_to_none=True)
                losses, parts_sum = [], {}
                for micro in range(accumulate):
                    batch = move_batch(next(batches), device)
                    sync = micro == accumulate - 1 or not dist_info.enabled
                    with contextlib.nullcontext() if sync else ddp_model.no_sync():
                        with autocast_context(device, precision):
                            loss, parts = training_step(ddp_model, loss_fn, batch)
                        flags = torch.tensor([float(not torch.isfinite(loss)), float(stop.requested)], device=device)
                        flags = dist_utils.all_reduce_sum(flags)
                        if flags[0] > 0:
                            break
                        scaler.scale(loss / accumulate).backward()
                    losses.append(loss.detach())
                    for k, v in parts.items():
                        parts_sum[k] = parts_sum.get(k, 0.0) + v.detach() / accumulate
                    seen += len(batch["images"]) * dist_info.world_size
                if flags[0] > 0:
                    message = f"non-finite loss at step {step} (epoch {epoch + 1}); parts: " + ", ".join(
                        f"{k}={v.item():.4g}" for k, v in parts.items()
                    )
                    if tcfg.on_nonfinite == "stop":
                        raise NonFiniteLossError(
                            message + f"; the last good checkpoint is in {run_dir / 'checkpoints'}"
                            " (continue with trainer.resume=auto, e.g. with a lower lr)"
                        )
                    skipped += 1
                    log.warning("%s: step skipped (%d so far)", message, skipped)
                    for _ in range(accumulate - len(losses) - 1):
                        next(batches)  # keep the data order of an uninterrupted run
                    optimizer.zero_grad(set_to_none=True)
                else:
                    if tcfg.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    model.clamp_logit_scale()
                step += 1
                step_in_epoch += 1
                scheduler.step_update(step)
                bar.update(1)
                if losses and (step % tcfg.log_every == 0 or step == total_steps):
                    # the objective is the mean over ranks of the per-rank losses: log that
                    values = torch.stack([sum(losses) / len(losses), *parts_sum.values()]).float()
                    values = (dist_utils.all_reduce_sum(values) / dist_info.world_size).tolist()
                    parts_sum = dict(zip(parts_sum, values[1:], strict=True))
                if main and losses and (step % tcfg.log_every == 0 or step == total_steps):
                    elapsed = time.perf_counter() - tick
                    metrics = {"train/loss": values[0]}
                    metrics.update({f"train/loss_{k}": float(v) for k, v in parts_sum.items()})
                    metrics["train/lr"] = optimizer.param_groups[0]["lr"]
                    metrics["train/logit_scale"] = model.logit_scale.item()
                    metrics["train/images_per_s"] = seen / max(elapsed, 1e-9)
                    logger.log(step, metrics, epoch=epoch)
                    bar.set_postfix(
                        loss=f"{metrics['train/loss']:.3f}",
                        **{k: f"{float(v):.3f}" for k, v in parts_sum.items()},
                        img_s=f"{metrics['train/images_per_s']:.0f}",
                    )
                    tick, seen = time.perf_counter(), 0
                if flags[1] > 0:
                    bar.close()
                    save(f"stop requested by {stop.signal_name or 'another rank'}")
                    log.warning("stopped by %s at step %d; continue with trainer.resume=auto", stop.signal_name, step)
                    if main and logger is not None:
                        logger.close()
                    stop.hand_over()
                    return {}
                if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step_in_epoch < steps_per_epoch:
                    save(f"every {tcfg.checkpoint_every} steps")
            bar.close()
            if main:
                # time of this epoch's steps (scaled up if it was resumed mid-epoch), without eval
                done = max(steps_per_epoch - epoch_first_step, 1)
                epoch_time = (time.perf_counter() - epoch_start) * steps_per_epoch / done
                logger.log(step, {"epoch/time_s": epoch_time, "epoch/peak_memory_gb": peak_memory_gb(device)},
                           epoch=epoch)
            save(f"end of epoch {epoch + 1}")
            epoch, step_in_epoch = epoch + 1, 0
            eval_now = tcfg.eval_every and epoch % tcfg.eval_every == 0 and epoch < tcfg.epochs
            if main and eval_now and val_set is not None:
                metrics = evaluate_from_config(model, val_set, cfg, device, progress=tcfg.progress)
                logger.log(step, {f"val/{k}": v for k, v in metrics.items()}, epoch=epoch - 1)
            dist_utils.barrier()
    finally:
        stop.restore()

    metrics: dict[str, float] = {}
    if main and val_set is not None:
        metrics = evaluate_from_config(model, val_set, cfg, device, progress=tcfg.progress)
        logger.log(step, {f"val/{k}": v for k, v in metrics.items()}, epoch=tcfg.epochs - 1)
        (run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
        print(f"\nfinal evaluation ({len(val_set)} val images):\n{format_metrics(metrics)}")
    if main:
        logger.close()
        print(f"run directory: {run_dir}")
    dist_utils.barrier()
    return metrics
