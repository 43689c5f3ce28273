"""OV-COCO's metric: box AP50 per class from pycocotools' COCOeval (IoU 0.5, all areas, maxDets 1000, as
CLIPSelf reads ``precision[0, :, k, 0, -1]``), averaged (nanmean) over the novel, base and all classes."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from fineclip.detect.data import OVSplit


def ap50_per_class(gt: dict, detections: list[dict], category_ids: list[int]) -> dict[int, float]:
    """{category id: AP50 in percent, NaN for a class with no ground truth}; ``detections`` in COCO's result
    format (image_id, category_id, bbox as x, y, w, h, score)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        if not detections:
            return {cid: (0.0 if coco.getAnnIds(catIds=[cid], iscrowd=False) else float("nan")) for cid in category_ids}
        results = coco.loadRes(detections)
        evaluator = COCOeval(coco, results, "bbox")
        evaluator.params.maxDets = [100, 300, 1000]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # (T, R, K, A, M)
    out = {}
    for k, cid in enumerate(evaluator.params.catIds):
        if cid in category_ids:
            p = precision[0, :, k, 0, -1]
            p = p[p > -1]
            out[cid] = float(100 * p.mean()) if p.size else float("nan")
    return out


def split_ap50(per_class: dict[int, float], split: OVSplit) -> dict[str, float]:
    """novel / base / all AP50: the nanmean of the per-class values of each part."""
    def mean(ids):
        values = [per_class.get(i, float("nan")) for i in ids]
        values = [v for v in values if v == v]
        return float(np.mean(values)) if values else float("nan")

    novel = [cid for cid, name in zip(split.category_ids, split.names, strict=True) if name in split.novel]
    base = [cid for cid, name in zip(split.category_ids, split.names, strict=True) if name not in split.novel]
    return {"detect/novel_ap50": mean(novel), "detect/base_ap50": mean(base), "detect/all_ap50": mean(novel + base)}
