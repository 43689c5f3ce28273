"""fineclip's federated LVIS evaluation against the ``lvis`` package's ``LVISEval`` (0.5.3, the last release; it
uses ``np.float``, removed in numpy 1.24, so the test lends it the alias) on a generated data set that exercises
every federated rule: detections of categories an image has no information on (dropped), of its negative
categories (false positives), of its not-exhaustively-annotated categories (unmatched ones ignored), more than
300 detections on an image, and categories of all three frequencies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from fineclip.detect.lvis_eval import lvis_evaluate

SIZE = 48


def _polygon(x, y, w, h, kind):
    if kind == 0:  # rectangle
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return [[x, y + h, x + w / 2, y, x + w, y + h]]  # triangle


def _dataset(seed=0):
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": f"c{i}", "frequency": "rcf"[i % 3]} for i in range(9)]
    images, annotations, detections = [], [], []
    for image_id in range(1, 13):
        present = rng.choice(9, size=rng.integers(1, 4), replace=False) + 1
        absent = [c for c in range(1, 10) if c not in present]
        negative = [int(c) for c in rng.choice(absent, size=2, replace=False)]
        unknown = [c for c in absent if c not in negative]
        not_exhaustive = [int(present[0])] if image_id % 3 == 0 else []
        images.append({"id": image_id, "height": SIZE, "width": SIZE, "neg_category_ids": negative,
                       "not_exhaustive_category_ids": not_exhaustive})
        for cid in present:
            for _ in range(rng.integers(1, 3)):
                x, y, w, h = (float(v) for v in rng.uniform([0, 0, 8, 8], [30, 30, 18, 18]))
                shape = int(rng.integers(2))
                poly = _polygon(x, y, w, h, shape)
                rle = mask_utils.merge(mask_utils.frPyObjects(poly, SIZE, SIZE))
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cid),
                                    "segmentation": poly, "bbox": [x, y, w, h], "area": float(mask_utils.area(rle))})
                for _ in range(rng.integers(0, 3)):  # near hits and misses of this object
                    dx, dy = rng.normal(0, 3, 2)
                    detections.append(_detection(image_id, int(cid), x + dx, y + dy, w, h, rng, shape, 0.3, 1.0))
        for cid in [*negative, unknown[0], *(rng.choice(9, size=3) + 1)]:  # false positives everywhere
            x, y = rng.uniform(0, 30, 2)
            detections.append(_detection(image_id, int(cid), x, y, 12.0, 10.0, rng))
    for _ in range(320):  # image 1 has more than 300 detections: only its best 300 count
        x, y = rng.uniform(0, 30, 2)
        detections.append(_detection(1, int(rng.integers(1, 10)), x, y, 10.0, 10.0, rng))
    info = {"images": images, "annotations": annotations, "categories": categories}
    return info, detections


def _detection(image_id, cid, x, y, w, h, rng, shape=0, low=0.01, high=0.6):
    x, y = float(np.clip(x, 0, SIZE - 2)), float(np.clip(y, 0, SIZE - 2))
    w, h = min(w, SIZE - x), min(h, SIZE - y)
    rle = mask_utils.merge(mask_utils.frPyObjects(_polygon(x, y, w, h, shape), SIZE, SIZE))
    rle["counts"] = rle["counts"].decode()
    return {"image_id": image_id, "category_id": cid, "score": float(rng.uniform(low, high)),
            "segmentation": rle, "bbox": [x, y, w, h]}


@pytest.mark.parametrize("kind", ["segm", "bbox"])
def test_federated_ap_equals_the_lvis_package(tmp_path, monkeypatch, kind):
    lvis = pytest.importorskip("lvis", reason="dev dependency: pip install -e '.[dev]'")
    monkeypatch.setattr(np, "float", float, raising=False)  # lvis 0.5.3 predates its removal
    gt, detections = _dataset()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    reference = lvis.LVISEval(lvis.LVIS(str(path)), lvis.LVISResults(lvis.LVIS(str(path)), detections, max_dets=300),
                              kind)
    reference.run()
    ours = lvis_evaluate(gt, detections, kind)
    expected = {key: 100 * reference.results[key] for key in ("AP", "APr", "APc", "APf")}
    assert ours == pytest.approx(expected, abs=1e-9)
    assert 5 < ours["AP"] < 95  # neither trivial nor empty


def test_the_federated_rules_change_the_result():
    gt, detections = _dataset()
    everything_negative = json.loads(json.dumps(gt))
    for image in everything_negative["images"]:  # every category known: no detection dropped, none ignored
        image["neg_category_ids"] = list(range(1, 10))
        image["not_exhaustive_category_ids"] = []
    assert lvis_evaluate(everything_negative, detections)["AP"] < lvis_evaluate(gt, detections)["AP"]
