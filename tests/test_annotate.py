"""The annotation pipeline (python -m fineclip.annotate) on synthetic scenes: the rule captioner gives
back the generator's region captions, workers and resumed runs merge to the same file, bad images
are reported, the output trains to the numbers of the generator's own file, model proposers follow
their class-agnostic rule."""

import json
import subprocess
import sys

import pytest
import torch
from torchvision.ops import box_iou

from fineclip.annotate.proposers import class_agnostic

ROOT_ARGS = ["progress=false", "filters.drop_duplicates=false"]


def _annotate(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fineclip.annotate", *ROOT_ARGS, *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def _json(path):
    return json.loads(path.read_text())


def _run(*overrides):
    """The command's run() in this process (a composed config, as the command line would give)."""
    from hydra import compose, initialize_config_dir

    from fineclip.annotate.__main__ import run
    from fineclip.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="annotate", overrides=[*ROOT_ARGS, *overrides])
    return run(cfg)


def test_gt_and_rule_give_back_the_generators_region_captions(tmp_path, synthetic_root):
    out = tmp_path / "regions.json"
    done = _annotate(f"images={synthetic_root / 'train.json'}", f"out={out}", "shard_size=5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    source, written = _json(synthetic_root / "train.json"), _json(out)
    assert [im["id"] for im in written["images"]] == [im["id"] for im in source["images"]]
    assert written["captions"] == source["captions"] and written["categories"] == source["categories"]
    assert len(written["annotations"]) == len(source["annotations"])
    names = {c["id"]: c["name"] for c in source["categories"]}
    for a, b in zip(source["annotations"], written["annotations"], strict=True):
        assert (b["image_id"], b["bbox"], b["category_id"], b["caption"]) == (
            a["image_id"], a["bbox"], a["category_id"], a["caption"])
        assert b["caption"].endswith(names[b["category_id"]])  # the class of every region
        assert b["proposal"] == {"source": "gt", "score": 1.0} and b["captioner"] == {"name": "rule"}
    report = _json(tmp_path / "regions.json.report.json")
    assert report["regions"]["written"] == len(source["annotations"]) and report["images"]["unreadable"] == 0
    assert "regions per image" in done.stdout


def test_two_workers_and_a_resumed_run_merge_to_the_one_process_file(tmp_path, synthetic_root, monkeypatch, caplog):
    from fineclip.errors import ConfigError

    images = f"images={synthetic_root / 'train.json'}"
    one = tmp_path / "one.json"
    _run(images, f"out={one}", "shard_size=4")
    two = tmp_path / "two.json"
    for rank in (1, 0):  # as torchrun's two ranks would (RANK / WORLD_SIZE)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert _run(images, f"out={two}", "shard_size=4") is None  # a worker does not merge
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert not two.exists() and len(list((tmp_path / "two.json.shards").glob("shard_*.json"))) == 6
    _run(images, f"out={two}", "shard_size=4", "merge_only=true")
    assert _json(two) == _json(one)
    # a run that stopped after some shards: the rest are made, the written ones are not redone
    shards = sorted((tmp_path / "one.json.shards").glob("shard_*.json"))
    kept = shards[1].stat().st_mtime_ns
    for shard in shards[2:]:
        shard.unlink()
    one.unlink()
    with caplog.at_level("INFO"):
        _run(images, f"out={one}", "shard_size=4")
    assert "resuming: 2 of this worker's 6 shards are already written" in caplog.text
    assert shards[1].stat().st_mtime_ns == kept and _json(one) == _json(two)
    # shards of another configuration are not mixed in
    with pytest.raises(ConfigError, match="another configuration"):
        _run(images, f"out={one}", "shard_size=4", "filters.min_box_area=500")


def test_unreadable_images_are_counted_and_named(tmp_path, synthetic_root):
    source = _json(synthetic_root / "train.json")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    source["images"].append({"id": 999, "file_name": str(tmp_path / "broken.png"), "width": 64, "height": 64})
    (tmp_path / "with_bad.json").write_text(json.dumps(source))
    out = tmp_path / "out.json"
    done = _annotate(f"images={tmp_path / 'with_bad.json'}", f"image_root={synthetic_root}", f"out={out}",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = _json(tmp_path / "out.json.report.json")
    assert report["images"] == {"source": 25, "written": 24, "unreadable": 1}
    assert list(report["unreadable_images"]) == [str(tmp_path / "broken.png")]
    assert "unreadable: " in done.stdout and 999 not in [im["id"] for im in _json(out)["images"]]


def test_a_folder_of_images_with_boxes_from_a_file(tmp_path, synthetic_root):
    proposals = [{"image_id": 2, "bbox": [4, 4, 30, 30], "score": 0.9}, {"image_id": 2, "bbox": [0, 0, 5, 5],
                                                                        "score": 0.8},
                 {"image_id": 1, "bbox": [10, 10, 20, 20], "score": 0.1}]
    (tmp_path / "proposals.json").write_text(json.dumps(proposals))
    out = tmp_path / "out.json"
    _run(f"images={synthetic_root / 'train'}", f"out={out}", "proposals=file",
         f"proposals.path={tmp_path / 'proposals.json'}", "proposals.min_score=0.5", "captioner=none",
         "filters.require_caption=false")
    written = _json(out)
    files = sorted(p.name for p in (synthetic_root / "train").iterdir())
    assert [im["file_name"] for im in written["images"]] == files  # ids 1..N in sorted order
    assert [(a["image_id"], a["bbox"]) for a in written["annotations"]] == [(2, [4.0, 4.0, 30.0, 30.0])]
    assert written["annotations"][0]["proposal"] == {"source": "file:proposals.json", "score": 0.9}
    assert _json(tmp_path / "out.json.report.json")["regions"]["dropped"] == {"small_box": 1}


def test_rule_captioner_without_classes_is_a_clear_error(tmp_path, synthetic_root):
    from fineclip.errors import ConfigError

    with pytest.raises(ConfigError, match="captioner=rule"):
        _run(f"images={synthetic_root / 'train'}", f"out={tmp_path / 'o.json'}")


def test_regenerated_data_trains_to_the_generators_numbers(tmp_path, synthetic_root):
    from hydra import compose, initialize_config_dir

    from fineclip.cli import CONFIG_DIR
    from fineclip.engine.trainer import train

    out = tmp_path / "regions.json"
    _run(f"images={synthetic_root / 'train.json'}", f"out={out}")
    common = [f"data.root={synthetic_root}", "data.synthetic.train=24", "data.synthetic.val=8", "data.batch_size=8",
              "trainer.epochs=1", "trainer.progress=false", "trainer.tensorboard=false"]
    metrics = []
    for name, train_file in (("generator", synthetic_root / "train.json"), ("annotated", out)):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*common, f"data.train.ann_file={train_file}"])
        metrics.append(train(cfg, tmp_path / name))
    assert metrics[0] == metrics[1] and metrics[0]["box/boxes"] > 0


