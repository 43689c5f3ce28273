"""F-ViT in torchvision (fineclip/detect/) against written-out computations: the pyramid's shapes, strides and
taps, the pooler's level rule and explicit strides (patch 14), the weighted and masked loss, the score fusion,
the AP50 split on a hand-made detection file, the jitter's geometry; and the command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torchvision.ops import roi_align

from fineclip.cli import CONFIG_DIR
from fineclip.detect.data import OVDetectionSet, OVSplit, read_split
from fineclip.detect.heads import fuse_scores, ov_fastrcnn_loss
from fineclip.detect.metrics import ap50_per_class, split_ap50
from fineclip.detect.poolers import StridedRoIAlign, roi_levels
from fineclip.detect.pyramid import FrozenViTPyramid
from fineclip.errors import AnnotationError, ConfigError
from fineclip.eval.seg_linear import block_tokens
from fineclip.models import create_model


@pytest.mark.parametrize(("name", "size", "taps", "strides"), [
    ("fineclip-tiny", 64, [0, 1, 2, 3], (2, 4, 8, 16, 32)),  # patch 8
    ("fineclip-tiny-eva", 56, [2, 5, 8, 11], (3.5, 7, 14, 28, 56)),  # patch 14
])
def test_pyramid_levels_strides_and_taps(name, size, taps, strides):
    torch.manual_seed(0)
    model = create_model(name)
    pyramid = FrozenViTPyramid(model, taps, fpn_channels=16).eval()
    assert pyramid.strides == strides
    pixels = torch.randn(2, 3, size, size)
    levels, dense = pyramid(pixels)
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    for level, stride in zip(levels.values(), strides, strict=True):
        assert level.shape == (2, 16, round(size / stride), round(size / stride))
    maps, dense_again = pyramid.vit_maps(pixels)
    torch.testing.assert_close(torch.cat(maps[:3], 1), block_tokens(model, pixels, tuple(t + 1 for t in taps[:3])))
    _, expected_dense = model.encode_image_dense(pixels)  # the last tap's head: the model's own dense features
    torch.testing.assert_close(dense, expected_dense.detach())
    assert not any(p.requires_grad for p in pyramid.vit.parameters())
    pyramid.train()
    assert not pyramid.vit.training and pyramid.fpn.training
    with pytest.raises(ValueError, match="ending at the last"):
        FrozenViTPyramid(model, taps[:3] + [taps[3] - 1])


def test_pooler_levels_follow_mmdets_rule_at_explicit_strides():
    sides = torch.tensor([30.0, 112.0, 224.0, 448.0, 1000.0, 111.0])
    boxes = torch.stack([torch.zeros(6), torch.zeros(6), sides, sides], dim=1)
    # ⌊log2(side / 56 + 1e-6)⌋ clamped to 0 … 3: 30 → 0; 112 → 1; 224 → 2; 448 → 3; 1000 (4.2) → 3; 111 (0.99) → 0
    assert roi_levels(boxes, 4).tolist() == [0, 1, 2, 3, 3, 0]
    strides = (3.5, 7.0, 14.0, 28.0)
    torch.manual_seed(0)
    features = {str(i): torch.randn(1, 3, math.ceil(448 / s), math.ceil(448 / s)) for i, s in enumerate(strides)}
    proposals = [torch.tensor([[10.0, 20.0, 40.0, 50.0], [0.0, 0.0, 300.0, 200.0]])]  # sides 30 and 245: levels 0, 2
    out = StridedRoIAlign(list(features), strides, output_size=7)(features, proposals)
    for row, (level, stride) in enumerate([(0, 3.5), (2, 14.0)]):
        rois = torch.cat([torch.zeros(1, 1), proposals[0][row:row + 1]], dim=1)
        expected = roi_align(features[str(level)], rois, 7, spatial_scale=1 / stride, sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out[row:row + 1], expected)


def test_the_loss_masks_novel_columns_and_weighs_the_background():
    torch.manual_seed(0)
    logits, deltas, targets = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 3, 0, 1])  # column 2 is a novel class: weight 0, never a label
    weight = torch.tensor([0.6, 1.0, 0.0, 1.0])
    loss_cls, loss_box = ov_fastrcnn_loss(logits, deltas, labels, targets, weight)
    kept = logits[:, [0, 1, 3]]  # the novel column leaves the softmax
    column = {0: 0, 1: 1, 3: 2}
    expected = sum(weight[y] * -(kept[i, column[int(y)]] - kept[i].logsumexp(0)) for i, y in enumerate(labels)) / 5
    torch.testing.assert_close(loss_cls, expected)
    positive = labels > 0
    torch.testing.assert_close(loss_box, (deltas[positive] - targets[positive]).abs().sum() / 5)


def test_fusion_is_the_geometric_interpolation_with_alpha_for_base_and_beta_for_novel():
    torch.manual_seed(0)
    det, clip = torch.randn(3, 4), torch.randn(3, 4)
    novel = torch.tensor([False, False, True, False])  # background, base, novel, base
    fused = fuse_scores(det, clip, novel, alpha=0.1, beta=0.8)
    p, q = det.softmax(-1), clip.softmax(-1)
    for c, exponent in enumerate([0.1, 0.1, 0.8, 0.1]):
        torch.testing.assert_close(fused[:, c], p[:, c] ** (1 - exponent) * q[:, c] ** exponent)


def test_ap50_split_against_a_hand_computed_detection_file():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 11, "name": "kite"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 9, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
              {"id": 3, "image_id": 2, "category_id": 9, "bbox": [5, 5, 40, 40], "area": 1600, "iscrowd": 0},
              {"id": 4, "image_id": 2, "category_id": 11, "bbox": [60, 5, 20, 20], "area": 400, "iscrowd": 0}]}
    detections = [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 30, 30], "score": 0.9},  # cat: one hit, AP 100
        {"image_id": 2, "category_id": 9, "bbox": [60, 60, 30, 30], "score": 0.9},  # dog: a miss ranked first,
        {"image_id": 1, "category_id": 9, "bbox": [50, 50, 30, 30], "score": 0.8},  # then one of its two boxes
    ]  # kite: nothing found, AP 0
    per_class = ap50_per_class(gt, detections, [7, 9, 11])
    # dog: recall 1/2 reached at precision 1/2; COCO's 101 recall points 0, 0.01 … 0.5 (51 of them) score 0.5
    assert per_class == pytest.approx({7: 100.0, 9: 100 * 51 * 0.5 / 101, 11: 0.0})
    split = OVSplit(("cat", "dog", "kite"), (7, 9, 11), frozenset({"cat"}))
    assert split_ap50(per_class, split) == pytest.approx({
        "detect/novel_ap50": 100.0, "detect/base_ap50": (100 * 51 * 0.5 / 101 + 0) / 2,
        "detect/all_ap50": (100 + 100 * 51 * 0.5 / 101) / 3})
    assert split.class_weight(0.6).tolist() == pytest.approx([0.6, 0.0, 1.0, 1.0])
    assert split.novel_mask.tolist() == [False, True, False, False]


def _scene(tmp_path, size=(120, 80)):
    """One image, black with a white box where the annotation says; a second class novel."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[20:50, 30:90] = 255
    Image.fromarray(array).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": size[0], "height": size[1]}],
            "categories": [{"id": 1, "name": "slab"}, {"id": 2, "name": "dot"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 20, 60, 30], "area": 1800,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    return read_split(tmp_path / "a.json", ("slab",), ("dot",))


def test_jittered_boxes_stay_on_their_pixels_and_training_drops_novel_boxes(tmp_path):
    split = _scene(tmp_path)
    train = OVDetectionSet(str(tmp_path / "a.json"), str(tmp_path), split, 64, train=True)
    for epoch in range(6):  # several scales, crops and flips
        train.set_epoch(epoch)
        pixels, target = train[0]
        assert pixels.shape == (3, 64, 64) and target["labels"].tolist() in ([1], [])  # the novel box is gone
        for x1, y1, x2, y2 in target["boxes"].round().int().tolist():
            inside = pixels[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1].float()
            if inside.numel():
                assert inside.mean() > 200  # the white slab is where its box says
    val = OVDetectionSet(str(tmp_path / "a.json"), str(tmp_path), split, 64, train=False)
    pixels, target = val[0]
    assert target["scale"] == pytest.approx(64 / 120)  # the long side into 64, kept ratio
    assert target["labels"].tolist() == [1, 2] and pixels[:, 43:, :].sum() == 0  # 80·64/120 = 43 rows, then padding
    with pytest.raises(AnnotationError, match=r"names classes the file does not have: \['kite'\]"):
        read_split(tmp_path / "a.json", ("slab",), ("kite",))


def _detect_cfg(tmp_path, *overrides):
    args = ["data.synthetic.train=32", "data.synthetic.val=8", f"cache_dir={tmp_path}", "data.batch_size=8",
            "epochs=1", "optim.warmup_iters=1", "progress=false", "detector.fpn_channels=16", *overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="detect", overrides=args)


def test_the_command_trains_evaluates_and_reevaluates_from_its_checkpoint(tmp_path):
    from fineclip.detect.__main__ import run

    cfg = _detect_cfg(tmp_path)
    metrics = run(cfg, tmp_path / "run")
    assert metrics["detect/protocol"] == "ov_synthetic" and metrics["detect/images"] == 8
    names = list(OmegaConf.to_container(cfg.data.base)) + list(OmegaConf.to_container(cfg.data.novel))
    assert {f"detect/ap50/{n}" for n in names} <= set(metrics)
    assert json.loads((tmp_path / "run" / "detect.json").read_text()) == pytest.approx(metrics, nan_ok=True)
    again = run(_detect_cfg(tmp_path, "evaluate_only=true", f"detector_checkpoint={tmp_path}/run/checkpoints/last.pt"),
                tmp_path / "again")
    assert again == pytest.approx(metrics, nan_ok=True)
    with pytest.raises(ConfigError, match="not shorter than the run"):
        run(_detect_cfg(tmp_path, "optim.warmup_iters=100", "resume=false"), tmp_path / "long")


def test_the_ov_coco_configs_compose_with_the_published_settings():
    for name, taps, size in (("ov_coco_b16", [3, 5, 7, 11], 640), ("ov_coco_l14", [6, 10, 14, 23], 896)):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="detect", overrides=[f"+detect={name}"])
        assert list(cfg.backbone.taps) == taps and cfg.data.image_size == size and cfg.protocol == "ov_coco"
        assert len(cfg.data.base) == 48 and len(cfg.data.novel) == 17 and not set(cfg.data.base) & set(cfg.data.novel)
        assert (cfg.detector.alpha, cfg.detector.beta, cfg.detector.clip_temperature) == (0.1, 0.8, 75.0)
        assert cfg.optim.lr == 1e-4 and cfg.data.batch_size == 64 and cfg.epochs == 3


def test_the_gpu_checks_detection_row_runs_on_a_cpu(gpu_check):
    import argparse

    args = argparse.Namespace(device="cpu", steps=1, detect_batch=2, detect_config="ov_coco_b16",
                              detect_overrides="model=tiny data.image_size=64 backbone.taps=[0,1,2,3] "
                                               "detector.fpn_channels=16 detector.rpn_pre_nms=50 "
                                               "detector.rpn_post_nms=20 detector.roi_samples=16")
    row = gpu_check.detect_row(args)
    assert row["ok"] and "s/iteration at 64 px, batch 2" in row["result"], row
