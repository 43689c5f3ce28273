"""FineCLIP's released files read as they are (fineclip.data.convert_coco): the region-caption object
keyed by file name and integer box, coco_proposals.json as the boxes, and the retrieval test lists."""

import json
import subprocess
import sys

import pytest

from fineclip.data import RegionCaptionDataset
from fineclip.data.convert_coco import convert, parse_region_key, retrieval_list


def _coco(tmp_path, synthetic_root):
    """The synthetic train split as COCO's two files (instances with boxes, captions as annotations)."""
    data = json.loads((synthetic_root / "train.json").read_text())
    instances = {"images": data["images"], "categories": data["categories"],
                 "annotations": [{k: a[k] for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")}
                                 for a in data["annotations"]]}
    captions = {"images": data["images"], "annotations": data["captions"]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return data


def _key(file_name, bbox):
    return f"{file_name}_{'_'.join(str(int(v)) for v in bbox)}.jpg"


def test_region_key_parsing():
    assert parse_region_key("000000391895.jpg_359_146_112_213.jpg") == ("000000391895.jpg", (359, 146, 112, 213))
    assert parse_region_key("train/000001.png_3_4_10_12.jpg") == ("train/000001.png", (3, 4, 10, 12))
    assert parse_region_key("no_box.jpg") is None and parse_region_key("a.jpg_1_2_x_4.jpg") is None


def test_released_region_captions_become_the_regions(tmp_path, synthetic_root):
    data = _coco(tmp_path, synthetic_root)
    files = {im["id"]: im["file_name"] for im in data["images"]}
    released = {_key(files[a["image_id"]], a["bbox"]): a["caption"] for a in data["annotations"]}
    released["missing.jpg_1_1_20_20.jpg"] = "a caption of an image that is not there"
    (tmp_path / "region_captions.json").write_text(json.dumps(released))
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, "-m", "fineclip.data.convert_coco", "--instances",
                           str(tmp_path / "instances.json"), "--captions", str(tmp_path / "captions.json"),
                           "--region-captions", str(tmp_path / "region_captions.json"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = json.loads(out.read_text())
    expected = sorted((a["image_id"], [float(int(v)) for v in a["bbox"]], a["caption"]) for a in data["annotations"]
                      if int(a["bbox"][2]) * int(a["bbox"][3]) >= 64)
    assert sorted((a["image_id"], a["bbox"], a["caption"]) for a in written["annotations"]) == expected
    report = json.loads((tmp_path / "train.json.report.json").read_text())
    assert report["boxes"]["dropped: region-caption key matching no image"] == 1
    # the result is a training file: the reader gives every image its regions and captions
    dataset = RegionCaptionDataset.from_file(str(out), image_root=str(synthetic_root), train=True, max_regions=20)
    assert len(dataset) == len(data["images"])
    assert sum(len(dataset.records[i].boxes) for i in range(len(dataset))) == len(expected)


def test_released_proposals_are_matched_to_the_keys(tmp_path, synthetic_root):
    data = _coco(tmp_path, synthetic_root)
    files = {im["id"]: im["file_name"] for im in data["images"]}
    first, second, third = data["annotations"][:3]
    proposals = {"images": data["images"], "categories": [{"id": 1, "name": "object"}], "annotations": [
        {"id": 1, "image_id": first["image_id"], "category_id": 1, "bbox": [v + 0.4 for v in first["bbox"]]},  # trunc
        {"id": 2, "image_id": second["image_id"], "category_id": 1, "bbox": [v - 0.3 for v in second["bbox"]]},  # round
        {"id": 3, "image_id": third["image_id"], "category_id": 1, "bbox": [1.0, 1.0, 30.0, 30.0]},  # no caption
    ]}
    (tmp_path / "coco_proposals.json").write_text(json.dumps(proposals))
    released = {_key(files[a["image_id"]], a["bbox"]): a["caption"] for a in (first, second, third)}
    (tmp_path / "region_captions.json").write_text(json.dumps(released))
    result, report = convert(tmp_path / "instances.json", tmp_path / "captions.json", tmp_path / "region_captions.json",
                             proposals_json=tmp_path / "coco_proposals.json")
    got = [(a["image_id"], a["caption"], a["category_id"]) for a in result["annotations"]]
    assert got == [(first["image_id"], first["caption"], 0), (second["image_id"], second["caption"], 0)]
    assert result["annotations"][0]["bbox"] == pytest.approx([v + 0.4 for v in first["bbox"]])
    assert report["boxes"]["dropped: proposal box without region caption"] == 1
    assert report["boxes"]["dropped: region-caption key matching no proposal box"] == 1


def test_released_retrieval_list(tmp_path, synthetic_root):
    data = json.loads((synthetic_root / "val.json").read_text())
    texts = {}
    for c in data["captions"]:
        texts.setdefault(c["image_id"], []).append(c["caption"])
    items = [{"image": im["file_name"], "caption": texts[im["id"]]} for im in data["images"]]
    (tmp_path / "test.json").write_text(json.dumps(items))
    result, counts = retrieval_list(tmp_path / "test.json", synthetic_root)
    assert [im["file_name"] for im in result["images"]] == [im["file_name"] for im in data["images"]]
    assert [im["width"] for im in result["images"]] == [im["width"] for im in data["images"]]
    by_image = {}
    for c in result["captions"]:
        by_image.setdefault(c["image_id"], []).append(c["caption"])
    assert [by_image[i + 1] for i in range(len(items))] == [it["caption"] for it in items]
    assert counts["captions"] == len(data["captions"]) and result["annotations"] == []
