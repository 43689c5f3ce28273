"""The training loop: one process or DDP, any device, exactly resumable. Built from a Hydra config.

    run = build(cfg)              model, loss terms, data, optimizer, schedule (from the config)
    progress = resume(run)        the newest checkpoint, checked against the current config
    for each epoch, each step:
        train_step(...)           fineclip.engine.step: forward, losses, backward, update
        log_step(...)             metrics.jsonl, TensorBoard, W&B, progress bar
        save(...)                 atomic checkpoint (every N steps, each epoch, on SIGTERM)
    evaluate                      every trainer.eval_every epochs and at the end
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from fineclip.cli import ConfigError
from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.data.random_batch import random_batch
from fineclip.data.sampler import GlobalBatchSampler
from fineclip.engine.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint, save_step_checkpoint
from fineclip.engine.distributed import DistInfo, all_reduce_sum, barrier, resolve_device
from fineclip.engine.metrics_log import MetricsLogger, peak_memory_gb, reset_peak_memory
from fineclip.engine.step import StepResult, autocast_context, forward_loss, resolve_precision, train_step
from fineclip.eval import format_metrics
from fineclip.eval.protocols import ProtocolError, box_protocol, dense_image_size
from fineclip.eval.runner import build_eval_set, evaluate_from_config
from fineclip.losses import CompositeLoss
from fineclip.losses.gather import local_only
from fineclip.methods import GridRegions
from fineclip.methods.teachers import SelfTeacher, Teacher
from fineclip.models import FineCLIPModel
from fineclip.models.fineclip_model import DETAIL_FEATURES, FEATURES, NO_GRAD_CROPS

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf and ``trainer.on_nonfinite=stop``."""


class ResumeError(ValueError):
    """A checkpoint that the current config cannot continue; the message says what differs."""


# -- randomness ---------------------------------------------------------------------------------
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


# -- building ------------------------------------------------------------------------------------
def compile_blocks(model: FineCLIPModel) -> None:
    """torch.compile every transformer block in place (works whichever path calls them), and the
    whole image tower's forward, which the crop pass runs (one graph from pixels to embedding)."""
    for module in model.clip.modules():
        if type(module).__name__ in ("ResidualAttentionBlock", "CustomResidualAttentionBlock", "EvaBlock", "Block"):
            module.compile()
    model.clip.visual.compile()


def freeze_unused_parameters(
    model: FineCLIPModel, loss_fn: CompositeLoss, precision: str = "fp32", teacher: Teacher | None = None
) -> list[str]:
    """Make every trainable parameter that no enabled loss term depends on not trainable; returns
    their names.

    DDP needs every trainable parameter in every step's graph (a logit scale under ``loss=sd``, a
    text tower that no enabled term reads). Which ones are used is found once, by autograd, on a
    small random batch through the very forward the trainer runs: a parameter whose gradient is
    absent (not merely zero) gets none in any step either. Run on every rank, before DDP wrapping
    and compilation; RNG states and the text cache are left as they were.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    device = model.pixel_mean.device
    batch = random_batch(2, 2, model.image_size[0], device=device)
    was_training = model.training
    model.train()
    probe = teacher.probe() if teacher is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), probe:
        with autocast_context(device, precision):
            loss, _ = forward_loss(model, loss_fn, batch, teacher)
        grads = torch.autograd.grad(loss, [p for _, p in trainable], allow_unused=True)
    model.text_cache.clear()
    model.train(was_training)
    unused = [name for (name, p), grad in zip(trainable, grads, strict=True) if grad is None]
    for (_, p), grad in zip(trainable, grads, strict=True):
        if grad is None:
            p.requires_grad_(False)
    return unused


def proposal_arguments(cfg: DictConfig) -> dict:
    """With ``regions=proposals``, the training set's regions come from ``regions.file``."""
    regions = cfg.get("regions") or {}
    if regions.get("source") != "proposals":
        return {}
    file = OmegaConf.select(cfg, "regions.file", default=None, throw_on_missing=False)
    if file in (None, "", "???"):
        raise ConfigError("regions=proposals needs regions.file=<COCO-format proposals json>")
    return {"proposals": {"file": file, "min_score": regions.min_score, "max_per_image": regions.max_per_image}}


