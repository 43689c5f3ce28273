"""Segmentation metrics against brute-force counts; zero-shot and linear-probe segmentation on
feature maps with a known answer; the synthetic and ADE20K label readers."""

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from fineclip.errors import AnnotationError
from fineclip.eval.segmentation import (
    IGNORE,
    SegmentationSet,
    confusion_matrix,
    dense_features,
    linear_probe_miou,
    mean_iou,
    segmentation_metrics,
    zero_shot_miou,
)
from fineclip.models.prompts import DEFAULT_TEMPLATES


def _brute_force_miou(pred, target, num_classes):
    ious = []
    pairs = [(int(p), int(t)) for p, t in zip(pred.flatten(), target.flatten(), strict=True) if t != IGNORE]
    for c in range(num_classes):
        tp = sum(1 for p, t in pairs if p == c and t == c)
        fp = sum(1 for p, t in pairs if p == c and t != c)
        fn = sum(1 for p, t in pairs if p != c and t == c)
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return 100 * sum(ious) / len(ious)


def test_miou_equals_brute_force_with_ignored_pixels_and_absent_classes():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 9, 7), generator=g)  # class 4 and 5 never occur
    target[torch.rand(target.shape, generator=g) < 0.2] = IGNORE
    pred = torch.randint(0, 5, (3, 9, 7), generator=g)  # class 4 predicted but absent: IoU 0; 5 has none
    pred[target == IGNORE] = 5  # predictions on ignored pixels count for nothing
    confusion = confusion_matrix(pred, target, 6)
    assert confusion.sum() == (target != IGNORE).sum()
    assert mean_iou(confusion) == pytest.approx(_brute_force_miou(pred, target, 6), abs=1e-9)
    assert mean_iou(confusion_matrix(target.clamp(max=3), target, 6)) == 100.0


def _separable(n=6, classes=3, side=8, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n, side, side), generator=g)
    feats = 0.3 * torch.randn(n, dim, side, side, generator=g)
    feats[:, :classes] += 2 * torch.nn.functional.one_hot(labels, dim).permute(0, 3, 1, 2)[:, :classes]
    labels[torch.rand(labels.shape, generator=g) < 0.1] = IGNORE
    return feats, labels


def test_zero_shot_segmentation_labels_each_token_by_its_nearest_class():
    feats, labels = _separable()
    class_emb = torch.eye(5)[:3]
    assert zero_shot_miou(feats, labels, class_emb) == 100.0
    assert zero_shot_miou(feats, labels, class_emb[[1, 2, 0]]) == 0.0  # every class renamed


def test_zero_shot_segmentation_takes_float64_features():
    """The class embeddings were cast to float32 but the features were not: float64 features crashed."""
    feats, labels = _separable()
    class_emb = torch.eye(5)[:3]
    assert zero_shot_miou(feats.double(), labels, class_emb) == zero_shot_miou(feats, labels, class_emb) == 100.0


def test_linear_probe_reaches_the_separable_optimum():
    train_feats, train_labels = _separable(seed=1)
    val_feats, val_labels = _separable(seed=2)
    assert linear_probe_miou(train_feats, train_labels, val_feats, val_labels, 3, steps=200, lr=5e-2) == 100.0
    # labels unrelated to the features: no probe can do better than chance-like IoU
    shuffled = val_labels[torch.randperm(len(val_labels))]
    assert linear_probe_miou(train_feats, train_labels, val_feats, shuffled, 3, steps=200, lr=5e-2) < 60


def test_synthetic_label_maps_are_the_instance_masks(synthetic_root):
    dataset = SegmentationSet.from_instances(str(synthetic_root / "val.json"), size=64)
    coco = COCO(str(synthetic_root / "val.json"))
    assert dataset.class_names == [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))]
    for i, image_id in enumerate(sorted(coco.imgs)):
        _, label = dataset[i]
        expected = np.full((64, 64), IGNORE)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            expected[coco.annToMask(ann) > 0] = sorted(coco.getCatIds()).index(ann["category_id"])
        np.testing.assert_array_equal(label.numpy(), expected)


