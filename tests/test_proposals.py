"""Proposals files as a region source: both COCO layouts, score filter, per-image cap, clipping,
counted skips, clear errors; and the trainer's refusal of captionless regions for L_RC."""

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from fineclip.cli import CONFIG_DIR
from fineclip.data import RegionCaptionDataset
from fineclip.data.annotations import load_region_annotations
from fineclip.data.proposals import with_proposals
from fineclip.engine.trainer import train
from fineclip.errors import AnnotationError, ConfigError


def _proposals():
    return [
        {"image_id": 1, "bbox": [0, 0, 20, 20], "score": 0.9},
        {"image_id": 1, "bbox": [50, 50, 30, 30], "score": 0.95},  # clipped to 64 x 64: [50, 50, 64, 64]
        {"image_id": 1, "bbox": [10, 10, 30, 30], "score": 0.2},   # under min_score
        {"image_id": 1, "bbox": [5, 5, 4, 4], "score": 0.99},      # 16 px² < 64: small
        {"image_id": 1, "bbox": [30, 0, 20, 30], "score": 0.5},    # the third best: over max_per_image
        {"image_id": 2, "bbox": [1, 2, 30, 40]},                   # no score: 1.0
        {"image_id": 999, "bbox": [0, 0, 10, 10], "score": 1.0},   # unknown image
    ]


@pytest.mark.parametrize("layout", ["results", "instances"])
def test_proposals_replace_the_boxes_best_first_with_counted_skips(synthetic_root, tmp_path, layout):
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps(_proposals() if layout == "results" else {"annotations": _proposals()}))
    original = load_region_annotations(synthetic_root / "train.json")
    result = with_proposals(original, path, min_score=0.3, max_per_image=2, min_box_area=64)
    by_id = {r.image_id: r for r in result.records}
    np.testing.assert_array_equal(by_id[1].boxes, [[50, 50, 64, 64], [0, 0, 20, 20]])
    np.testing.assert_array_equal(by_id[2].boxes, [[1, 2, 31, 42]])
    assert by_id[1].region_captions == ["", ""] and by_id[1].category_ids.tolist() == [0, 0]
    assert len(by_id[3].boxes) == 0 and by_id[3].captions == original.records[2].captions
    stats = result.stats
    assert (stats["proposal_low_score"], stats["small_box"] - original.stats["small_box"],
            stats["proposal_unknown_image"], stats["proposal_over_max"], stats["proposals"]) == (1, 1, 1, 1, 3)
    assert stats["proposal_no_regions"] == len(result.records) - 2


def test_bad_proposals_files_name_the_problem(synthetic_root, tmp_path):
    original = load_region_annotations(synthetic_root / "train.json")
    with pytest.raises(AnnotationError, match="not found"):
        with_proposals(original, tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 1, "bbox": ["x", 0, 1, 1]}]')
    with pytest.raises(AnnotationError, match="proposal #0 has a malformed bbox"):
        with_proposals(original, bad)
    bad.write_text('[{"bbox": [0, 0, 1, 1]}]')
    with pytest.raises(AnnotationError, match="proposal #0 needs image_id"):
        with_proposals(original, bad)
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="malformed"):
        with_proposals(original, bad)


def test_dataset_scales_proposals_like_its_own_boxes(synthetic_root, tmp_path):
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps(_proposals()))
    ds = RegionCaptionDataset.from_file(str(synthetic_root / "train.json"), image_size=32,
                                        proposals={"file": str(path), "min_score": 0.3, "max_per_image": 2})
    item = ds[0]  # image 1, 64 px -> 32 px: boxes halved
    np.testing.assert_allclose(item["boxes"].numpy(), [[25, 25, 32, 32], [0, 0, 10, 10]])
    assert item["region_captions"] == ["", ""]


def _cfg(tmp_path, synthetic_root, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[
            f"data.root={synthetic_root}", "data.synthetic.train=24", "data.synthetic.val=8",
            "data.val=null", "trainer.epochs=1", "trainer.progress=false",
            "trainer.tensorboard=false", "data.batch_size=8", *overrides])


def test_captionless_regions_are_refused_for_region_caption_losses(tmp_path, synthetic_root):
    with pytest.raises(ConfigError, match="without captions"):
        train(_cfg(tmp_path, synthetic_root, "regions=grid"), tmp_path / "grid")  # fineclip's L_RC
    with pytest.raises(ConfigError, match="without captions"):  # proposals have none either
        train(_cfg(tmp_path, synthetic_root, "regions=proposals", "regions.file=p.json"), tmp_path / "props")
    with pytest.raises(ConfigError, match="regions.file"):
        train(_cfg(tmp_path, synthetic_root, "method=regionclip", "regions=proposals"), tmp_path / "nofile")


def test_regionclip_trains_on_proposals(tmp_path, synthetic_root):
    path = tmp_path / "proposals.json"
    path.write_text(json.dumps(_proposals() + [{"image_id": i, "bbox": [8, 8, 30, 30], "score": 0.8}
                                               for i in range(3, 25)]))
    cfg = _cfg(tmp_path, synthetic_root, "method=regionclip", "regions=proposals", f"regions.file={path}")
    train(cfg, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    concept = [x["train/loss_concept"] for x in lines if "train/loss_concept" in x]
    assert concept and all(np.isfinite(concept)) and max(concept) > 0