def check_region_captions(cfg: DictConfig, region_source, loss_fn: CompositeLoss) -> None:
    """Grid cells and proposals have no captions: a loss term that reads region captions cannot train on them."""
    captionless = (region_source is not None and not getattr(region_source, "has_captions", True)) or (
        (cfg.get("regions") or {}).get("source") == "proposals")
    if captionless and "region_text_emb" in loss_fn.required_features:
        raise ConfigError(f"regions={cfg.regions.get('source', 'grid')} gives regions without captions, but the loss "
                          f"({cfg.loss._target_}) reads region captions: use a loss without L_RC (e.g. loss=sd, "
                          "method=clipself or method=regionclip) or regions=boxes")


def check_teacher_provides(cfg: DictConfig, loss_fn: CompositeLoss, teacher: Teacher) -> None:
    """Features that neither the model nor the teacher computes (DetailCLIP's loss without its teacher)."""
    missing = loss_fn.required_features - set(FEATURES) - set(DETAIL_FEATURES) - {NO_GRAD_CROPS} - teacher.provides
    if missing:
        raise ConfigError(f"the loss ({cfg.loss._target_}) needs {sorted(missing)}, which teacher="
                          f"{type(teacher).__name__} does not give: use the method's own teacher (method=detailclip)")


def summarize_names(names: list[str]) -> str:
    """'clip.logit_scale, clip.transformer (24 tensors)': parameter names grouped by module."""
    groups = Counter(".".join(n.split(".")[:2]) for n in names)
    return ", ".join(g if n == 1 else f"{g} ({n} tensors)" for g, n in groups.items())


@dataclass
class Run:
    """Everything ``build`` makes from a config."""

    cfg: DictConfig
    run_dir: Path
    dist: DistInfo
    device: torch.device
    precision: str
    model: FineCLIPModel
    ddp_model: DistributedDataParallel | None
    teacher: Teacher
    region_source: GridRegions | None
    loss_fn: CompositeLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    train_set: RegionCaptionDataset
    sampler: GlobalBatchSampler
    val_set: RegionCaptionDataset | None
    accumulate: int
    steps_per_epoch: int  # optimizer steps
    total_steps: int

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.dist.world_size * self.accumulate