def _ade20k_root(tmp_path, splits=("validation",)):
    """The released layout with its 150-row class table; no images yet."""
    root = tmp_path / "ADEChallengeData2016"
    for split in splits:
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    lines = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{i}\t0.1\t1\t1\tname{i};alias" for i in range(1, 151)]
    (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    return root


def test_ade20k_layout_reduces_label_zero_to_ignore(tmp_path):
    root = _ade20k_root(tmp_path)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(root / "images" / "validation" / "ADE_val_1.jpg")
    raw = np.array([[0, 1, 2, 150]] * 6, dtype=np.uint8).repeat(2, axis=1)
    Image.fromarray(raw).save(root / "annotations" / "validation" / "ADE_val_1.png")
    dataset = SegmentationSet.from_ade20k(str(root), size=8)
    assert dataset.class_names[:2] == ["name1", "name2"] and len(dataset.class_names) == 150
    image, label = dataset[0]
    assert image.shape == (3, 8, 8)
    assert label[0].tolist() == [IGNORE, IGNORE, 0, 0, 1, 1, 149, 149]
    with pytest.raises(AnnotationError, match="no ADE20K images"):
        SegmentationSet.from_ade20k(str(root), split="training")


def test_zero_shot_on_a_model_uses_its_dense_tokens(synthetic_root, tiny_model):
    dataset = SegmentationSet.from_instances(str(synthetic_root / "val.json"), size=64)
    feats, labels = dense_features(tiny_model, dataset, batch_size=4)
    assert feats.shape == (len(dataset), 64, 8, 8) and labels.shape == (len(dataset), 64, 64)
    image, _ = dataset[0]
    _, expected = tiny_model.encode_image_dense(tiny_model.normalize_pixels(image[None]), with_global=False)
    torch.testing.assert_close(feats[0], expected[0].detach())
    miou = zero_shot_miou(feats, labels, torch.randn(12, 64))
    assert 0 <= miou <= 100


def test_training_evaluates_segmentation_when_asked(trained_tiny_run):
    import json

    metrics = json.loads((trained_tiny_run / "eval.json").read_text())  # trained with eval.segmentation=true
    assert metrics["seg/images"] == 8 and metrics["seg/protocol"] == "seg_proxy"
    assert 0 <= metrics["seg/zero_shot_miou"] <= 100 and 0 <= metrics["seg/linear_probe_miou"] <= 100


def test_evaluate_data_ade20k_segments_without_boxes_or_captions(tmp_path):
    """`python -m fineclip.evaluate data=ade20k`: the segmentation-only data set is scored with the
    numbers ``segmentation_metrics`` gives for the same model and folders."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from fineclip.cli import CONFIG_DIR
    from fineclip.engine.rng import seed_everything
    from fineclip.evaluate import run

    root = _ade20k_root(tmp_path, ("training", "validation"))
    rng = np.random.default_rng(0)
    for split, count in (("training", 6), ("validation", 3)):
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_{split}_{i}.jpg")
            Image.fromarray(rng.integers(0, 6, (40, 48), dtype=np.uint8)).save(
                root / "annotations" / split / f"ADE_{split}_{i}.png")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "data=ade20k", f"data.root={root}", "eval.probe_steps=5", "data.num_workers=0"])
    metrics = run(cfg)
    seed_everything(cfg.seed)
    model = instantiate(cfg.model)
    expected = segmentation_metrics(model, cfg.data.segmentation, list(DEFAULT_TEMPLATES), probe_steps=5)
    assert metrics.pop("seg/protocol") == expected.pop("seg/protocol") == "seg_proxy"  # named as the proxy it is
    assert metrics == pytest.approx(expected) and metrics["seg/images"] == 3
    assert set(metrics) == {"seg/images", "seg/zero_shot_miou", "seg/linear_probe_miou"}
