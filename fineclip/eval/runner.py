"""Box classification and retrieval over a dataset in the fineclip schema, in one batched pass."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.eval.metrics import box_accuracy, retrieval_recall
from fineclip.eval.prompts import DEFAULT_TEMPLATES, class_embeddings
from fineclip.models import FineCLIPModel


@torch.no_grad()
def extract_features(
    model: FineCLIPModel, dataset: RegionCaptionDataset, batch_size: int = 64, num_workers: int = 0,
    device: str | torch.device = "cpu", progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Global image embeddings, pooled box features with labels, and caption embeddings."""
    num_workers = min(num_workers, os.cpu_count() or 1)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_regions
    )
    image_emb, box_emb, box_labels, captions, text_to_image = [], [], [], [], []
    offset = 0
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        pixels = model.normalize_pixels(batch["images"].to(device, non_blocking=True))
        emb, dense = model.encode_image_dense(pixels)
        image_emb.append(emb.float().cpu())
        if len(batch["regions"]):
            box_emb.append(model.pool_regions(dense, batch["regions"].to(device)).float().cpu())
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
) -> dict[str, float]:
    """Returns {"box/top1", "box/top5", "box/overall_top1", ..., "retrieval/i2t_r1", ...}."""
    if dataset.train:
        raise ValueError("evaluate() needs a dataset built with train=False (all captions, all boxes)")
    was_training = model.training
    model.eval()
    try:
        feats = extract_features(model, dataset, batch_size, num_workers, device, progress)
        cat_ids = sorted(dataset.categories)
        names = [dataset.categories[c] for c in cat_ids]
        classes = class_embeddings(lambda texts: model.encode_text(texts).float().cpu(), names, templates)
        index_of = {c: i for i, c in enumerate(cat_ids)}
        labels = torch.tensor([index_of[int(c)] for c in feats["box_category_ids"]], dtype=torch.long)
        metrics = {}
        if len(labels):
            box = box_accuracy(feats["box_emb"] @ classes.t(), labels, ks=(1, 5))
            metrics.update({f"box/{k}": v for k, v in box.items()})
        if len(feats["text_emb"]):  # a box-only benchmark (e.g. COCO panoptic) has no captions
            recall = retrieval_recall(feats["image_emb"], feats["text_emb"], feats["text_to_image"])
            metrics.update({f"retrieval/{k}": v for k, v in recall.items()})
    finally:
        model.train(was_training)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """A short human-readable block of the headline numbers."""
    lines = []
    if "box/top1" in metrics:
        lines.append(
            f"box classification   top-1 {metrics['box/top1']:.1f}   top-5 {metrics['box/top5']:.1f}"
            f"   (overall top-1 {metrics['box/overall_top1']:.1f})"
        )
    if "retrieval/i2t_r1" not in metrics:
        return "\n".join(lines)
    lines.append(
        "retrieval  I2T R@1/5/10 {:.1f} / {:.1f} / {:.1f}   T2I R@1/5/10 {:.1f} / {:.1f} / {:.1f}".format(
            *(metrics[f"retrieval/{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
        )
    )
    return "\n".join(lines)