def build(cfg: DictConfig, run_dir: Path, dist: DistInfo) -> Run:
    tcfg = cfg.trainer
    seed_everything(cfg.seed)
    device = resolve_device(tcfg.device, dist.local_rank)
    precision = resolve_precision(device, tcfg.precision)
    model: FineCLIPModel = instantiate(cfg.model).to(device)
    if tcfg.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    loss_fn: CompositeLoss = instantiate(cfg.loss).to(device)
    teacher: Teacher = instantiate(cfg.teacher) if cfg.get("teacher") else SelfTeacher()
    teacher.setup(model)  # a copy of the initial model, for the teachers that keep one
    check_teacher_provides(cfg, loss_fn, teacher)
    region_source = instantiate(cfg.regions) if cfg.get("regions") and cfg.regions.get("_target_") else None
    train_set: RegionCaptionDataset = instantiate(cfg.data.train, image_size=model.image_size[0],
                                                  **proposal_arguments(cfg))
    check_region_captions(cfg, region_source, loss_fn)
    # text pools a loss embeds once with the initial text tower (RegionCLIP's concepts)
    loss_fn.prepare(model.encode_text_pool, list(train_set.categories.values()))
    frozen = freeze_unused_parameters(model, loss_fn, precision, teacher)
    if frozen and dist.is_main:
        log.info("not trained by the enabled loss terms, so frozen: %s", summarize_names(frozen))
    if tcfg.compile:
        compile_blocks(model)

    val_set = None
    if dist.is_main:
        patch = model.tower.patch_size[0]
        protocol = box_protocol(cfg)
        if dense_image_size(protocol, patch) not in (None, model.image_size[0]):
            raise ProtocolError(f"eval.protocol={protocol.name} evaluates at {dense_image_size(protocol, patch)} px, "
                                "not the training size: evaluate the checkpoint with python -m fineclip.evaluate")
        val_set = build_eval_set(cfg, model.image_size[0], patch)
    accumulate = max(1, int(tcfg.accumulate_steps))
    sampler = GlobalBatchSampler(len(train_set), cfg.data.batch_size, cfg.seed, dist.rank, dist.world_size)
    steps_per_epoch = sampler.steps_per_epoch // accumulate
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training images are fewer than one global batch of "
            f"{cfg.data.batch_size} x {dist.world_size} ranks x {accumulate} accumulation steps"
        )
    total_steps = steps_per_epoch * tcfg.epochs
    optimizer = instantiate(cfg.optim.optimizer, model=model)
    scheduler = instantiate(cfg.optim.scheduler, optimizer=optimizer, total_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ddp_model = None
    if dist.enabled and tcfg.get("sync_grads", True):
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif dist.enabled and dist.is_main:
        log.warning("trainer.sync_grads=false: every rank trains its own replica on its shard with local losses, "
                    "and rank 0's weights are saved (parity with the public CLIPSelf-lineage code only)")
    return Run(cfg, run_dir, dist, device, precision, model, ddp_model, teacher, region_source, loss_fn, optimizer,
               scheduler, scaler, train_set, sampler, val_set, accumulate, steps_per_epoch, total_steps)


# -- checkpoints and resuming -----------------------------------------------------------------------
@dataclass
class Progress:
    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0  # optimizer steps done


# a change of these model keys keeps the architecture and the weights' meaning
MODEL_KEYS_FREE_TO_CHANGE = ("checkpoint", "crop_chunk", "text_cache_dtype")


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def check_resumable(state: dict, run: Run) -> list[str]:
    """Raise ``ResumeError`` where the current config cannot continue the checkpoint (another
    model, another global batch); return the other settings that changed, as 'key: old -> new'."""
    saved = state.get("config") or {}
    current = OmegaConf.to_container(run.cfg, resolve=True)
    old_model = {k: v for k, v in saved.get("model", {}).items() if k not in MODEL_KEYS_FREE_TO_CHANGE}
    new_model = {k: v for k, v in current["model"].items() if k not in MODEL_KEYS_FREE_TO_CHANGE}
    if old_model != new_model:
        diff = [f"model.{k}: {old_model.get(k)!r} -> {new_model.get(k)!r}"
                for k in sorted(set(old_model) | set(new_model)) if old_model.get(k) != new_model.get(k)]
        raise ResumeError("the checkpoint was trained with another model, which this run cannot continue ("
                          + "; ".join(diff) + "); start a new run directory or set trainer.resume=null")
    old_global = state.get("global_batch")
    if old_global is None:  # checkpoints written before global_batch was stored
        old_global = saved["data"]["batch_size"] * len(state["rng"]) * saved["trainer"].get("accumulate_steps", 1)
    if old_global != run.global_batch:
        raise ResumeError(
            f"the checkpoint was trained with a global batch of {old_global} images per optimizer step, this run has "
            f"{run.global_batch} (data.batch_size={run.cfg.data.batch_size} x {run.dist.world_size} ranks x "
            f"{run.accumulate} accumulation steps): the data order and the position inside the epoch would not "
            "carry over. Keep the global batch, or start a new run directory"
        )
    old, new = _flatten(saved), _flatten(current)
    ignored = ("trainer.resume",)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not k.startswith(ignored)]


def find_resume_state(run_dir: Path, resume: str | None) -> tuple[Path, dict] | None:
    """``resume``: null (start fresh), "auto" (newest good checkpoint of the run, if any), or a path."""
    if not resume:
        return None
    if resume == "auto":
        found = load_latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints")
        return found
    return Path(resume), load_checkpoint(resume)


