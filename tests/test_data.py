import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from fineclip.data import RegionCaptionDataset, collate_regions, load_region_annotations
from fineclip.data.synthetic import COLOURS, SHAPES, generate
from fineclip.errors import AnnotationError, ImageLoadError


def test_synthetic_data_round_trips_through_pycocotools(synthetic_root):
    coco = COCO(str(synthetic_root / "train.json"))
    assert len(coco.getImgIds()) == 24
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
    for image in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert 2 <= len(anns) <= 4
        with Image.open(synthetic_root / image["file_name"]) as img:
            assert img.size == (image["width"], image["height"])
        for ann in anns:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
            name = coco.loadCats(ann["category_id"])[0]["name"]
            assert name in ann["caption"] and len(ann["caption"].split()) >= 3  # more than "a <class>"
    captions = json.loads((synthetic_root / "train.json").read_text())["captions"]
    by_image = {}
    for c in captions:
        by_image.setdefault(c["image_id"], []).append(c["caption"])
    assert set(by_image) == set(coco.getImgIds()) and all(len(v) == 3 for v in by_image.values())
    # the image caption mentions every object's shape
    for image_id, caps in by_image.items():
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            assert coco.loadCats(ann["category_id"])[0]["name"] in caps[0]


def test_synthetic_instance_masks_cover_each_object_visible_pixels(synthetic_root):
    """The RLE masks decode (pycocotools) to disjoint masks whose pixels in the image are the
    object's own paint: a colour of the palette, plus at most one texture shade; area and bbox
    agree with the mask."""
    coco = COCO(str(synthetic_root / "train.json"))
    palette = {tuple(c) for c in COLOURS.values()}
    assert len(SHAPES) >= 12
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(Image.open(synthetic_root / image["file_name"]).convert("RGB"))
        covered = np.zeros(pixels.shape[:2], dtype=int)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            mask = coco.annToMask(ann).astype(bool)
            covered += mask
            assert mask.sum() == ann["area"] > 0
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            colours = {tuple(c) for c in np.unique(pixels[mask].reshape(-1, 3), axis=0)}
            assert len(colours) <= 2 and colours & palette, (image["file_name"], ann["id"], colours)
        assert covered.max() == 1  # no pixel belongs to two objects


def test_synthetic_generation_is_deterministic(tmp_path):
    a = generate(tmp_path / "a", train=4, val=2, seed=3)
    b = generate(tmp_path / "b", train=4, val=2, seed=3)
    c = generate(tmp_path / "c", train=4, val=2, seed=4)
    assert (a / "train.json").read_text().replace("/a", "") == (b / "train.json").read_text().replace("/b", "")
    assert (a / "train/000001.png").read_bytes() == (b / "train/000001.png").read_bytes()
    assert (a / "train.json").read_text() != (c / "train.json").read_text()


def test_colour_classes_name_each_object_by_the_colour_of_its_pixels(tmp_path):
    """--classes colour: the same images, captions and masks; each category is the one palette colour
    found among the pixels of the object's mask (the rest are its darker stripes or dots)."""
    from pycocotools import mask as mask_utils

    shapes = generate(tmp_path / "s", train=6, val=0, seed=5)
    colours = generate(tmp_path / "c", train=6, val=0, seed=5, classes="colour")
    a, b = (json.loads((r / "train.json").read_text()) for r in (shapes, colours))
    assert a["images"] == b["images"] and a["captions"] == b["captions"]
    assert (shapes / "train/000003.png").read_bytes() == (colours / "train/000003.png").read_bytes()
    assert [c["name"] for c in b["categories"]] == list(COLOURS)
    names = {c["id"]: c["name"] for c in b["categories"]}
    files = {i["id"]: i["file_name"] for i in b["images"]}
    for shape_ann, ann in zip(a["annotations"], b["annotations"], strict=True):
        assert {k: v for k, v in shape_ann.items() if k != "category_id"} == {
            k: v for k, v in ann.items() if k != "category_id"}
        pixels = np.asarray(Image.open(colours / files[ann["image_id"]]).convert("RGB"))
        inside = pixels[mask_utils.decode(ann["segmentation"]) > 0]
        found = {tuple(int(v) for v in c) for c in np.unique(inside, axis=0)}
        assert found & set(COLOURS.values()) == {COLOURS[names[ann["category_id"]]]}, ann["id"]
    with pytest.raises(ValueError, match="classes must be one of"):
        generate(tmp_path / "x", train=1, val=0, classes="texture")


