"""Box classification and retrieval over a dataset in the fineclip schema, in one batched pass."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from fineclip.config_checks import require_data_root
from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.data.synthetic import prepare_synthetic
from fineclip.eval.metrics import box_accuracy, retrieval_recall
from fineclip.eval.prompts import DEFAULT_TEMPLATES, cached_class_embeddings
from fineclip.models import FineCLIPModel


@torch.no_grad()
def extract_features(
    model: FineCLIPModel, dataset: RegionCaptionDataset, batch_size: int = 64, num_workers: int = 0,
    device: str | torch.device = "cpu", progress: bool = True, crop_boxes: bool = False,
) -> dict[str, torch.Tensor]:
    """Global image embeddings, pooled box features with labels, caption embeddings, and with
    ``crop_boxes`` the global embeddings of the box crops (what L_SD distils from)."""
    num_workers = min(num_workers, os.cpu_count() or 1)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_regions
    )
    image_emb, box_emb, crop_emb, box_labels, captions, text_to_image = [], [], [], [], [], []
    offset = 0
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        pixels = model.normalize_pixels(batch["images"].to(device, non_blocking=True))
        emb, dense = model.encode_image_dense(pixels)
        image_emb.append(emb.float().cpu())
        if len(batch["regions"]):
            regions = batch["regions"].to(device)
            box_emb.append(model.pool_regions(dense, regions).float().cpu())
            if crop_boxes:
                crop_emb.append(model.encode_crops(pixels, regions).float().cpu())
            box_labels.append(batch["category_ids"])
        for i, caps in enumerate(batch["captions"]):
            captions += caps
            text_to_image += [offset + i] * len(caps)
        offset += len(batch["images"])
    chunks = [model.encode_text(captions[s : s + 256]).float().cpu() for s in range(0, len(captions), 256)]
    text_emb = torch.cat(chunks) if chunks else torch.zeros(0, image_emb[0].shape[1])
    return {
        "image_emb": torch.cat(image_emb),
        "box_emb": torch.cat(box_emb) if box_emb else torch.zeros(0, text_emb.shape[1]),
        "box_category_ids": torch.cat(box_labels) if box_labels else torch.zeros(0, dtype=torch.long),
        "text_emb": text_emb,
        "crop_emb": torch.cat(crop_emb) if crop_emb else torch.zeros(0, text_emb.shape[1]),
        "text_to_image": torch.tensor(text_to_image),
    }


@torch.no_grad()
def evaluate(
    model: FineCLIPModel,
    dataset: RegionCaptionDataset,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    class_cache_dir: str | None = None,
    crop_boxes: bool = False,
) -> dict[str, float]:
    """Returns {"box/top1", "box/top5", "box/overall_top1", ..., "retrieval/i2t_r1", ...}.

    Box metrics need boxes with categories, retrieval needs captions; a data set with only one of
    the two gives only those metrics. With stuff categories (COCO panoptic), ``box/thing_top{k}``
    and ``box/stuff_top{k}`` are the per-class means over the thing and the stuff classes (each
    box still classified among all classes). Class embeddings are cached in ``class_cache_dir``.
    ``crop_boxes`` adds ``box/crop_top{k}``: the same classification with the global embedding of
    each box's (1.5x enlarged) crop instead of its pooled dense feature, i.e. the accuracy of the
    L_SD teacher.
    """
    if dataset.train:
        raise ValueError("evaluate() needs a dataset built with train=False (all captions, all boxes)")
    was_training = model.training
    model.eval()
    try:
        feats = extract_features(model, dataset, batch_size, num_workers, device, progress, crop_boxes)
        metrics = {}
        if len(feats["box_category_ids"]) and dataset.categories:
            metrics.update(_box_metrics(model, dataset, feats, templates, class_cache_dir))
        if len(feats["text_emb"]):  # a box-only benchmark (e.g. COCO panoptic) has no captions
            recall = retrieval_recall(feats["image_emb"], feats["text_emb"], feats["text_to_image"])
            metrics.update({f"retrieval/{k}": v for k, v in recall.items()})
    finally:
        model.train(was_training)
    return metrics


def _box_metrics(model, dataset, feats, templates, cache_dir) -> dict[str, float]:
    cat_ids = sorted(dataset.categories)
    names = [dataset.categories[c] for c in cat_ids]
    encode = lambda texts: model.encode_text(texts).float().cpu()  # noqa: E731
    classes = cached_class_embeddings(model, encode, names, templates, cache_dir)
    index_of = {c: i for i, c in enumerate(cat_ids)}
    box_cats = feats["box_category_ids"]
    labels = torch.tensor([index_of[int(c)] for c in box_cats], dtype=torch.long)
    logits = feats["box_emb"] @ classes.t()
    metrics = {f"box/{k}": v for k, v in box_accuracy(logits, labels, ks=(1, 5)).items()}
    if len(feats["crop_emb"]):
        crop = box_accuracy(feats["crop_emb"] @ classes.t(), labels, ks=(1, 5))
        metrics.update({f"box/crop_top{k}": crop[f"top{k}"] for k in (1, 5)})
    if dataset.stuff_ids:
        is_stuff = torch.tensor([int(c) in dataset.stuff_ids for c in box_cats], dtype=torch.bool)
        for kind, mask in (("thing", ~is_stuff), ("stuff", is_stuff)):
            if mask.any():
                split = box_accuracy(logits[mask], labels[mask], ks=(1, 5))
                metrics.update({f"box/{kind}_top{k}": split[f"top{k}"] for k in (1, 5)})
    return metrics


def evaluation_source(cfg: DictConfig) -> DictConfig:
    """The data config that is evaluated: ``eval.benchmark`` if set (any data config, e.g.
    ``+data@eval.benchmark=coco_panoptic``), else ``data`` (its ``val`` split)."""
    return cfg.eval.get("benchmark") or cfg.data


def build_eval_set(cfg: DictConfig, image_size: int) -> RegionCaptionDataset | None:
    """The evaluation data set of a composed config (None if it has no ``val``)."""
    source = evaluation_source(cfg)
    if source.get("val") is None:
        return None
    require_data_root(source, "eval.benchmark" if cfg.eval.get("benchmark") else "data")
    prepare_synthetic(source)
    return instantiate(source.val, image_size=image_size)


def describe_eval_set(cfg: DictConfig) -> str:
    val = evaluation_source(cfg).val
    for key in ("ann_file", "panoptic_json", "captions_json", "karpathy_json"):
        if val.get(key):
            return str(val[key])
    return str(val.get("_target_"))


def evaluate_from_config(
    model: FineCLIPModel, dataset: RegionCaptionDataset, cfg: DictConfig, device, progress: bool = True
) -> dict[str, float]:
    """``evaluate`` with the templates, batch size, workers and class cache of a composed config.
    Templates: ``eval.templates``, else those of the evaluated data config, else ``DEFAULT_TEMPLATES``."""
    templates = cfg.eval.get("templates") or evaluation_source(cfg).get("templates") or DEFAULT_TEMPLATES
    cache = cfg.eval.get("class_cache_dir") if model.freeze_text else None  # a trained text tower changes
    return evaluate(
        model, dataset, templates=list(templates), batch_size=cfg.eval.batch_size,
        num_workers=evaluation_source(cfg).get("num_workers", 0), device=device, progress=progress,
        class_cache_dir=cache, crop_boxes=bool(cfg.eval.get("crop_boxes", False)),
    )


def format_metrics(metrics: dict[str, float]) -> str:
    """A short human-readable block of the headline numbers."""
    lines = []
    if "box/top1" in metrics:
        lines.append(
            f"box classification   top-1 {metrics['box/top1']:.1f}   top-5 {metrics['box/top5']:.1f}"
            f"   (overall top-1 {metrics['box/overall_top1']:.1f})"
        )
    if "box/crop_top1" in metrics:
        lines.append(f"box crops (global embedding of each box's crop)   top-1 {metrics['box/crop_top1']:.1f}")
    if "box/thing_top1" in metrics or "box/stuff_top1" in metrics:
        lines.append("   ".join(
            f"{kind} top-1 {metrics[f'box/{kind}_top1']:.1f} top-5 {metrics[f'box/{kind}_top5']:.1f}"
            for kind in ("thing", "stuff") if f"box/{kind}_top1" in metrics
        ))
    if "retrieval/i2t_r1" not in metrics:
        return "\n".join(lines)
    lines.append(
        "retrieval  I2T R@1/5/10 {:.1f} / {:.1f} / {:.1f}   T2I R@1/5/10 {:.1f} / {:.1f} / {:.1f}".format(
            *(metrics[f"retrieval/{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
        )
    )
    return "\n".join(lines)