def resume(run: Run) -> Progress:
    """Load the checkpoint that ``trainer.resume`` names into the built run. What depends on the
    config (the lr schedule, the optimizer's hyperparameters, the number of epochs) comes from the
    *current* config; the weights, optimizer moments, scaler, RNG states and position come from
    the checkpoint."""
    found = find_resume_state(run.run_dir, run.cfg.trainer.resume)
    if found is None:
        return Progress()
    path, state = found
    changes = check_resumable(state, run)
    run.model.load_state_dict(state["model"])
    current_hyper = [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    try:
        run.optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        raise ResumeError(f"the optimizer state of {path} does not fit this run ({err}): the trainable parameters "
                          "differ (another loss configuration or model.freeze_text?)") from err
    for group, hyper in zip(run.optimizer.param_groups, current_hyper, strict=True):
        group.update(hyper)
    run.scaler.load_state_dict(state["scaler"])
    if state.get("teacher"):
        run.teacher.load_state_dict(state["teacher"])
    set_rng_states(state["rng"][min(run.dist.rank, len(state["rng"]) - 1)])
    progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"])
    if progress.step_in_epoch >= run.steps_per_epoch:
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
    if run.dist.is_main:
        log.info("resuming from %s (epoch %d, step %d)", path, state["epoch"], state["global_step"])
        if changes:
            log.warning("resuming with a changed config (the schedule follows the new one, %d steps in all): %s",
                        run.total_steps, "; ".join(changes))
    return progress


def save(run: Run, progress: Progress, reason: str) -> None:
    """Every rank's RNG state to rank 0, which writes the checkpoint atomically; all ranks wait."""
    rngs = [None] * run.dist.world_size
    if run.dist.enabled:
        torch.distributed.all_gather_object(rngs, rng_states())
    else:
        rngs = [rng_states()]
    if run.dist.is_main:
        state = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "teacher": run.teacher.state_dict(),
            "epoch": progress.epoch,
            "step_in_epoch": progress.step_in_epoch,
            "global_step": progress.step,
            "global_batch": run.global_batch,
            "rng": rngs,
            "config": OmegaConf.to_container(run.cfg, resolve=True),
        }
        folder = run.run_dir / "checkpoints"
        path = save_step_checkpoint(state, folder, progress.step, keep=run.cfg.trainer.keep_checkpoints)
        log.info("saved %s (%s)", path, reason)
    barrier()


# -- one epoch of steps ------------------------------------------------------------------------------
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


def epoch_batches(run: Run, progress: Progress):
    """The micro-batches of each remaining optimizer step of ``progress.epoch``, in the order of
    an uninterrupted run (the order depends only on seed and epoch)."""
    run.train_set.set_epoch(progress.epoch)
    run.teacher.set_epoch(progress.epoch)
    run.sampler.set_epoch(progress.epoch, start_step=progress.step_in_epoch * run.accumulate)
    loader = DataLoader(
        run.train_set, batch_size=run.cfg.data.batch_size, sampler=run.sampler, num_workers=run.cfg.data.num_workers,
        collate_fn=collate_regions, pin_memory=run.device.type == "cuda", drop_last=True,
    )
    batches = iter(loader)
    for _ in range(progress.step_in_epoch, run.steps_per_epoch):
        micro_batches = [next(batches) for _ in range(run.accumulate)]
        if run.region_source is not None:
            micro_batches = [run.region_source(b, progress.epoch) for b in micro_batches]
        yield micro_batches


def log_step(run: Run, progress: Progress, result: StepResult, logger: MetricsLogger | None, bar, throughput):
    """Rank-mean of the loss and each term (the objective is their mean over ranks), lr, logit
    scale, images/s: to the log files and the progress bar."""
    values = torch.stack([result.loss, *result.parts.values()]).float()
    values = (all_reduce_sum(values) / run.dist.world_size).tolist()
    if logger is None:
        return
    metrics = {"train/loss": values[0]}
    metrics.update({f"train/loss_{k}": v for k, v in zip(result.parts, values[1:], strict=True)})
    metrics["train/lr"] = run.optimizer.param_groups[0]["lr"]
    metrics["train/logit_scale"] = run.model.logit_scale.item()
    metrics["train/images_per_s"] = throughput()
    logger.log(progress.step, metrics, epoch=progress.epoch)
    bar.set_postfix(loss=f"{values[0]:.3f}", **{k: f"{v:.3f}" for k, v in zip(result.parts, values[1:], strict=True)},
                    img_s=f"{metrics['train/images_per_s']:.0f}")


