"""LVIS's federated evaluation (the ``lvis`` package's ``LVISEval``, whose last release does not run on
numpy ≥ 1.24), for masks or boxes, verified against that package in the tests.

Federated: an image is judged only on the categories it is known to contain (its ground truth) or known not
to contain (``neg_category_ids``); a detection of any other category is dropped. An unmatched detection of a
category in the image's ``not_exhaustive_category_ids`` is ignored rather than counted false. Each image keeps
its 300 best detections over all categories. Per category and IoU threshold t ∈ {0.50, 0.55, …, 0.95}:
detections by score, greedy matching as COCO's, precision made monotone and read at the 101 recalls
0, 0.01, …, 1; AP = the mean over thresholds and recalls; APr / APc / APf = the mean AP over the rare /
common / frequent categories that have ground truth.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from pycocotools import mask as mask_utils

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALLS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 300


def _regions(anns: list[dict], kind: str) -> list:
    return [a["segmentation"] if kind == "segm" else a["bbox"] for a in anns]


def _to_rle(segmentation, height: int, width: int) -> dict:
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def _limit(detections: list[dict], max_dets: int) -> list[dict]:
    by_image = defaultdict(list)
    for d in detections:
        by_image[d["image_id"]].append(d)
    kept = []
    for dets in by_image.values():
        kept += sorted(dets, key=lambda d: -d["score"])[:max_dets]
    return kept


def _match(ious: np.ndarray, gt_ignore: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """COCO's greedy matching of score-sorted detections to ground truth (non-ignored ground truth first):
    (matched (D,) bool, matched to an ignored ground truth (D,) bool)."""
    num_dt, num_gt = ious.shape
    gt_taken = np.zeros(num_gt, bool)
    matched, ignored = np.zeros(num_dt, bool), np.zeros(num_dt, bool)
    for d in range(num_dt):
        best, best_iou = -1, min(threshold, 1 - 1e-10)
        for g in range(num_gt):
            if gt_taken[g]:
                continue
            if best > -1 and not gt_ignore[best] and gt_ignore[g]:
                break
            if ious[d, g] < best_iou:
                continue
            best, best_iou = g, ious[d, g]
        if best > -1:
            gt_taken[best], matched[d], ignored[d] = True, True, gt_ignore[best]
    return matched, ignored


def _average_precision(scores: np.ndarray, true: np.ndarray, false: np.ndarray, num_gt: int) -> float:
    order = np.argsort(-scores, kind="mergesort")
    tp, fp = np.cumsum(true[order]).astype(float), np.cumsum(false[order]).astype(float)
    recall = tp / num_gt
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1] if precision.size else precision
    at = np.searchsorted(recall, RECALLS, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in at]))


def lvis_evaluate(gt: dict, detections: list[dict], kind: str = "segm", max_dets: int = MAX_DETS) -> dict[str, float]:
    """{"AP", "APr", "APc", "APf"} in percent (NaN where a group has no category with ground truth).
    ``detections``: LVIS/COCO results (image_id, category_id, score, and ``segmentation`` RLE for ``segm`` or
    ``bbox`` x, y, w, h for ``bbox``); areas are all areas."""
    images = {im["id"]: im for im in gt["images"]}
    gts, dts = defaultdict(list), defaultdict(list)
    present = defaultdict(set)
    for a in gt["annotations"]:
        gts[a["image_id"], a["category_id"]].append(a)
        present[a["image_id"]].add(a["category_id"])
    for d in _limit([d for d in detections if d["image_id"] in images], max_dets):
        if d["category_id"] in present[d["image_id"]] or d["category_id"] in images[d["image_id"]]["neg_category_ids"]:
            dts[d["image_id"], d["category_id"]].append(d)
    per_category = {}
    for category in gt["categories"]:
        cid = category["id"]
        keys = sorted(k for k in set(gts) | set(dts) if k[1] == cid)  # image order, as LVISEval's
        num_gt = sum(len(gts[k]) for k in keys)
        if num_gt == 0:
            continue
        scores, true, false = [], [[] for _ in IOU_THRESHOLDS], [[] for _ in IOU_THRESHOLDS]
        for image_id, _ in keys:
            g, d = gts[image_id, cid], sorted(dts[image_id, cid], key=lambda x: -x["score"])
            if not d:
                continue
            height, width = images[image_id]["height"], images[image_id]["width"]
            if kind == "segm":
                ious = mask_utils.iou([_to_rle(x, height, width) for x in _regions(d, kind)],
                                      [_to_rle(x, height, width) for x in _regions(g, kind)], [0] * len(g))
            else:
                ious = mask_utils.iou(_regions(d, kind), _regions(g, kind), [0] * len(g))
            ious = np.asarray(ious, dtype=float).reshape(len(d), len(g))
            not_exhaustive = cid in images[image_id]["not_exhaustive_category_ids"]
            scores += [x["score"] for x in d]
            for t, threshold in enumerate(IOU_THRESHOLDS):
                matched, ignored = _match(ious, np.zeros(len(g), bool), threshold)
                skip = ignored | (~matched & not_exhaustive)
                true[t] += list(matched & ~skip)
                false[t] += list(~matched & ~skip)
        scores = np.asarray(scores, dtype=float)
        per_category[cid] = float(np.mean([
            _average_precision(scores, np.asarray(true[t], bool), np.asarray(false[t], bool), num_gt)
            for t in range(len(IOU_THRESHOLDS))]))
    frequency = {c["id"]: c.get("frequency") for c in gt["categories"]}

    def mean(ids) -> float:
        values = [per_category[i] for i in ids if i in per_category]
        return 100 * float(np.mean(values)) if values else float("nan")

    return {"AP": mean(per_category), **{f"AP{f}": mean([i for i in per_category if frequency[i] == f])
                                         for f in "rcf"}}