def test_class_agnostic_filter_equals_a_loop_over_its_rules():
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(40, 2, generator=g) * 50
    boxes = torch.cat([corners, corners + 2 + torch.rand(40, 2, generator=g) * 30], dim=1)
    scores = torch.rand(40, generator=g)
    got_boxes, got_scores = class_agnostic(boxes, scores, 0.2, 0.5, 100.0, 5)
    order = [i for i in scores.argsort(descending=True).tolist() if scores[i] >= 0.2]
    kept = []
    for i in order:  # greedy NMS over all boxes, then the area floor, then the best five
        if all(box_iou(boxes[i : i + 1], boxes[j : j + 1]).item() <= 0.5 for j in kept):
            kept.append(i)
    kept = [i for i in kept if (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]) >= 100][:5]
    assert torch.equal(got_boxes, boxes[kept]) and torch.equal(got_scores, scores[kept])


def test_a_torchvision_detector_from_a_local_checkpoint_proposes_boxes(tmp_path, synthetic_root):
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5)
    torch.save(model.state_dict(), tmp_path / "detector.pt")
    out = tmp_path / "out.json"
    _run(f"images={synthetic_root / 'train.json'}", f"out={out}", "proposals=detector",
         f"proposals.checkpoint={tmp_path / 'detector.pt'}", "proposals.num_classes=5",
         "proposals.architecture=fasterrcnn_mobilenet_v3_large_320_fpn", "proposals.score_threshold=0.0",
         "proposals.min_area=0", "captioner=none", "filters.require_caption=false", "filters.min_box_area=0")
    written = _json(out)
    assert written["annotations"], "a random-weight detector with no score floor proposes something"
    per_image = {}
    for a in written["annotations"]:
        assert a["proposal"]["source"] == "detector:fasterrcnn_mobilenet_v3_large_320_fpn"
        assert a["category_id"] == 0 and 0 <= a["bbox"][0] and a["bbox"][0] + a["bbox"][2] <= 64 + 1e-3
        per_image.setdefault(a["image_id"], []).append(a["proposal"]["score"])
    assert all(len(s) <= 20 and s == sorted(s, reverse=True) for s in per_image.values())
    assert {"id": 0, "name": "region", "supercategory": "region"} in written["categories"]


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory):
    """A BLIP-2 of random weights at a tiny size (vision, Q-Former and OPT configs of width 32), with
    a word-level tokenizer written here: a local folder as a user's blip2-opt-2.7b would be."""
    from fineclip.annotate.random_blip2 import random_blip2

    torch.manual_seed(0)
    model, processor = random_blip2()
    folder = tmp_path_factory.mktemp("blip2")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip2_captions_every_crop_as_the_model_does_one_by_one(tiny_blip2):
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    from fineclip.annotate.captioners import DEFAULT_PROMPT, HFCaptioner, crop_box
    from fineclip.annotate.proposers import Proposal

    captioner = HFCaptioner(str(tiny_blip2), crop_scale=1.5, batch_size=2, max_new_tokens=6)
    images = [Image.new("RGB", (48, 40), (200, 30, 30)), Image.new("RGB", (32, 64), (30, 30, 200))]
    for image in images:  # some structure in the crops
        image.paste((250, 250, 0), (5, 5, 20, 25))
    boxes = [[Proposal([4, 4, 20, 24], 1.0, "gt"), Proposal([20, 10, 20, 20], 1.0, "gt")],
             [Proposal([0, 30, 32, 30], 1.0, "gt")]]
    got = captioner(images, boxes)
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_blip2).eval()
    processor = AutoProcessor.from_pretrained(tiny_blip2)
    for image, proposals, texts in zip(images, boxes, got, strict=True):
        for proposal, text in zip(proposals, texts, strict=True):
            crop = image.crop(crop_box(proposal.bbox, 1.5, image.width, image.height))
            inputs = processor(images=[crop], text=[DEFAULT_PROMPT], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)
            new = out[:, inputs["input_ids"].shape[1]:] if out.shape[1] > inputs["input_ids"].shape[1] else out
            assert text == processor.batch_decode(new, skip_special_tokens=True)[0].strip()
    assert crop_box([10, 10, 20, 10], 1.5, 64, 64) == (5, 8, 35, 22)  # 30 x 15 about the centre (20, 15)
    assert crop_box([0, 0, 20, 10], 1.5, 64, 64) == (0, 0, 25, 12)  # clipped at the image's edge