def test_dataset_scales_boxes_and_caps_regions(synthetic_root):
    ds = RegionCaptionDataset.from_file(str(synthetic_root / "train.json"), image_size=32, max_regions=2)
    record = ds.records[0]
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert len(item["boxes"]) == min(2, len(record.boxes)) == len(item["region_captions"])
    assert item["caption"] in record.captions
    full = RegionCaptionDataset.from_file(str(synthetic_root / "train.json"), image_size=32, max_regions=20)
    torch.testing.assert_close(full[0]["boxes"], torch.from_numpy(record.boxes) / 2)
    assert ds[0]["region_captions"] == item["region_captions"]  # same epoch, same draw
    val = RegionCaptionDataset.from_file(str(synthetic_root / "val.json"), image_size=64, train=False)
    assert val[0]["caption"] == val.records[0].captions  # all captions at evaluation


def test_collate_flattens_regions_with_batch_index(synthetic_root):
    ds = RegionCaptionDataset.from_file(str(synthetic_root / "train.json"), image_size=64)
    samples = [ds[i] for i in range(3)]
    batch = collate_regions(samples)
    counts = [len(s["boxes"]) for s in samples]
    assert batch["regions"].shape == (sum(counts), 5)
    assert batch["regions"][:, 0].tolist() == [float(i) for i, c in enumerate(counts) for _ in range(c)]
    torch.testing.assert_close(batch["regions"][: counts[0], 1:], samples[0]["boxes"])
    assert len(batch["region_captions"]) == sum(counts) == len(batch["category_ids"])


# ---- bad input ------------------------------------------------------------------------------

