"""The FG-OVD-style evaluation: attribute swaps against a brute-force enumeration, the synthetic splits, both
published file formats, and the top-1 against a box-by-box computation with PIL resizing and torchvision's
roi_align."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from fineclip.data.synthetic import COLOURS, SIZES, TEXTURES, generate
from fineclip.eval.fgovd import (
    FGOVD,
    FGBox,
    attribute_swaps,
    fgovd_top1,
    read_fgclip_jsonl,
    read_fgovd_json,
    synthetic_fgovd,
)
from fineclip.models import create_model


def test_attribute_swaps_are_every_list_with_exactly_k_values_changed_within_their_kind():
    attributes = ["large", "striped", "red"]
    kinds = [set(SIZES), set(TEXTURES), set(COLOURS)]
    for changed, expected in ((1, 2 + 2 + 7), (2, 2 * 2 + 2 * 7 + 2 * 7), (3, 2 * 2 * 7)):
        swaps = attribute_swaps(attributes, changed)
        assert len(swaps) == len({tuple(s) for s in swaps}) == expected
        for swap in swaps:
            assert sum(a != b for a, b in zip(swap, attributes, strict=True)) == changed
            assert all(value in kind for value, kind in zip(swap, kinds, strict=True))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("fg"), train=0, val=12, size=64, seed=4)


def test_the_synthetic_splits_change_one_two_three_attributes_or_take_other_captions(scenes):
    splits = synthetic_fgovd(scenes / "val.json", negatives=10, seed=0)
    assert splits == synthetic_fgovd(scenes / "val.json", negatives=10, seed=0)  # drawn from (seed, box) alone
    data = json.loads((scenes / "val.json").read_text())
    assert len(splits["trivial"]) == len(data["annotations"]) and len(splits["hard"]) == len(data["annotations"])
    assert 0 < len(splits["easy"]) < len(splits["medium"]) < len(splits["hard"])
    for changed, split in ((1, "hard"), (2, "medium"), (3, "easy")):
        for box in splits[split]:
            assert 0 < len(box.negatives) <= 10 and box.positive not in box.negatives
            for negative in box.negatives:  # same words in the same places but `changed` of them
                a, b = box.positive.split(), negative.split()
                assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == changed
    captions = {a["caption"] for a in data["annotations"]}
    assert all(set(b.negatives) <= captions and len(b.negatives) == 10 for b in splits["trivial"])


def test_both_published_formats_are_read(tmp_path):
    fgovd = {"images": [{"id": 5, "file_name": "val2017/000005.jpg"}],
             "categories": [{"id": 1, "name": "a red mug"}, {"id": 2, "name": "a blue mug"},
                            {"id": 3, "name": "a red cup"}],
             "annotations": [{"id": 9, "image_id": 5, "bbox": [1, 2, 30, 40], "category_id": 1,
                              "neg_category_ids": [2, 3]}]}
    (tmp_path / "1_attributes.json").write_text(json.dumps(fgovd))
    line = {"img_path": "val2017/000005.jpg", "bbox": [1, 2, 30, 40], "pos_expression": ["a red mug"],
            "neg_expression": ["a blue mug", "a red cup"], "category_id": 1}
    (tmp_path / "h_attributes_llava.jsonl").write_text(json.dumps(line) + "\n")
    a = read_fgovd_json(tmp_path / "1_attributes.json", "/coco")
    b = read_fgclip_jsonl(tmp_path / "h_attributes_llava.jsonl", "/coco")
    assert a == b == [FGBox(Path("/coco/val2017/000005.jpg"), (1, 2, 30, 40), "a red mug", ["a blue mug", "a red cup"])]


def test_top1_equals_a_box_by_box_computation(scenes):
    torch.manual_seed(0)
    model = create_model("fineclip-tiny").eval()
    boxes = synthetic_fgovd(scenes / "val.json", negatives=4)["hard"][:20]
    top1, count = fgovd_top1(model, boxes, "cpu", batch_size=3)
    correct = 0
    with torch.no_grad():
        for b in boxes:
            image = Image.open(b.image).convert("RGB")
            sx, sy = 64 / image.width, 64 / image.height
            pixels = torch.from_numpy(np.asarray(image.resize((64, 64), Image.BICUBIC)).copy()).permute(2, 0, 1)
            _, dense = model.encode_image_dense(model.normalize_pixels(pixels[None]), with_global=False)
            x, y, w, h = b.box
            box = torch.tensor([[0, x * sx, y * sy, (x + w) * sx, (y + h) * sy]], dtype=torch.float32)
            feature = F.normalize(roi_align(dense, box, (1, 1), 8 / 64, -1, True).flatten(1), dim=-1)[0]
            texts = F.normalize(model.encode_text_pool([b.positive, *b.negatives]), dim=-1)
            scores = texts @ feature
            correct += int(scores[0] >= scores[1:].max())
    assert count == 20 and top1 == pytest.approx(100.0 * correct / 20)


def test_the_evaluator_reports_each_split_from_the_config(scenes):
    from hydra import compose, initialize_config_dir

    from fineclip.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"data.root={scenes}", "data.synthetic.train=0",
                                                      "data.synthetic.val=12", "eval.evaluators.fgovd.enabled=true",
                                                      "eval.evaluators.fgovd.synthetic=true"])
    evaluator = FGOVD(**{k: v for k, v in cfg.eval.evaluators.fgovd.items() if k != "_target_"})
    torch.manual_seed(0)
    metrics = evaluator(create_model("fineclip-tiny"), cfg, "cpu")
    assert metrics["fgovd/protocol"] == "fgovd_synthetic"
    assert all(0 <= metrics[f"fgovd/{s}/top1"] <= 100 for s in ("hard", "medium", "easy", "trivial"))
    assert evaluator.format(metrics)[0].startswith("fine-grained boxes [fgovd_synthetic]: top-1 hard ")


def test_the_synthetic_regions_ship_hard_negatives_with_one_attribute_swapped(scenes):
    data = json.loads((scenes / "val.json").read_text())
    for ann in data["annotations"]:
        negatives = ann["negatives"]
        assert 0 < len(negatives) <= 10 and len(set(negatives)) == len(negatives)
        for negative in negatives:
            a, b = ann["caption"].split(), negative.split()
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
