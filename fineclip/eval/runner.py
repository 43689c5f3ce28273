"""Box classification and retrieval over a dataset in the fineclip schema, in one batched pass.

Every result records the protocol that made it (``fineclip.eval.protocols``) and what it scored:
``box/protocol``, ``box/images``, ``box/boxes``, ``retrieval/protocol``, ``retrieval/images``,
``retrieval/t2i_queries`` (captions), ``missing_images`` (files skipped with ``eval.allow_missing``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.data.synthetic import prepare_synthetic
from fineclip.eval.classification import zero_shot_classification
from fineclip.eval.metrics import box_accuracy, retrieval_recall
from fineclip.eval.prompts import DEFAULT_TEMPLATES, cached_class_embeddings, template_prompts
from fineclip.eval.protocols import (
    BOX_PROTOCOLS,
    BoxProtocol,
    ProtocolError,
    RetrievalProtocol,
    box_protocol,
    evaluation_source,
    retrieval_protocol,
    vild_prompts,
)
from fineclip.eval.segmentation import segmentation_metrics
from fineclip.models import FineCLIPModel


class MissingImagesError(ProtocolError):
    """Benchmark images that are not on disk: evaluating without them would change the benchmark."""


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


def build_eval_set(
    cfg: DictConfig, image_size: int, patch_size: int | None = None, crop_size: int | None = None
) -> RegionCaptionDataset | None:
    """The evaluation data set of a composed config (None if it has no ``val``), read and resized as
    its box/retrieval protocol says: images at ``image_size``, mask-pooling masks on the grid of
    ``patch_size``, box crops at ``crop_size`` (default ``image_size``). Missing image files stop
    the evaluation with their list, unless ``eval.allow_missing=true`` (then they are skipped and
    counted in the metrics)."""
    source = evaluation_source(cfg)
    if source.get("val") is None:
        return None
    prepare_synthetic(source)
    box, retrieval = box_protocol(cfg), retrieval_protocol(cfg)
    overrides = {"image_size": image_size}
    target = source.val.get("_target_", "")
    if target.endswith("from_panoptic"):
        overrides["reference_boxes"] = box.reference_panoptic_boxes
    if target.endswith(("from_coco_captions", "from_karpathy")):
        overrides["max_captions"] = retrieval.max_captions
    dataset: RegionCaptionDataset = instantiate(source.val, **overrides)
    if dataset.missing and not cfg.eval.get("allow_missing", False):
        shown = "\n".join(f"  {p}" for p in dataset.missing[:20])
        more = f"\n  ... and {len(dataset.missing) - 20} more" if len(dataset.missing) > 20 else ""
        raise MissingImagesError(
            f"{len(dataset.missing)} image(s) of the benchmark are missing; without them the numbers would not be "
            f"the benchmark's:\n{shown}{more}\nrestore them, or set eval.allow_missing=true to score the rest "
            "(the count is recorded as missing_images)"
        )
    configure_protocol(dataset, box, retrieval, image_size, patch_size, crop_size or image_size)
    return dataset


def configure_protocol(dataset: RegionCaptionDataset, box: BoxProtocol, retrieval: RetrievalProtocol,
                       image_size: int, patch_size: int | None, crop_size: int) -> None:
    """Set the data set's resizing and extras (crops, masks) as the protocols say."""
    if dataset.categories:
        dataset.resize, dataset.interpolation = box.resize, box.interpolation
        if "crops" in box.extras:
            dataset.crop_mode, dataset.crop_size = box.crop, crop_size
        if "maskpool" in box.extras and patch_size:
            dataset.mask_grid = (image_size // patch_size, image_size // patch_size)
    else:
        dataset.interpolation = retrieval.interpolation


def describe_eval_set(cfg: DictConfig) -> str:
    val = evaluation_source(cfg).val
    for key in ("ann_file", "panoptic_json", "captions_json", "karpathy_json"):
        if val.get(key):
            return str(val[key])
    return str(val.get("_target_"))


def segmentation_from_config(model: FineCLIPModel, cfg: DictConfig, device) -> dict[str, float]:
    """Zero-shot and linear-probe mIoU on the evaluated data config's ``segmentation`` section."""
    source = evaluation_source(cfg)
    seg_cfg = source.get("segmentation")
    if not seg_cfg:
        raise ProtocolError("eval.segmentation=true needs a data config with a `segmentation` section "
                            "(data=synthetic and data=ade20k have one)")
    templates = cfg.eval.get("templates") or source.get("templates") or DEFAULT_TEMPLATES
    return segmentation_metrics(model, seg_cfg, list(templates), cfg.eval.batch_size, device,
                                probe_steps=int(cfg.eval.get("probe_steps", 500)))


def evaluate_from_config(
    model: FineCLIPModel, dataset: RegionCaptionDataset, cfg: DictConfig, device, progress: bool = True,
    crop_model: FineCLIPModel | None = None,
) -> dict[str, float | str]:
    """``evaluate`` with the protocol, templates, batch size, workers and class cache of a composed
    config. Templates (box_default): ``eval.templates``, else those of the evaluated data config,
    else ``DEFAULT_TEMPLATES``."""
    templates = cfg.eval.get("templates") or evaluation_source(cfg).get("templates") or DEFAULT_TEMPLATES
    cache = cfg.eval.get("class_cache_dir") if model.freeze_text else None  # a trained text tower changes
    metrics = evaluate(
        model, dataset, templates=list(templates), batch_size=cfg.eval.batch_size,
        num_workers=evaluation_source(cfg).get("num_workers", 0), device=device, progress=progress,
        class_cache_dir=cache, crop_boxes=bool(cfg.eval.get("crop_boxes", False)), box=box_protocol(cfg),
        retrieval=retrieval_protocol(cfg).name, crop_model=crop_model,
    )
    if cfg.eval.get("segmentation"):
        metrics.update(segmentation_from_config(model, cfg, device))
    if cfg.eval.get("zeroshot_root"):
        zeroshot_templates = list(cfg.eval.get("zeroshot_templates") or DEFAULT_TEMPLATES)
        metrics.update(zero_shot_classification(model, cfg.eval.zeroshot_root, zeroshot_templates,
                                                cfg.eval.batch_size, device))
    return metrics


def format_metrics(metrics: dict) -> str:
    """A short human-readable block of the headline numbers, with the protocol and counts."""
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
    if "seg/zero_shot_miou" in metrics:
        probe = metrics.get("seg/linear_probe_miou")
        lines.append(f"segmentation: {metrics['seg/images']:.0f} images   zero-shot mIoU "
                     f"{metrics['seg/zero_shot_miou']:.1f}"
                     + (f"   linear-probe mIoU {probe:.1f}" if probe is not None else ""))
    if "zeroshot/top1" in metrics:
        lines.append(f"zero-shot classification: {metrics['zeroshot/images']:.0f} images, "
                     f"{metrics['zeroshot/classes']:.0f} classes   top-1 {metrics['zeroshot/top1']:.1f}   "
                     f"top-5 {metrics['zeroshot/top5']:.1f}")
    if metrics.get("missing_images"):
        lines.append(f"(eval.allow_missing: {metrics['missing_images']:.0f} missing image(s) not scored)")
    return "\n".join(lines)