class Throughput:
    """Images per second since the last call."""

    def __init__(self) -> None:
        self.images, self.tick = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def __call__(self) -> float:
        now = time.perf_counter()
        rate = self.images / max(now - self.tick, 1e-9)
        self.images, self.tick = 0, now
        return rate


def run_epoch(run: Run, progress: Progress, logger: MetricsLogger | None, stop: StopRequest) -> bool:
    """The remaining steps of ``progress.epoch``; False if a stop was requested (after saving)."""
    tcfg = run.cfg.trainer
    bar = tqdm(total=run.steps_per_epoch, initial=progress.step_in_epoch, desc=f"epoch {progress.epoch + 1}/"
               f"{tcfg.epochs}", disable=not (tcfg.progress and run.dist.is_main), dynamic_ncols=True)
    throughput = Throughput()
    skipped = 0
    for micro_batches in epoch_batches(run, progress):
        run.scheduler.step_update(progress.step + 1)  # the lr of optimizer step k is schedule(k), k = 1..total
        parity = run.dist.enabled and run.ddp_model is None  # trainer.sync_grads=false
        with local_only() if parity else contextlib.nullcontext():
            result = train_step(run.model, run.loss_fn, run.optimizer, micro_batches, ddp_model=run.ddp_model,
                                scaler=run.scaler, precision=run.precision, grad_clip=tcfg.grad_clip,
                                check_finite=True, teacher=run.teacher, stop_requested=stop.requested)
        if not result.finite:
            message = f"non-finite loss at step {progress.step + 1} (epoch {progress.epoch + 1}); parts: " + ", ".join(
                f"{k}={v.item():.4g}" for k, v in result.parts.items())
            if tcfg.on_nonfinite == "stop":
                raise NonFiniteLossError(message + f"; the last good checkpoint is in {run.run_dir / 'checkpoints'}"
                                         " (continue with trainer.resume=auto, e.g. with a lower lr)")
            skipped += 1
            log.warning("%s: step skipped (%d so far)", message, skipped)
        progress.step += 1
        progress.step_in_epoch += 1
        if result.finite:
            run.teacher.after_step(run.model, progress.step, run.total_steps)
        bar.update(1)
        throughput.add(run.global_batch)
        if result.finite and (progress.step % tcfg.log_every == 0 or progress.step == run.total_steps):
            log_step(run, progress, result, logger, bar, throughput)
        if result.stop_requested:
            bar.close()
            save(run, progress, f"stop requested by {stop.signal_name or 'another rank'}")
            log.warning("stopped by %s at step %d; continue with trainer.resume=auto",
                        stop.signal_name or "another rank", progress.step)
            return False
        if tcfg.checkpoint_every and progress.step % tcfg.checkpoint_every == 0 \
                and progress.step_in_epoch < run.steps_per_epoch:
            save(run, progress, f"every {tcfg.checkpoint_every} steps")
    bar.close()
    return True


# -- the whole run -----------------------------------------------------------------------------------
@torch.no_grad()
def log_feature_maps(run: Run, logger: MetricsLogger, step: int) -> None:
    """For the first ``trainer.log_maps`` val images: the image, K-means and PCA maps of its dense
    features and the heatmap of its first box's class prompt (``feature_panel``), to TensorBoard/W&B."""
    from fineclip.viz.maps import feature_panel

    count = min(int(run.cfg.trainer.get("log_maps", 0)), len(run.val_set))
    if count <= 0:
        return
    was_training = run.model.training
    run.model.eval()
    template = (run.cfg.eval.get("templates") or run.cfg.data.get("templates") or ["a photo of a {}."])[0]
    panels = {}
    for i in range(count):
        item = run.val_set[i]
        pixels = run.model.normalize_pixels(item["image"][None].to(run.device))
        _, dense = run.model.encode_image_dense(pixels, with_global=False)
        if not bool(torch.isfinite(dense).all()):
            log.warning("val image %d: non-finite dense features, no feature maps logged", i)
            continue
        text = None
        if len(item["category_ids"]):
            name = run.val_set.categories[int(item["category_ids"][0])]
            text = run.model.encode_text([template.format(name)])[0].float().cpu()
        panels[f"maps/val_{i}"] = feature_panel(item["image"], dense[0].float().cpu(), text_emb=text).numpy()
    run.model.train(was_training)
    logger.log_images(step, panels)


