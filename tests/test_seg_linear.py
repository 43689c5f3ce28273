"""seg_linear_ibot's mechanics against hand computations: the sliding windows and their stitching, the
keep-ratio resize, the class-ratio crop, the warmup + poly schedule, the block tokens; and the evaluation
command giving what the protocol's functions give, under a name that says what was changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from test_segmentation import _ade20k_root

from fineclip.cli import CONFIG_DIR
from fineclip.engine.rng import seed_everything
from fineclip.eval.seg_augment import crop_box, random_crop, rescale_size
from fineclip.eval.seg_linear import (
    LinearSegProtocol,
    block_tokens,
    linear_segmentation_metrics,
    slide_logits,
    slide_windows,
)
from fineclip.evaluate import run
from fineclip.models import create_model


def test_slide_windows_as_mmseg_places_them():
    assert slide_windows(512, 700, 512, 341) == [(0, 512, 0, 512), (0, 512, 188, 700)]
    # 700 x 900: rows at 0 and 700-512; columns at 0, 341 and 900-512
    assert slide_windows(700, 900, 512, 341) == [(y1, y1 + 512, x1, x1 + 512) for y1 in (0, 188)
                                                 for x1 in (0, 341, 388)]
    assert slide_windows(300, 400, 512, 341) == [(0, 300, 0, 400)]  # smaller than one window


def test_slide_logits_average_overlaps_and_cut_padded_windows():
    image = torch.arange(3 * 3 * 7, dtype=torch.float32).reshape(3, 3, 7)  # height 3 < crop 4: padded
    seen = []

    def logits_of(window):  # channels 0-2: the window itself; channel 3: the window's number
        seen.append(tuple(window.shape))
        return torch.cat([window, torch.full((1, 1, 4, 4), float(len(seen)))], dim=1)

    out = slide_logits(logits_of, image, 4, crop=4, stride=3)
    assert seen == [(1, 3, 4, 4), (1, 3, 4, 4)]  # windows x 0-3 and 3-6, each padded to 4 rows
    torch.testing.assert_close(out[:3], image)  # identical values averaged stay themselves
    torch.testing.assert_close(out[3, 0], torch.tensor([1, 1, 1, 1.5, 2, 2, 2]))


def test_keep_ratio_resize_and_class_ratio_crop():
    assert rescale_size(300, 400, (2048, 512)) == (512, 683)  # 512/300 = 1.7067 < 2048/400; 682.67 rounds up
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # the long side binds: 2.048
    label = np.zeros((100, 100), dtype=np.uint8)
    label[:, 90:] = 1  # class 1 only in the last 10 columns: most 20-px crops are one class
    for seed in range(5):
        rng, replay = np.random.default_rng(seed), np.random.default_rng(seed)
        _, crop = random_crop(label, label, 20, 0.75, rng)
        boxes = [crop_box(100, 100, 20, replay) for _ in range(11)]  # the first box and up to 10 retries

        def passes(box):
            y1, y2, x1, x2 = box
            counts = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=2)
            return (counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75
        expected = next((b for b in boxes[:10] if passes(b)), boxes[10])
        y1, y2, x1, x2 = expected
        np.testing.assert_array_equal(crop, label[y1:y2, x1:x2])


def test_warmup_then_poly_schedule():
    p = LinearSegProtocol()
    assert p.learning_rate(0) == pytest.approx(7e-4 * 1e-6)
    assert p.learning_rate(750) == pytest.approx(7e-4 * (1 - 750 / 160_000) * (1 - 0.5 * (1 - 1e-6)))
    assert p.learning_rate(1500) == pytest.approx(7e-4 * (1 - 1500 / 160_000))
    assert p.learning_rate(80_000) == pytest.approx(7e-4 * 0.5)
    assert p.name == "seg_linear_ibot" and p.scale == (2048, 512)
    assert LinearSegProtocol(iters=4, blocks=(1, 2)).name == "seg_linear_ibot[blocks=(1, 2),iters=4]"


@pytest.mark.parametrize("name", ["fineclip-tiny", "fineclip-tiny-eva-clip"])
def test_block_tokens_are_the_blocks_own_outputs(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    pixels = torch.randn(2, 3, 64, 64)
    visual, outputs = model.clip.visual, []
    with torch.no_grad():
        if hasattr(visual, "trunk"):
            x, rope = visual.trunk._pos_embed(visual.trunk.patch_embed(pixels))
            for block in visual.trunk.blocks:
                x = block(x, rope=rope)
                outputs.append(x[:, 1:])
        else:
            x = visual._embeds(pixels)
            for block in visual.transformer.resblocks:
                x = block(x)
                outputs.append(x[:, 1:])
    grid = 64 // model.tower.patch_size[0]
    expected = torch.cat([o.transpose(1, 2).reshape(2, -1, grid, grid) for o in (outputs[0], outputs[1])], dim=1)
    torch.testing.assert_close(block_tokens(model, pixels, (1, 2)), expected)


def test_evaluate_runs_the_protocol_under_the_name_of_what_changed(tmp_path):
    root = _ade20k_root(tmp_path, ("training", "validation"))
    rng = np.random.default_rng(0)
    for split, count in (("training", 4), ("validation", 2)):
        for i in range(count):
            size = (40 + 8 * i, 56)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
                root / "images" / split / f"ADE_{split}_{i}.jpg")
            Image.fromarray(rng.integers(0, 6, size, dtype=np.uint8)).save(
                root / "annotations" / split / f"ADE_{split}_{i}.png")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            "data=ade20k", f"data.root={root}", "eval.segmentation_protocol=seg_linear_ibot",
            "eval.seg_linear.iters=3", "eval.seg_linear.batch_size=2", "eval.seg_linear.blocks=[2,4]",
            "eval.seg_linear.crop=32", "eval.seg_linear.stride=21", "data.num_workers=0"])
    metrics = run(cfg)
    assert metrics["seg/protocol"] == "seg_linear_ibot[blocks=(2, 4),crop=32,stride=21,iters=3,batch_size=2]"
    seed_everything(cfg.seed)
    model = instantiate(cfg.model)
    sets = [instantiate(cfg.data.segmentation[s]) for s in ("train", "val")]
    protocol = LinearSegProtocol(iters=3, batch_size=2, blocks=(2, 4), crop=32, stride=21)
    expected = linear_segmentation_metrics(model, *sets, protocol, "cpu")
    assert metrics == pytest.approx(expected) and 0 <= metrics["seg/linear_miou"] <= 100
