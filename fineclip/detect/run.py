"""Train and evaluate the F-ViT detector: the frozen backbone from a fineclip checkpoint (or any weights
file of the configured model), base-class training, AP50 on novel / base / all classes.

Optimiser (CLIPSelf's OV-COCO): AdamW lr 1e-4 · batch/64, betas (0.9, 0.999), weight decay 0.1, gradient
norm clipped at 1.0, a linear warmup over 250 iterations from 1e-3 of the lr, then constant (OV-LVIS: ×0.1 at
the epochs of ``lr_steps``). An epoch's order depends on (seed, epoch) only, split across ranks, and an
image's jitter and samples on (seed, epoch, index) only: N ranks train as one process, and a run resumes
mid-epoch to the step it would have reached.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pycocotools import mask as mask_utils
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision.models.detection.roi_heads import paste_masks_in_image
from tqdm import tqdm

from fineclip.detect.data import OVDetectionSet, OVSplit, collate, read_split
from fineclip.detect.lvis_eval import lvis_evaluate
from fineclip.detect.metrics import ap50_per_class, split_ap50
from fineclip.detect.model import OVFasterRCNN, build_detector
from fineclip.detect.sync_bn import sync_batchnorm
from fineclip.engine.checkpoint import load_checkpoint, load_latest_checkpoint, save_step_checkpoint
from fineclip.engine.distributed import DistInfo
from fineclip.engine.metrics_log import MetricsLogger
from fineclip.errors import CheckpointError, ConfigError
from fineclip.eval.protocols import vild_prompts
from fineclip.models import FineCLIPModel
from fineclip.models.factory import at_size, load_model_weights
from fineclip.models.prompts import prompt_embeddings

log = logging.getLogger(__name__)


def load_backbone(cfg: DictConfig) -> FineCLIPModel:
    """The CLIP model at the detector's input size: a fineclip training checkpoint (its saved model config),
    another weights file read into ``cfg.model``, or ``cfg.model`` with its own ``model.checkpoint``."""
    path = cfg.backbone.checkpoint
    if path and Path(path).is_file():
        state = load_checkpoint(path)
        if isinstance(state, dict) and "config" in state and "model" in state:
            saved = state["config"]["model"]
            if saved.get("name") != cfg.model.name:
                raise ConfigError(f"backbone.checkpoint={path} holds a {saved.get('name')} tower, the detector is "
                                  f"configured for {cfg.model.name} (its taps {list(cfg.backbone.taps)} and input size "
                                  f"follow it): choose the matching +detect= config or model=")
            model = instantiate(OmegaConf.create({**saved, "checkpoint": None}))
            load_model_weights(model, state["model"], path)
        else:
            model = instantiate(cfg.model, checkpoint=path)
    elif path:
        raise CheckpointError(f"backbone.checkpoint={path}: file not found")
    else:
        model = instantiate(cfg.model)
    size = int(cfg.data.image_size)
    return (model if model.image_size[0] == size else at_size(model, size)).requires_grad_(False).eval()


@torch.no_grad()
def class_text_embeddings(model: FineCLIPModel, names: tuple[str, ...], templates) -> torch.Tensor:
    """(C + 1, D): "background" then each class, each the normalised mean over its prompts (ViLD's 63 by
    default, with their "This is " rule; or ``templates``)."""
    classes = ["background", *names]
    prompts = [vild_prompts(n) if not templates else [t.format(n) for t in templates] for n in classes]
    return prompt_embeddings(model.encode_text, prompts).cpu()


def build(cfg: DictConfig, device: torch.device) -> tuple[OVFasterRCNN, OVSplit]:
    names = [None if cfg.data[k] is None else tuple(cfg.data[k]) for k in ("base", "novel")]
    split = read_split(cfg.data.val_ann, *names)
    model = load_backbone(cfg).to(device)
    embeddings = class_text_embeddings(model, split.names, cfg.detector.get("templates"))
    detector = build_detector(model, embeddings, split.class_weight(cfg.detector.background_weight),
                              split.novel_mask, cfg.detector)
    return detector.to(device), split


def learning_rate(cfg: DictConfig, iteration: int, epoch: int) -> float:
    lr = cfg.optim.lr * cfg.data.batch_size / 64
    lr *= 0.1 ** sum(epoch >= e for e in cfg.optim.lr_steps)
    if iteration < cfg.optim.warmup_iters:
        ratio = cfg.optim.warmup_ratio
        lr *= ratio + (1 - ratio) * iteration / cfg.optim.warmup_iters
    return lr


def epoch_order(size: int, seed: int, epoch: int, dist_info: DistInfo, per_rank: int) -> list[int]:
    """This rank's indices of the epoch: one permutation per (seed, epoch), cut to whole global batches."""
    order = np.random.default_rng((seed, epoch)).permutation(size)
    steps = size // (per_rank * dist_info.world_size)
    if steps == 0:
        raise ConfigError(f"{size} training images are fewer than one batch of {per_rank} x {dist_info.world_size}")
    order = order[: steps * per_rank * dist_info.world_size].reshape(steps, dist_info.world_size, per_rank)
    return order[:, dist_info.rank].reshape(-1).tolist()