def evaluate_and_log(run: Run, progress: Progress, logger: MetricsLogger, epoch: int) -> dict:
    metrics = evaluate_from_config(run.model, run.val_set, run.cfg, run.device, progress=run.cfg.trainer.progress)
    logger.log(progress.step, {f"val/{k}": v for k, v in metrics.items()}, epoch=epoch)
    log_feature_maps(run, logger, progress.step)
    return metrics


def release_weights(run: Run, progress: Progress) -> None:
    """When the teacher makes the released weights (CLIPSelf's α-ensemble), write them as
    ``checkpoints/ensembled.pt`` and load them into the model for the final evaluation; ``last.pt``
    keeps the student, so the run can still be resumed or extended."""
    weights = run.teacher.final_weights(run.model)
    if weights is None:
        return
    if run.dist.is_main:
        state = {"model": weights, "config": OmegaConf.to_container(run.cfg, resolve=True),
                 "epoch": progress.epoch, "global_step": progress.step}
        path = save_checkpoint(state, run.run_dir / "checkpoints" / "ensembled.pt")
        log.info("released weights (the teacher's ensemble with the student): %s", path)
    run.model.load_state_dict(weights)


def train(cfg: DictConfig, run_dir: str | Path, dist_info: DistInfo | None = None) -> dict:
    """Train as configured; returns the final evaluation metrics (empty without a val set)."""
    run = build(cfg, Path(run_dir), dist_info or DistInfo())
    reset_peak_memory(run.device)  # this run's own peak, also as one job of a multirun
    main, tcfg = run.dist.is_main, cfg.trainer
    progress = resume(run)
    logger = None
    if main:
        logger = MetricsLogger(run.run_dir, tensorboard=tcfg.tensorboard, wandb=tcfg.get("wandb", False),
                               config=OmegaConf.to_container(cfg, resolve=True), name=cfg.name)
        (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info(
            "training %s on %s x%d (%s): %d images, %d steps (%d epochs x %d), batch %d/rank, losses %s",
            cfg.model.name, run.device, run.dist.world_size, run.precision, len(run.train_set), run.total_steps,
            tcfg.epochs, run.steps_per_epoch, cfg.data.batch_size, dict(run.loss_fn.weights),
        )
    stop = StopRequest()
    try:
        while progress.epoch < tcfg.epochs:
            run.model.train()
            first_step, start = progress.step_in_epoch, time.perf_counter()
            if not run_epoch(run, progress, logger, stop):
                if logger is not None:
                    logger.close()
                stop.hand_over()
                return {}
            if main:  # this epoch's step time (scaled up if it was resumed mid-epoch), without eval
                done = max(run.steps_per_epoch - first_step, 1)
                epoch_time = (time.perf_counter() - start) * run.steps_per_epoch / done
                logger.log(progress.step, {"epoch/time_s": epoch_time,
                                           "epoch/peak_memory_gb": peak_memory_gb(run.device)}, epoch=progress.epoch)
            save(run, progress, f"end of epoch {progress.epoch + 1}")
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
            eval_now = tcfg.eval_every and progress.epoch % tcfg.eval_every == 0 and progress.epoch < tcfg.epochs
            if main and eval_now and run.val_set is not None:
                evaluate_and_log(run, progress, logger, progress.epoch - 1)
            barrier()
    finally:
        stop.restore()

    release_weights(run, progress)
    metrics: dict = {}
    if main and run.val_set is not None:
        metrics = evaluate_and_log(run, progress, logger, tcfg.epochs - 1)
        (run.run_dir / "eval.json").write_text(json.dumps(metrics, indent=2))
        print(f"\nfinal evaluation ({len(run.val_set)} val images):\n{format_metrics(metrics)}")
    if main:
        logger.close()
        print(f"run directory: {run.run_dir}")
    barrier()
    return metrics
