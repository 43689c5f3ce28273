"""Box classification and retrieval over a data set in the fineclip schema, in one batched pass.

Every result records the protocol that made it (``fineclip.eval.protocols``) and what it scored:
``box/protocol``, ``box/images``, ``box/boxes``, ``retrieval/protocol``, ``retrieval/images``,
``retrieval/t2i_queries`` (captions), ``missing_images`` (files skipped with ``eval.allow_missing``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.eval.evaluators import Evaluator
from fineclip.eval.metrics import box_accuracy, retrieval_recall
from fineclip.eval.protocols import (
    BOX_PROTOCOLS,
    BoxProtocol,
    box_protocol,
    evaluation_source,
    evaluation_templates,
    retrieval_protocol,
    vild_prompts,
)
from fineclip.models import FineCLIPModel
from fineclip.models.prompts import DEFAULT_TEMPLATES, cached_class_embeddings, template_prompts


def mask_pool(dense: torch.Tensor, masks: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """Normalised mean of the (normalised) dense tokens inside each mask: (M, D).

    dense (B, D, h, w); masks (M, h, w) bool on the same grid; image_index (M,) of each mask.
    """
    weights = masks.to(dense.dtype)
    summed = torch.einsum("mhw,mdhw->md", weights, dense[image_index])
    return F.normalize(summed / weights.sum(dim=(1, 2)).clamp(min=1e-12)[:, None], dim=-1)


@torch.no_grad()
def extract_features(
    model: FineCLIPModel, dataset: RegionCaptionDataset, batch_size: int = 64, num_workers: int = 0,
    device: str | torch.device = "cpu", progress: bool = True, crop_boxes: bool = False,
    crop_model: FineCLIPModel | None = None,
) -> dict[str, torch.Tensor]:
    """Global image embeddings, pooled box features with labels, caption embeddings; the global
    embeddings of box crops (``crops`` from the data set, or with ``crop_boxes`` the model's own
    1.5x RoI crops: what L_SD distils from); mask-pooled box features when the data set gives masks.
    ``crop_model`` encodes the data set's crops (the same weights at the crops' size)."""
    num_workers = min(num_workers, os.cpu_count() or 1)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_regions
    )
    crop_model = crop_model or model
    out = {k: [] for k in ("image_emb", "box_emb", "crop_emb", "maskpool_emb", "box_category_ids", "box_image",
                           "boxes")}
    captions, text_to_image, offset = [], [], 0
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        pixels = model.normalize_pixels(batch["images"].to(device, non_blocking=True))
        emb, dense = model.encode_image_dense(pixels)
        out["image_emb"].append(emb.float().cpu())
        if len(batch["regions"]):
            regions = batch["regions"].to(device)
            out["box_emb"].append(model.pool_regions(dense, regions).float().cpu())
            if "crops" in batch:
                crops = crop_model.normalize_pixels(batch["crops"].to(device))
                out["crop_emb"].append(crop_model.encode_image(crops).float().cpu())
            elif crop_boxes:
                out["crop_emb"].append(model.encode_crops(pixels, regions).float().cpu())
            if "masks" in batch:
                index = regions[:, 0].long()
                out["maskpool_emb"].append(mask_pool(dense, batch["masks"].to(device), index).float().cpu())
            out["box_category_ids"].append(batch["category_ids"])
            out["box_image"].append(batch["regions"][:, 0].long() + offset)
            out["boxes"].append(batch["regions"][:, 1:].float())
        for i, caps in enumerate(batch["captions"]):
            captions += caps
            text_to_image += [offset + i] * len(caps)
        offset += len(batch["images"])
    dim = out["image_emb"][0].shape[1]
    chunks = [model.encode_text(captions[s : s + 256]).float().cpu() for s in range(0, len(captions), 256)]
    no_index = torch.zeros(0, dtype=torch.long)
    empty = {"box_category_ids": no_index, "box_image": no_index, "boxes": torch.zeros(0, 4)}  # else (0, dim)
    feats = {k: torch.cat(v) if v else empty.get(k, torch.zeros(0, dim)) for k, v in out.items()}
    feats["text_emb"] = torch.cat(chunks) if chunks else torch.zeros(0, dim)
    feats["text_to_image"] = torch.tensor(text_to_image, dtype=torch.long)
    return feats


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
    box: BoxProtocol = BOX_PROTOCOLS["box_default"],
    retrieval: str = "retrieval_default",
    crop_model: FineCLIPModel | None = None,
) -> dict[str, float | str]:
    """Returns {"box/top1", "box/top5", "box/overall_top1", ..., "retrieval/i2t_r1", ...} with the
    protocol names and counts.

    Box metrics need boxes with categories, retrieval needs captions; a data set with only one of
    the two gives only those metrics. ``box`` is the box protocol: its prompts (``templates`` for
    box_default, the 63 ViLD prompts otherwise), metric (mean per class, or per box for box_fg) and
    extras. With stuff categories (COCO panoptic), ``box/thing_top{k}`` and ``box/stuff_top{k}``
    are the per-class means over the thing and the stuff classes (each box still classified among
    all classes). ``crop_boxes`` adds ``box/crop_top{k}``: the same classification with the global
    embedding of each box's (1.5x enlarged) crop, i.e. the accuracy of the L_SD teacher.
    """
    if dataset.train:
        raise ValueError("evaluate() needs a dataset built with train=False (all captions, all boxes)")
    was_training = model.training
    model.eval()
    try:
        feats = extract_features(model, dataset, batch_size, num_workers, device, progress, crop_boxes, crop_model)
        metrics: dict[str, float | str] = {}
        if len(feats["box_category_ids"]) and dataset.categories:
            metrics.update(box_metrics(model, dataset, feats, templates, class_cache_dir, box))
        if len(feats["text_emb"]):  # a box-only benchmark (e.g. COCO panoptic) has no captions
            recall = retrieval_recall(feats["image_emb"], feats["text_emb"], feats["text_to_image"])
            metrics.update({f"retrieval/{k}": v for k, v in recall.items()})
            metrics.update({"retrieval/protocol": retrieval, "retrieval/images": float(len(feats["image_emb"])),
                            "retrieval/t2i_queries": float(len(feats["text_emb"]))})
        if dataset.missing:
            metrics["missing_images"] = float(len(dataset.missing))
    finally:
        model.train(was_training)
    return metrics


def _accuracies(prefix: str, logits: torch.Tensor, labels: torch.Tensor, per_box: bool) -> dict[str, float]:
    acc = box_accuracy(logits, labels, ks=(1, 5))
    if per_box:  # the headline metric is per-box accuracy; the per-class mean is kept apart
        return {f"{prefix}top1": acc["overall_top1"], f"{prefix}top5": acc["overall_top5"],
                f"{prefix}mean_top1": acc["top1"], f"{prefix}mean_top5": acc["top5"]}
    return {f"{prefix}{k}": v for k, v in acc.items()}


def class_embeddings_and_labels(model, dataset, feats, templates, cache_dir,
                                protocol: BoxProtocol) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(class embeddings (C, D) as the protocol prompts them, each box's class index (M,), class names)."""
    cat_ids = sorted(dataset.categories)
    names = [dataset.categories[c] for c in cat_ids]
    prompts = template_prompts(names, templates) if protocol.prompts == "data" else [vild_prompts(n) for n in names]
    encode = lambda texts: model.encode_text(texts).float().cpu()  # noqa: E731
    classes = cached_class_embeddings(model, encode, prompts, cache_dir)
    index_of = {c: i for i, c in enumerate(cat_ids)}
    labels = torch.tensor([index_of[int(c)] for c in feats["box_category_ids"]], dtype=torch.long)
    return classes, labels, names