def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, synthetic_root, tiny_blip2):
    import signal
    import time

    args = [f"images={synthetic_root / 'train.json'}", "shard_size=1", "batch_images=1", "captioner=blip2",
            f"captioner.path={tiny_blip2}", "captioner.num_beams=3", "captioner.max_new_tokens=24",
            "filters.min_caption_words=1"]
    reference = tmp_path / "reference.json"
    _run(*args, f"out={reference}")
    out = tmp_path / "killed.json"
    process = subprocess.Popen([sys.executable, "-m", "fineclip.annotate", *ROOT_ARGS, *args, f"out={out}"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    third = tmp_path / "killed.json.shards" / "shard_000002.json"
    while not third.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    written = len(list((tmp_path / "killed.json.shards").glob("shard_*.json")))
    assert 3 <= written < 24 and not out.exists()
    done = _annotate(*args, f"out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _json(out) == _json(reference)
    captions = [a["caption"] for a in _json(out)["annotations"]]
    assert captions and all(a["captioner"]["prompt"] == "Describe this image in one sentence."
                            for a in _json(out)["annotations"])


def test_coco_instances_with_a_captions_file(tmp_path, synthetic_root):
    data = _json(synthetic_root / "train.json")
    instances = {k: data[k] for k in ("images", "annotations", "categories")}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps({"images": data["images"], "annotations": data["captions"]}))
    out = tmp_path / "out.json"
    _run(f"images={tmp_path / 'instances.json'}", f"image_root={synthetic_root}",
         f"captions={tmp_path / 'captions.json'}", f"out={out}")
    assert _json(out)["captions"] == data["captions"]


def test_a_transformers_detector_from_a_local_folder(tmp_path):
    from PIL import Image
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessor

    from fineclip.annotate.proposers import HFProposals

    config = YolosConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         image_size=[64, 64], patch_size=16, num_detection_tokens=6, num_labels=3)
    torch.manual_seed(0)
    model = YolosForObjectDetection(config).eval()
    model.save_pretrained(tmp_path)
    processor = YolosImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    processor.save_pretrained(tmp_path)
    images = [Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (40, 64), (10, 10, 200))]
    got = HFProposals(str(tmp_path), score_threshold=0.0, nms_iou=0.9, min_area=0)([None, None], images)
    with torch.no_grad():
        outputs = model(**processor(images=images, return_tensors="pt"))
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(48, 64), (64, 40)])
    for proposals, result in zip(got, results, strict=True):
        boxes, scores = class_agnostic(result["boxes"], result["scores"], 0.0, 0.9, 0.0, 20)
        assert [p.score for p in proposals] == pytest.approx(scores.tolist())
        for p, (x1, y1, x2, y2) in zip(proposals, boxes.tolist(), strict=True):
            assert p.bbox == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-4)
        assert proposals and all(p.source == f"hf:{tmp_path.name}" for p in proposals)


def test_out_format_shards_writes_tar_shards_the_shard_reader_reads(tmp_path, synthetic_root):
    from fineclip.data.shards import ShardedRegionDataset

    out = tmp_path / "regions"
    report = _run(f"images={synthetic_root / 'train.json'}", f"out={out}", "shard_size=5", "out_format=shards",
                  "samples_per_tar=10")
    written = _json(out / "annotations.json")
    assert report["regions"]["written"] == len(written["annotations"])
    assert _json(out / "sizes.json") == {"shard-000000.tar": 10, "shard-000001.tar": 10, "shard-000002.tar": 4}
    dataset = ShardedRegionDataset(out, image_size=32, train=False)
    assert len(dataset) == len(written["images"]) == 24
    for i in (0, 13, 23):
        item = dataset[i]
        regions = [a for a in written["annotations"] if a["image_id"] == item["image_id"]]
        assert item["region_captions"] == [a["caption"] for a in regions]