def _write(tmp_path, images, annotations, captions, make_files=True, size=32):
    for image in images:
        if make_files:
            Image.new("RGB", (image["width"], image["height"]), (100, 50, 0)).save(tmp_path / image["file_name"])
    data = {
        "images": images, "annotations": annotations, "captions": captions,
        "categories": [{"id": 1, "name": "circle"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


def _img(i, w=32, h=32):
    return {"id": i, "file_name": f"{i}.png", "width": w, "height": h}


def _ann(i, image_id, bbox, caption="a red circle"):
    return {"id": i, "image_id": image_id, "category_id": 1, "bbox": bbox, "caption": caption}


def test_bad_boxes_are_clipped_or_dropped_and_counted(tmp_path):
    path = _write(
        tmp_path,
        [_img(1), _img(2)],
        [
            _ann(1, 1, [20, 20, 30, 30]),  # sticks out: clipped to 12x12
            _ann(2, 1, [5, 5, 0, 10]),  # zero width
            _ann(3, 1, [0, 0, 4, 4]),  # 16 px² < 64
            _ann(4, 1, [40, 40, 10, 10]),  # entirely outside
            _ann(5, 1, [0, 0, 10, 10], caption="  "),  # empty region caption
        ],
        [{"id": 1, "image_id": 1, "caption": "a circle"}, {"id": 2, "image_id": 2, "caption": "nothing"}],
    )
    ann = load_region_annotations(path)
    first, second = ann.records
    assert first.boxes.tolist() == [[20, 20, 32, 32]]
    assert ann.stats["clipped_box"] == 2 and ann.stats["empty_box"] == 1 and ann.stats["small_box"] == 2
    assert ann.stats["empty_region_caption"] == 1
    # an image without regions stays, for the global loss only, and is counted
    assert len(second.boxes) == 0 and ann.stats["no_regions"] == 1
    batch = collate_regions([RegionCaptionDataset(ann, 32)[i] for i in range(2)])
    assert batch["regions"].shape == (1, 5)


def test_empty_captions_are_dropped_and_counted(tmp_path):
    path = _write(
        tmp_path,
        [_img(1), _img(2)],
        [_ann(1, 1, [0, 0, 16, 16])],
        [
            {"id": 1, "image_id": 1, "caption": ""},
            {"id": 2, "image_id": 1, "caption": "a circle"},
            {"id": 3, "image_id": 2, "caption": "   "},
        ],
    )
    ann = load_region_annotations(path)
    assert [r.image_id for r in ann.records] == [1] and ann.records[0].captions == ["a circle"]
    assert ann.stats["empty_caption"] == 2 and ann.stats["no_caption"] == 1


def test_missing_image_is_skipped_and_logged(tmp_path, caplog):
    path = _write(tmp_path, [_img(1), _img(2)], [], [{"id": 1, "image_id": 1, "caption": "x"},
                                                      {"id": 2, "image_id": 2, "caption": "y"}])
    (tmp_path / "2.png").unlink()
    with caplog.at_level(logging.WARNING):
        ann = load_region_annotations(path)
    assert [r.image_id for r in ann.records] == [1] and ann.stats["missing_image"] == 1
    assert "2.png" in caplog.text


def test_corrupt_image_raises_naming_the_file(tmp_path):
    path = _write(tmp_path, [_img(7)], [], [{"id": 1, "image_id": 7, "caption": "x"}])
    (tmp_path / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = RegionCaptionDataset(load_region_annotations(path), 32)
    with pytest.raises(ImageLoadError, match=r"id=7 .*7\.png"):
        ds[0]


def test_malformed_json_raises_naming_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [ {"id": 1, ')
    with pytest.raises(AnnotationError, match=r"broken\.json.*line 1"):
        load_region_annotations(path)
    path.write_text('{"images": []}')
    with pytest.raises(AnnotationError, match="missing list 'annotations'"):
        load_region_annotations(path)


def test_records_with_missing_fields_or_bad_ids_raise_naming_the_record(tmp_path):
    path = _write(tmp_path, [_img(1)], [{"id": 5, "image_id": 1, "category_id": 1}], [])
    with pytest.raises(AnnotationError, match=r"annotation id=5 lacks field\(s\) \['bbox'\]"):
        load_region_annotations(path)
    path = _write(tmp_path, [_img(1)], [{**_ann(6, 1, [0, 0, 10, 10]), "category_id": 9}],
                  [{"id": 1, "image_id": 1, "caption": "x"}])
    with pytest.raises(AnnotationError, match="annotation id=6 has unknown category_id 9"):
        load_region_annotations(path)
    path = _write(tmp_path, [_img(1)], [_ann(7, 1, ["a", 0, 10, 10])], [{"id": 1, "image_id": 1, "caption": "x"}])
    with pytest.raises(AnnotationError, match="annotation id=7 has a malformed bbox"):
        load_region_annotations(path)


def test_colour_classes_train_and_evaluate_under_torchrun(tmp_path):
    """data=synthetic_colours on two processes: the run ends, and its distributed evaluation of the
    8 colour classes gives the numbers a one-process evaluation of its checkpoint gives."""
    import os
    import subprocess
    import sys

    from hydra import compose, initialize_config_dir

    from fineclip.cli import CONFIG_DIR
    from fineclip.evaluate import run

    data = [f"data.root={tmp_path / 'data'}", "data.synthetic.train=32", "data.synthetic.val=16"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fineclip.train",
           "data=synthetic_colours", *data, "data.batch_size=8", "trainer.epochs=1", "trainer.progress=false",
           "trainer.tensorboard=false", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names = [c["name"] for c in json.loads((tmp_path / "data" / "val.json").read_text())["categories"]]
    assert names == ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    two = json.loads((tmp_path / "run" / "eval.json").read_text())
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["data=synthetic_colours", *data,
                                                         f"checkpoint={tmp_path / 'run/checkpoints/last.pt'}"])
    one = run(cfg)
    assert two["box/boxes"] > 30
    assert {k: v for k, v in two.items() if k.startswith("box/")} == pytest.approx(
        {k: v for k, v in one.items() if k.startswith("box/")}, abs=1e-6)
