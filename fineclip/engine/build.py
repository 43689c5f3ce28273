"""Everything a run is made of, built from a Hydra config: the method (model, loss terms, teacher,
region source: ``build_method``, which the benchmark calls too) and around it the data, the
evaluation set, the optimizer and its schedule (``build``)."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from fineclip.data import RegionCaptionDataset
from fineclip.data.loader import MapStyleBatches, TrainBatches
from fineclip.data.random_batch import random_batch
from fineclip.engine.distributed import DistInfo, resolve_device
from fineclip.engine.rng import seed_everything
from fineclip.engine.step import autocast_context, forward_loss, resolve_precision
from fineclip.errors import ConfigError, ProtocolError, user_errors_unwrapped
from fineclip.eval.eval_set import build_eval_set
from fineclip.eval.protocols import box_protocol, dense_image_size
from fineclip.losses import CompositeLoss
from fineclip.methods.regions import BoxRegions, RegionSource
from fineclip.methods.teachers import SelfTeacher, Teacher, TeacherSet
from fineclip.models import FineCLIPModel

log = logging.getLogger(__name__)


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
    views = teacher.dataset_arguments().get("views") if teacher is not None else None
    batch = random_batch(2, 2, model.image_size[0], device=device, views=views)
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


def check_features_provided(loss_fn: CompositeLoss, model: FineCLIPModel, teacher: Teacher) -> None:
    """Features that neither the model nor the teacher computes (DetailCLIP's loss without its teacher)."""
    missing = loss_fn.required_features - model.provides - teacher.provides
    if missing:
        raise ConfigError(f"the loss ({type(loss_fn).__name__}) needs {sorted(missing)}, which neither the model nor "
                          f"teacher={type(teacher).__name__} gives: use the method's own teacher and model "
                          "(e.g. method=detailclip)")


def summarize_names(names: list[str]) -> str:
    """'clip.logit_scale, clip.transformer (24 tensors)': parameter names grouped by module."""
    groups = Counter(".".join(n.split(".")[:2]) for n in names)
    return ", ".join(g if n == 1 else f"{g} ({n} tensors)" for g, n in groups.items())


@dataclass
class Method:
    """What ``method=`` composes: the model, the loss terms, the teacher and the region source."""

    model: FineCLIPModel
    loss_fn: CompositeLoss
    teacher: Teacher
    regions: RegionSource


def build_method(cfg: DictConfig, device: torch.device, **model_overrides) -> Method:
    """The model (``cfg.model`` with ``model_overrides``) on ``device``, its loss terms, its teacher set
    up from the initial model, its region source; refused when they do not fit together."""
    with user_errors_unwrapped():
        return _build_method(cfg, device, **model_overrides)


def _build_method(cfg: DictConfig, device: torch.device, **model_overrides) -> Method:
    model: FineCLIPModel = instantiate(cfg.model, **model_overrides).to(device)
    loss_fn: CompositeLoss = instantiate(cfg.loss).to(device)
    teacher: Teacher = instantiate(cfg.teacher) if cfg.get("teacher") else SelfTeacher()
    if cfg.get("vfm"):  # an external teacher beside the method's own (DeCLIP's context target)
        teacher = TeacherSet([teacher, instantiate(cfg.vfm)])
    teacher.setup(model)  # a copy of the initial model, for the teachers that keep one
    check_features_provided(loss_fn, model, teacher)
    regions: RegionSource = instantiate(cfg.regions) if cfg.get("regions") else BoxRegions()
    regions.check_loss(loss_fn.required_features)
    return Method(model, loss_fn, teacher, regions)


@dataclass
class Run:
    """Everything ``build`` makes from a config."""

    cfg: DictConfig
    run_dir: Path
    dist: DistInfo
    device: torch.device
    precision: str
    method: Method
    ddp_model: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    train_set: RegionCaptionDataset
    batches: TrainBatches
    val_set: RegionCaptionDataset | None
    accumulate: int
    total_steps: int

    @property
    def model(self) -> FineCLIPModel:
        return self.method.model

    @property
    def teacher(self) -> Teacher:
        return self.method.teacher

    @property
    def loss_fn(self) -> CompositeLoss:
        return self.method.loss_fn

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.dist.world_size * self.accumulate


def build_val_set(cfg: DictConfig, model: FineCLIPModel) -> RegionCaptionDataset | None:
    """The evaluation set at the training size (a protocol at another size is refused: evaluate the
    checkpoint with ``python -m fineclip.evaluate``)."""
    patch = model.tower.patch_size[0]
    protocol = box_protocol(cfg)
    if dense_image_size(protocol, patch) not in (None, model.image_size[0]):
        raise ProtocolError(f"eval.protocol={protocol.name} evaluates at {dense_image_size(protocol, patch)} px, "
                            "not the training size: evaluate the checkpoint with python -m fineclip.evaluate")
    return build_eval_set(cfg, model.image_size[0], patch)


def build(cfg: DictConfig, run_dir: Path, dist: DistInfo) -> Run:
    """The run of ``cfg``; a config value that a ``_target_`` refuses raises its own user error."""
    with user_errors_unwrapped():
        return _build(cfg, run_dir, dist)


def _build(cfg: DictConfig, run_dir: Path, dist: DistInfo) -> Run:
    tcfg = cfg.trainer
    seed_everything(cfg.seed)
    device = resolve_device(tcfg.device, dist.local_rank)
    precision = resolve_precision(device, tcfg.precision)
    method = build_method(cfg, device)
    model, loss_fn = method.model, method.loss_fn
    if tcfg.grad_checkpointing:
        model.clip.set_grad_checkpointing(True)
    train_set: RegionCaptionDataset = instantiate(cfg.data.train, image_size=model.image_size[0],
                                                  **method.regions.dataset_arguments(),
                                                  **method.teacher.dataset_arguments())
    # text pools a loss embeds once with the initial text tower (RegionCLIP's concepts)
    loss_fn.prepare(model.encode_text_pool, list(train_set.categories.values()), method.teacher.text_encoder())
    frozen = freeze_unused_parameters(model, loss_fn, precision, method.teacher)
    if frozen and dist.is_main:
        log.info("not trained by the enabled loss terms, so frozen: %s", summarize_names(frozen))
    if tcfg.compile:
        compile_blocks(model)

    val_set = build_val_set(cfg, model) if dist.is_main else None
    accumulate = max(1, int(tcfg.accumulate_steps))
    batches = MapStyleBatches(train_set, cfg.data.batch_size, accumulate, cfg.seed, dist.rank, dist.world_size,
                              num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                              transform=method.regions, max_bad_fraction=cfg.data.get("max_bad_fraction", 0.001))
    total_steps = batches.steps_per_epoch * tcfg.epochs
    optimizer = instantiate(cfg.optim.optimizer, model=model)
    scheduler = instantiate(cfg.optim.scheduler, optimizer=optimizer, total_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ddp_model = None
    if dist.enabled and tcfg.get("sync_grads", True):
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif dist.enabled and dist.is_main:
        log.warning("trainer.sync_grads=false: every rank trains its own replica on its shard with local losses, "
                    "and rank 0's weights are saved (parity with the public CLIPSelf-lineage code only)")
    return Run(cfg, run_dir, dist, device, precision, method, ddp_model, optimizer, scheduler, scaler, train_set,
               batches, val_set, accumulate, total_steps)