def box_metrics(model, dataset, feats, templates, cache_dir, protocol: BoxProtocol) -> dict[str, float | str]:
    classes, labels, _ = class_embeddings_and_labels(model, dataset, feats, templates, cache_dir, protocol)
    box_cats = feats["box_category_ids"]
    is_stuff = torch.tensor([int(c) in dataset.stuff_ids for c in box_cats], dtype=torch.bool)
    metrics: dict[str, float | str] = {"box/protocol": protocol.name, "box/images": float(len(feats["image_emb"])),
                                       "box/boxes": float(len(labels))}
    kinds = {"": feats["box_emb"], "crop_": feats["crop_emb"], "maskpool_": feats["maskpool_emb"]}
    for kind, emb in kinds.items():
        if not len(emb):
            continue
        logits = emb @ classes.t()
        if protocol.report == "pooled":
            metrics.update(_accuracies(f"box/{kind}", logits, labels, protocol.per_box))
        if dataset.stuff_ids:
            for split, mask in (("thing", ~is_stuff), ("stuff", is_stuff)):
                if mask.any():
                    acc = _accuracies(f"box/{kind}{split}_", logits[mask], labels[mask], protocol.per_box)
                    metrics.update({k: v for k, v in acc.items() if k.endswith(("_top1", "_top5"))
                                    and "overall" not in k and "mean" not in k})
                    metrics[f"box/{kind}{split}_boxes"] = float(mask.sum())
    return metrics


