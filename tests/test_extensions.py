"""Each extension point takes a class from any importable module plus a config value, with no edit to
the engine: a dense (last-block) mode, a region source and an evaluator defined here, in a test module,
are picked up through their ``_target_`` alone and do what they define."""

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fineclip.cli import CONFIG_DIR
from fineclip.data.random_batch import random_batch
from fineclip.engine.build import build_method
from fineclip.eval.evaluators import Evaluator, build_evaluators, format_metrics, run_evaluators
from fineclip.methods.regions import RegionSource
from fineclip.models.blocks import run_block
from fineclip.models.dense_modes import DenseMode


class FullAttention(DenseMode):
    """The last block exactly as the global path runs it (no change at all)."""

    name = "full"

    def __call__(self, block, x, ctx, use_checkpoint):
        return run_block(block, x, use_checkpoint, **ctx)


class FirstBoxOnly(RegionSource):
    """Each image's first box only."""

    name = "first_box"

    def __call__(self, batch, epoch):
        index = batch["regions"][:, 0]
        first = torch.cat([torch.tensor([True]), index[1:] != index[:-1]])
        captions = [c for c, keep in zip(batch["region_captions"], first.tolist(), strict=True) if keep]
        return {**batch, "regions": batch["regions"][first], "region_captions": captions}


class CountImages(Evaluator):
    name = "count"

    def __call__(self, model, cfg, device, dataset=None, crop_model=None, progress=True):
        return {"count/images": float(len(dataset))}

    def format(self, metrics):
        return [f"counted {metrics['count/images']:.0f} images"] if "count/images" in metrics else []


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_a_dense_mode_from_its_target_changes_only_the_dense_path():
    cfg = _compose(f"model.dense_mode._target_={__name__}.FullAttention")
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    assert isinstance(model.dense_mode, FullAttention)
    pixels = model.normalize_pixels(random_batch(2, 1, 64)["images"])
    with torch.no_grad():
        image_emb, dense = model.encode_image_dense(pixels)
        x, ctx = model.tower.trunk(pixels)
        tokens = F.normalize(model.tower.dense_head(model.tower.last_block(x, ctx)), dim=-1)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), tokens)
    torch.testing.assert_close(image_emb, model.encode_image(pixels))


def test_a_region_source_from_its_target_reaches_the_method():
    cfg = _compose(f"regions._target_={__name__}.FirstBoxOnly")
    method = build_method(cfg, torch.device("cpu"))
    batch = random_batch(3, 4, 64)
    out = method.regions(batch, epoch=0)
    assert isinstance(method.regions, FirstBoxOnly) and out["regions"][:, 0].tolist() == [0.0, 1.0, 2.0]
    assert torch.equal(out["regions"], batch["regions"][[0, 4, 8]])


def test_an_evaluator_from_its_target_runs_and_formats_its_own_lines():
    cfg = _compose(f"+eval.evaluators.count._target_={__name__}.CountImages",
                   "+eval.evaluators.box_retrieval.enabled=false")
    evaluators = build_evaluators(cfg)
    assert [type(e).__name__ for e in evaluators] == ["CountImages"]
    metrics = run_evaluators(evaluators, None, cfg, "cpu", dataset=list(range(7)))
    assert metrics == {"count/images": 7.0} and format_metrics(metrics, evaluators) == "counted 7 images"