def train(cfg: DictConfig, run_dir: Path, dist_info: DistInfo, device: torch.device) -> dict:
    """Train the detector's heads; every ``checkpoint_every`` steps and at each epoch's end the trainable
    weights, the optimiser and the position (epoch, steps done in it) go to ``checkpoints/``. A resumed run
    continues from the newest readable one and takes the steps the uninterrupted run would have taken."""
    detector, split = build(cfg, device)
    if dist_info.enabled:
        detector = sync_batchnorm(detector, device)
    per_rank = cfg.data.batch_size // dist_info.world_size
    if per_rank * dist_info.world_size != cfg.data.batch_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split over {dist_info.world_size} ranks")
    train_set = OVDetectionSet(cfg.data.train_ann, cfg.data.train_image_root, split, cfg.data.image_size, train=True,
                               seed=cfg.seed, scale_range=tuple(cfg.data.scale_range),
                               masks=bool(cfg.detector.get("masks")))
    steps = len(epoch_order(len(train_set), cfg.seed, 0, dist_info, per_rank)) // per_rank
    if cfg.optim.warmup_iters >= steps * cfg.epochs:
        raise ConfigError(f"optim.warmup_iters={cfg.optim.warmup_iters} is not shorter than the run "
                          f"({cfg.epochs} epochs of {steps} steps)")
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(0.9, 0.999), weight_decay=cfg.optim.weight_decay)
    folder = run_dir / "checkpoints"
    start_epoch, done = 0, 0  # the epoch to run and the steps of it already taken
    found = load_latest_checkpoint(folder) if cfg.resume else None
    if found:
        path, state = found
        detector.load_state_dict(state["detector"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step = state.get("step", steps)  # checkpoints written before mid-epoch saving hold finished epochs only
        start_epoch, done = (state["epoch"] + 1, 0) if step >= steps else (state["epoch"], step)
        log.info("resumed from %s (epoch %d, step %d of %d)", path, state["epoch"], step, steps)
    model = DistributedDataParallel(detector) if dist_info.enabled else detector
    logger = MetricsLogger(run_dir, tensorboard=cfg.tensorboard) if dist_info.is_main else None

    def save(epoch: int, step: int) -> None:
        if dist_info.is_main:
            save_step_checkpoint({"detector": detector.trainable_state_dict(), "optimizer": optimizer.state_dict(),
                                  "epoch": epoch, "step": step, "config": OmegaConf.to_container(cfg, resolve=True)},
                                 folder, epoch * steps + step)

    for epoch in range(start_epoch, cfg.epochs):
        train_set.set_epoch(epoch)
        order = epoch_order(len(train_set), cfg.seed, epoch, dist_info, per_rank)[done * per_rank:]
        loader = DataLoader(torch.utils.data.Subset(train_set, order), batch_size=per_rank,
                            num_workers=cfg.data.num_workers, collate_fn=collate)
        model.train()
        progress = tqdm(loader, desc=f"detect epoch {epoch}", initial=done, total=steps,
                        disable=not (cfg.progress and dist_info.is_main))
        for step, (images, targets) in enumerate(progress, start=done):
            iteration = epoch * steps + step
            lr = learning_rate(cfg, iteration, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = [im.to(device).float() / 255 for im in images]
            targets = [{"seed": t["seed"], **{k: t[k].to(device) for k in ("boxes", "labels", "masks") if k in t}}
                       for t in targets]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"non-finite detection loss at epoch {epoch} step {step}: "
                                         f"{ {k: v.item() for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            progress.set_postfix(loss=f"{loss.item():.3f}")
            if logger and (iteration + 1) % cfg.log_every == 0:
                logger.log(iteration + 1, {"detect/loss": loss.item(), "lr": lr,
                                           **{f"detect/{k}": v.item() for k, v in losses.items()}}, epoch=epoch)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                save(epoch, step + 1)
        save(epoch, steps)
        done = 0
    if not dist_info.is_main:
        return {}
    metrics = evaluate(cfg, detector, split, device)
    logger.log(cfg.epochs * steps, metrics)
    logger.close()
    return metrics


@torch.no_grad()
def evaluate(cfg: DictConfig, detector: OVFasterRCNN, split: OVSplit, device: torch.device) -> dict:
    """OV-COCO (and the synthetic split): box AP50 per class, averaged over novel / base / all classes.
    OV-LVIS (a mask head): the federated LVIS mask AP and APr / APc / APf, and the same for boxes."""
    masks = detector.roi_heads.has_mask()
    val_set = OVDetectionSet(cfg.data.val_ann, cfg.data.image_root, split, cfg.data.image_size, train=False)
    loader = DataLoader(val_set, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                        collate_fn=collate)
    detector.eval()
    results = []
    for images, targets in tqdm(loader, desc="detect eval", disable=not cfg.progress):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs = detector([im.to(device).float() / 255 for im in images])
        for out, target in zip(outputs, targets, strict=True):
            results += detection_records(out, target, split, val_set.coco.imgs[target["image_id"]] if masks else None)
    gt = json.loads(Path(cfg.data.val_ann).read_text())
    metrics = {"detect/protocol": cfg.protocol, "detect/images": float(len(val_set))}
    if masks:
        for kind, name in (("segm", "mask"), ("bbox", "box")):
            metrics.update({f"detect/{name}_{k.lower()}": v for k, v in lvis_evaluate(gt, results, kind).items()})
        return metrics
    per_class = ap50_per_class(gt, results, list(split.category_ids))
    metrics.update(split_ap50(per_class, split))
    named = zip(split.names, split.category_ids, strict=True)
    metrics.update({f"detect/ap50/{n}": per_class.get(c, float("nan")) for n, c in named})
    return metrics


def detection_records(out: dict, target: dict, split: OVSplit, image: dict | None = None) -> list[dict]:
    """One image's detections in COCO's result format, in the file's pixels; with ``image`` (its record:
    height, width) also each box's mask pasted into the image and thresholded at 0.5, as RLE."""
    boxes = out["boxes"].float().cpu() / target["scale"]
    records = [{"image_id": target["image_id"], "category_id": split.category_ids[label - 1],
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score}
               for box, score, label in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist(),
                                            strict=True)]
    if image is not None and records:
        pasted = paste_masks_in_image(out["masks"].float().cpu(), boxes, (image["height"], image["width"]), padding=1)
        binary = np.asfortranarray((pasted[:, 0] >= 0.5).numpy().astype(np.uint8).transpose(1, 2, 0))
        for record, rle in zip(records, mask_utils.encode(binary), strict=True):
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    return records


def load_detector(cfg: DictConfig, path: str, device: torch.device) -> tuple[OVFasterRCNN, OVSplit]:
    detector, split = build(cfg, device)
    state = load_checkpoint(path)
    if "detector" not in state:
        raise CheckpointError(f"detector={path} is not a fineclip.detect checkpoint (no 'detector' entry)")
    missing, unexpected = detector.load_state_dict(state["detector"], strict=False)
    missing = [k for k in missing if not k.startswith("backbone.vit.")]
    if missing or unexpected:
        raise CheckpointError(f"detector={path} does not fit the configured detector: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return detector, split