class BoxRetrieval(Evaluator):
    """``evaluate`` on the evaluation set, with the protocol, templates, batch size, workers and class
    cache of a composed config. Templates (box_default): ``evaluation_templates(cfg)``."""

    name = "box_retrieval"

    def __call__(self, model, cfg: DictConfig, device, dataset=None, crop_model=None, progress: bool = True) -> dict:
        if dataset is None:
            return {}
        cache = cfg.eval.get("class_cache_dir") if model.freeze_text else None  # a trained text tower changes
        return evaluate(
            model, dataset, templates=evaluation_templates(cfg), batch_size=cfg.eval.batch_size,
            num_workers=evaluation_source(cfg).get("num_workers", 0), device=device, progress=progress,
            class_cache_dir=cache, crop_boxes=bool(cfg.eval.get("crop_boxes", False)), box=box_protocol(cfg),
            retrieval=retrieval_protocol(cfg).name, crop_model=crop_model,
        )

    def format(self, metrics: dict) -> list[str]:
        lines = []
        if "box/protocol" in metrics:
            lines.append(f"box classification [{metrics['box/protocol']}]: {metrics['box/boxes']:.0f} boxes on "
                         f"{metrics['box/images']:.0f} images")
        for kind, label in (("", "dense RoI"), ("crop_", "crops (global embedding)"), ("maskpool_", "mask pooling")):
            if f"box/{kind}top1" in metrics:
                top1, top5 = metrics[f"box/{kind}top1"], metrics[f"box/{kind}top5"]
                overall = metrics.get(f"box/{kind}overall_top1")
                lines.append(f"  {label:26s} top-1 {top1:.1f}   top-5 {top5:.1f}"
                             + (f"   (overall top-1 {overall:.1f})" if overall is not None else ""))
            split = [f"{s} top-1 {metrics[f'box/{kind}{s}_top1']:.1f} top-5 {metrics[f'box/{kind}{s}_top5']:.1f}"
                     for s in ("thing", "stuff") if f"box/{kind}{s}_top1" in metrics]
            if split:
                lines.append(f"  {label:26s} " + "   ".join(split))
        if "retrieval/i2t_r1" in metrics:
            lines.append(f"retrieval [{metrics['retrieval/protocol']}]: {metrics['retrieval/images']:.0f} images, "
                         f"{metrics['retrieval/t2i_queries']:.0f} captions")
            lines.append(
                "  I2T R@1/5/10 {:.1f} / {:.1f} / {:.1f}   T2I R@1/5/10 {:.1f} / {:.1f} / {:.1f}".format(
                    *(metrics[f"retrieval/{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
                )
            )
        if metrics.get("missing_images"):
            lines.append(f"(eval.allow_missing: {metrics['missing_images']:.0f} missing image(s) not scored)")
        return lines
