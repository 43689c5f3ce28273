"""The OV-COCO and OV-LVIS configs end to end on COCO-format fixtures the test writes: tiny images, the real
OV-COCO class lists (65 of COCO's 80 names) and LVIS's split by frequency, LVIS's image naming by ``coco_url``,
its negative / not-exhaustive lists and polygon masks; a tiny backbone in place of EVA02 (weights file on disk)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from fineclip.cli import CONFIG_DIR
from fineclip.detect.__main__ import run
from fineclip.detect.data import OVDetectionSet, read_split
from fineclip.errors import AnnotationError
from fineclip.models import create_model

TINY = ["model=tiny", "data.image_size=64", "backbone.taps=[0,1,2,3]", "detector.fpn_channels=16",
        "detector.rpn_pre_nms=50", "detector.rpn_post_nms=30", "detector.roi_samples=16", "data.batch_size=4",
        "data.eval_batch_size=4", "data.num_workers=0", "epochs=1", "optim.warmup_iters=1", "progress=false",
        "tensorboard=false"]


def _compose(name, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="detect", overrides=[f"+detect={name}", *TINY, *overrides])


def _backbone(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny_weights.pt"
    torch.save(create_model("fineclip-tiny", image_size=64).state_dict(), path)
    return path


def _image(path, rng, boxes):
    pixels = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
    for x, y, w, h in boxes:
        pixels[int(y):int(y + h), int(x):int(x + w)] = rng.integers(120, 255, 3, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _box(rng):
    x, y = rng.uniform(0, 24, 2)
    return [float(x), float(y), float(rng.uniform(10, 22)), float(rng.uniform(10, 16))]


def _coco_fixture(root, names, count, rng):
    """annotations/instances_{train,val}2017.json over ``names`` (+ two COCO classes outside the split)."""
    categories = [{"id": i + 1, "name": n} for i, n in enumerate([*names, "traffic light", "hair drier"])]
    for part in ("train2017", "val2017"):
        images, annotations = [], []
        for image_id in range(1, count + 1):
            chosen = rng.choice(len(categories), size=3, replace=False)
            boxes = [_box(rng) for _ in chosen]
            _image(root / part / f"{image_id:012d}.jpg", rng, boxes)
            images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 40, "width": 48})
            annotations += [{"id": len(annotations) + 1, "image_id": image_id, "category_id": int(c) + 1, "bbox": b,
                             "area": b[2] * b[3], "iscrowd": 0} for c, b in zip(chosen, boxes, strict=True)]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{part}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_ov_coco_config_trains_and_evaluates_on_a_coco_fixture_with_the_real_class_lists(tmp_path):
    cfg = _compose("ov_coco_b16", f"data.root={tmp_path / 'coco'}", f"backbone.checkpoint={_backbone(tmp_path)}")
    names = [*cfg.data.base, *cfg.data.novel]
    _coco_fixture(tmp_path / "coco", names, 12, np.random.default_rng(0))
    assert cfg.detector.templates is None and cfg.detector.pixel_norm == "imagenet"
    split = read_split(cfg.data.val_ann, tuple(cfg.data.base), tuple(cfg.data.novel))
    assert len(split.names) == 65 and "traffic light" not in split.names and len(split.novel) == 17
    train = OVDetectionSet(cfg.data.train_ann, cfg.data.train_image_root, split, 64, train=True)
    novel_labels = {i + 1 for i, n in enumerate(split.names) if n in split.novel}
    assert all(not set(r[3].tolist()) & novel_labels for r in train.records)  # base boxes only
    metrics = run(cfg, tmp_path / "run")
    assert metrics["detect/protocol"] == "ov_coco" and metrics["detect/images"] == 12
    assert {f"detect/ap50/{n}" for n in names} <= set(metrics)
    for key in ("detect/novel_ap50", "detect/base_ap50", "detect/all_ap50"):
        assert 0 <= metrics[key] <= 100


def _lvis_fixture(root, rng):
    """annotations/lvis_v1_{train,val}.json: 6 categories (2 rare, 2 common, 2 frequent), images named by their
    COCO url, negative and not-exhaustive category lists, polygon masks."""
    categories = [{"id": i + 1, "name": n, "frequency": f} for i, (n, f) in enumerate(
        [("applesauce", "r"), ("aerosol_can", "c"), ("air_conditioner", "f"), ("apricot", "r"), ("alligator", "c"),
         ("airplane", "f")])]
    for part in ("train2017", "val2017"):
        images, annotations = [], []
        for image_id in range(1, 13):
            chosen = rng.choice(6, size=2, replace=False) + 1
            boxes = [_box(rng) for _ in chosen]
            _image(root / part / f"{image_id:012d}.jpg", rng, boxes)
            negative = [int(c) for c in range(1, 7) if c not in chosen][:2]
            images.append({"id": image_id, "height": 40, "width": 48, "neg_category_ids": negative,
                           "not_exhaustive_category_ids": [int(chosen[0])] if image_id % 4 == 0 else [],
                           "coco_url": f"http://images.cocodataset.org/{part}/{image_id:012d}.jpg"})
            for cid, (x, y, w, h) in zip(chosen, boxes, strict=True):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(cid),
                                    "bbox": [x, y, w, h], "area": w * h,
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        name = "lvis_v1_train.json" if part == "train2017" else "lvis_v1_val.json"
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / name).write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_ov_lvis_config_trains_masks_and_reports_federated_mask_apr_on_an_lvis_fixture(tmp_path):
    root = tmp_path / "coco"
    _lvis_fixture(root, np.random.default_rng(1))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        published = compose(config_name="detect", overrides=["+detect=ov_lvis_b16"])
    assert (published.detector.masks, published.detector.background_weight, published.detector.beta) == (True, 0.9, 0.6)
    assert list(published.optim.lr_steps) == [32, 44] and published.epochs == 48 and published.data.image_size == 1024
    cfg = _compose("ov_lvis_b16", f"data.root={root}", f"backbone.checkpoint={_backbone(tmp_path)}")
    split = read_split(cfg.data.val_ann, None, None)  # the rare classes are novel
    assert split.novel == {"applesauce", "apricot"} and len(split.names) == 6
    train = OVDetectionSet(cfg.data.train_ann, cfg.data.train_image_root, split, 64, train=True, masks=True)
    pixels, target = train[0]
    assert target["masks"].shape == (len(target["boxes"]), 64, 64)
    for box, mask in zip(target["boxes"], target["masks"], strict=True):  # a rectangle's mask fills its box
        x1, y1, x2, y2 = box.round().int().tolist()
        assert mask[y1 + 1:y2 - 1, x1 + 1:x2 - 1].all() and mask.sum() <= (x2 - x1 + 2) * (y2 - y1 + 2)
    metrics = run(cfg, tmp_path / "run")
    assert metrics["detect/protocol"] == "ov_lvis"
    for name in ("mask", "box"):
        for group in ("ap", "apr", "apc", "apf"):
            assert 0 <= metrics[f"detect/{name}_{group}"] <= 100


def test_a_split_naming_missing_classes_or_an_lvis_split_without_frequencies_is_refused(tmp_path):
    _coco_fixture(tmp_path, ["cat", "dog"], 1, np.random.default_rng(0))
    ann = tmp_path / "annotations" / "instances_val2017.json"
    with pytest.raises(AnnotationError, match=r"does not have: \['kite'\]"):
        read_split(ann, ("cat",), ("kite",))
    with pytest.raises(AnnotationError, match="no 'frequency' field"):
        read_split(ann, None, None)


def test_a_backbone_checkpoint_of_another_tower_is_refused_with_both_names(tmp_path):
    from fineclip.detect.run import load_backbone
    from fineclip.engine.checkpoint import save_checkpoint
    from fineclip.errors import ConfigError

    path = save_checkpoint({"config": {"model": {"name": "EVA02-L-14-336", "image_size": 336}}, "model": {}},
                           tmp_path / "last.pt")  # a training checkpoint of an L/14 run
    cfg = _compose("ov_coco_b16", f"data.root={tmp_path}", f"backbone.checkpoint={path}")
    with pytest.raises(ConfigError, match=r"holds a EVA02-L-14-336 tower, the detector is configured for fineclip-ti"):
        load_backbone(cfg)


@pytest.mark.parametrize("benchmark", ["ov_coco_b16", "ov_lvis_b16"])
def test_the_ov_configs_run_under_torchrun_with_two_processes(tmp_path, benchmark):
    """The entry point under torchrun (gloo, synchronised BatchNorm; OV-LVIS: masks): exit 0, the metrics."""
    import os
    import subprocess
    import sys

    root = tmp_path / "coco"
    if benchmark == "ov_lvis_b16":
        _lvis_fixture(root, np.random.default_rng(2))
    else:
        names = [*_compose(benchmark).data.base, *_compose(benchmark).data.novel]
        _coco_fixture(root, names, 12, np.random.default_rng(2))
    overrides = [f"+detect={benchmark}", *TINY, f"data.root={root}",  # 3 steps of 2 x 2 images
                 f"backbone.checkpoint={_backbone(tmp_path)}", f"hydra.run.dir={tmp_path / 'run'}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fineclip.detect",
               *overrides]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "detect.json").read_text())
    key = "detect/mask_apr" if benchmark == "ov_lvis_b16" else "detect/novel_ap50"
    assert metrics["detect/protocol"] == benchmark[:7] and 0 <= metrics[key] <= 100
    assert "detection [" in done.stdout and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
