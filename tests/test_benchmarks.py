"""Benchmark readers and the COCO converter, on small files written in each real format."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fineclip.data import RegionCaptionDataset, load_region_annotations
from fineclip.data.convert_coco import convert
from fineclip.data.retrieval import load_coco_captions, load_karpathy_split
from fineclip.errors import AnnotationError
from fineclip.eval.metrics import retrieval_recall
from fineclip.models.prompts import cached_class_embeddings, class_embeddings, template_prompts


def _image(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 20, 200)).save(path)


def _coco_captions_fixture(tmp_path):
    for i in (1, 2, 3):
        _image(tmp_path / "val2017" / f"{i:012d}.jpg")
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in (1, 2, 3, 4)]
    annotations = [{"id": 10 + k, "image_id": 1, "caption": f" caption {k} of one "} for k in range(7)]
    annotations += [{"id": 30, "image_id": 2, "caption": "   "}]  # image 2: only an empty caption
    annotations += [{"id": 40 + k, "image_id": 3, "caption": f"three {k}"} for k in range(5)]
    annotations += [{"id": 50, "image_id": 4, "caption": "no file on disk"}]  # image 4: missing file
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_captions_keeps_five_per_image_and_counts_what_it_drops(tmp_path):
    ann = load_coco_captions(_coco_captions_fixture(tmp_path), tmp_path / "val2017")
    assert [r.image_id for r in ann.records] == [1, 3]
    assert ann.records[0].captions == [f"caption {k} of one" for k in range(5)]
    assert ann.records[1].captions == [f"three {k}" for k in range(5)]
    assert ann.stats["extra_caption"] == 2 and ann.stats["empty_caption"] == 1
    assert ann.stats["no_caption"] == 1 and ann.stats["missing_image"] == 1
    assert all(len(r.boxes) == 0 for r in ann.records)


def test_coco_captions_names_a_record_without_caption_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"images": [], "annotations": [{"id": 7, "image_id": 1}]}))
    with pytest.raises(AnnotationError, match=r"bad.json: annotation id=7 lacks field\(s\) \['caption'\]"):
        load_coco_captions(path, tmp_path)


def _karpathy_entry(filename, split, n_sentences, filepath=None, cocoid=None):
    entry = {"filename": filename, "split": split, "imgid": 0,
             "sentences": [{"raw": f"{filename} sentence {k}.", "tokens": []} for k in range(n_sentences)]}
    if filepath is not None:
        entry["filepath"] = filepath
    if cocoid is not None:
        entry["cocoid"] = cocoid
    return entry


def test_karpathy_coco_split_uses_filepath_cocoid_and_the_image_size(tmp_path):
    _image(tmp_path / "val2014" / "a.jpg", (50, 20))
    _image(tmp_path / "train2014" / "b.jpg", (30, 60))
    _image(tmp_path / "val2014" / "c.jpg")
    data = {"dataset": "coco", "images": [
        _karpathy_entry("a.jpg", "test", 6, "val2014", cocoid=11),
        _karpathy_entry("b.jpg", "test", 5, "train2014", cocoid=22),
        _karpathy_entry("c.jpg", "restval", 5, "val2014", cocoid=33),
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    ann = load_karpathy_split(tmp_path / "dataset_coco.json", tmp_path, split="test")
    assert [(r.image_id, r.path.name, r.width, r.height) for r in ann.records] == [(11, "a.jpg", 50, 20),
                                                                                   (22, "b.jpg", 30, 60)]
    assert ann.records[0].captions == [f"a.jpg sentence {k}." for k in range(5)]
    assert ann.stats["extra_caption"] == 1 and ann.stats["captions"] == 10


def test_karpathy_flickr_split_without_filepath(tmp_path):
    for name in ("1.jpg", "2.jpg"):
        _image(tmp_path / "flickr30k-images" / name)
    data = {"dataset": "flickr30k", "images": [_karpathy_entry("1.jpg", "train", 5),
                                                _karpathy_entry("2.jpg", "test", 5)]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    dataset = RegionCaptionDataset.from_karpathy(
        str(tmp_path / "dataset_flickr30k.json"), str(tmp_path / "flickr30k-images"), image_size=32
    )
    assert len(dataset) == 1 and not dataset.train
    item = dataset[0]
    assert item["caption"] == [f"2.jpg sentence {k}." for k in range(5)]
    assert item["image"].shape == (3, 32, 32) and len(item["boxes"]) == 0
    with pytest.raises(AnnotationError, match="no image with split='val'"):
        load_karpathy_split(tmp_path / "dataset_flickr30k.json", tmp_path / "flickr30k-images", split="val")


def test_coco_instances_for_box_classification(tmp_path):
    _image(tmp_path / "val2017" / "1.jpg", (40, 30))
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 40, "height": 30}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "bbox": [2, 3, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # clipped
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 0},  # 25 px²
        ],
    }
    (tmp_path / "instances_val2017.json").write_text(json.dumps(data))
    dataset = RegionCaptionDataset.from_instances(
        str(tmp_path / "instances_val2017.json"), str(tmp_path / "val2017"), image_size=20
    )
    assert dataset.categories == {1: "person", 18: "dog"}
    record = dataset.records[0]
    assert record.boxes.tolist() == [[2, 3, 22, 13], [30, 20, 40, 30]]
    assert record.category_ids.tolist() == [18, 1] and record.captions == []
    assert dataset.stats["small_box"] == 1 and dataset.stats["clipped_box"] == 1
    # boxes rescaled to the 20x20 input: x by 20/40, y by 20/30
    assert dataset[0]["boxes"][0].tolist() == pytest.approx([1, 2, 11, 26 / 3])


def _write_converter_inputs(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 80} for i in (1, 2, 3)]
    instances = {
        "images": images,
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "kite"}],
        "annotations": [
            {"id": 101, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 40], "iscrowd": 0},  # captioned
            {"id": 102, "image_id": 1, "category_id": 5, "bbox": [50, 5, 20, 20], "iscrowd": 0},  # no caption
            {"id": 103, "image_id": 2, "category_id": 1, "bbox": [0, 0, 60, 60], "iscrowd": 1},  # crowd
            {"id": 104, "image_id": 2, "category_id": 5, "bbox": [5, 5, 4, 4], "iscrowd": 0},  # 16 px²
        ],
    }
    captions = {"images": images, "annotations": [
        {"id": 1, "image_id": 1, "caption": "a person flying a kite"},
        {"id": 2, "image_id": 2, "caption": "a crowd"},
        {"id": 3, "image_id": 2, "caption": "  "},
        {"id": 4, "image_id": 99, "caption": "unknown image"},
    ]}
    regions = [
        {"annotation_id": 101, "caption": "a woman in a red coat"},
        {"annotation_id": 103, "caption": "many people"},
        {"annotation_id": 104, "caption": "a tiny kite"},
        {"annotation_id": 555, "caption": "no such box"},
        {"image_id": 3, "bbox": [20, 20, 40, 30], "caption": "a green field"},
        {"image_id": 3, "bbox": [0, 0, 10, 10], "caption": "", "category_id": 5},
        {"image_id": 77, "bbox": [0, 0, 10, 10], "caption": "unknown image"},
    ]
    paths = [tmp_path / "instances.json", tmp_path / "captions.json", tmp_path / "regions.json"]
    for path, obj in zip(paths, (instances, captions, regions), strict=True):
        path.write_text(json.dumps(obj))
    return paths


def test_converter_reports_what_it_kept_and_dropped(tmp_path):
    data, report = convert(*_write_converter_inputs(tmp_path))
    assert dict(report["boxes"]) == {
        "kept": 2,
        "dropped: COCO box without region caption": 1,
        "dropped: crowd box": 1,
        "dropped: box under min_box_area": 1,
        "dropped: unknown annotation_id": 1,
        "dropped: empty region caption": 1,
        "dropped: unknown image_id": 1,
    }
    assert dict(report["captions"]) == {"kept": 2, "dropped: empty caption": 1, "dropped: unknown image_id": 1}
    assert report["images"]["without caption (skipped when training)"] == 1  # image 3
    boxes = [(a["image_id"], a["category_id"], a["bbox"], a["caption"]) for a in data["annotations"]]
    assert boxes == [(1, 1, [10, 10, 30, 40], "a woman in a red coat"), (3, 0, [20, 20, 40, 30], "a green field")]
    assert data["categories"][0] == {"id": 0, "name": "region", "supercategory": "region"}


def test_converter_output_is_read_by_the_training_reader(tmp_path):
    out = tmp_path / "fineclip_train2017.json"
    instances, captions, regions = _write_converter_inputs(tmp_path)
    for i in (1, 2, 3):
        _image(tmp_path / "train2017" / f"{i}.jpg", (100, 80))
    result = subprocess.run(
        [sys.executable, "-m", "fineclip.data.convert_coco", "--instances", str(instances), "--captions",
         str(captions), "--region-captions", str(regions), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "dropped: crowd box" in result.stdout and out.with_name(out.name + ".report.json").is_file()
    ann = load_region_annotations(out, tmp_path / "train2017")
    assert [r.image_id for r in ann.records] == [1, 2]  # image 3 has no caption
    assert ann.records[0].region_captions == ["a woman in a red coat"]
    assert ann.records[0].boxes.tolist() == [[10, 10, 40, 50]]


def test_converter_names_a_bad_region_record(tmp_path):
    instances, captions, regions = _write_converter_inputs(tmp_path)
    regions.write_text(json.dumps([{"image_id": 1, "caption": "no box"}]))
    with pytest.raises(AnnotationError, match=r"regions.json: record 0 .*lacks field\(s\) \['bbox'\]"):
        convert(instances, captions, regions)


def test_class_embeddings_are_cached_per_weights_classes_and_templates(tmp_path, frozen_text_model):
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return frozen_text_model.encode_text(texts)

    names, templates = ["circle", "square"], ["a {}", "the {}"]

    def cached(class_names, class_templates):
        prompts = template_prompts(class_names, class_templates)
        return cached_class_embeddings(frozen_text_model, encode, prompts, tmp_path)

    first = cached(names, templates)
    assert calls == [4] and len(list(tmp_path.glob("*.pt"))) == 1
    again = cached(names, templates)
    assert calls == [4] and torch.equal(first, again)
    assert torch.allclose(first, class_embeddings(frozen_text_model.encode_text, names, templates))
    cached(names, ["a {}"])  # other templates
    cached(["circle"], templates)  # other classes
    with torch.no_grad():
        frozen_text_model.clip.token_embedding.weight.add_(0.01)  # other text weights
    cached(names, templates)
    assert calls == [4, 2, 2, 4] and len(list(tmp_path.glob("*.pt"))) == 4


def test_retrieval_only_evaluation_matches_recall_on_the_embeddings(tmp_path, tiny_model):
    from fineclip.eval import evaluate, extract_features

    dataset = RegionCaptionDataset.from_coco_captions(
        str(_coco_captions_fixture(tmp_path)), str(tmp_path / "val2017"), image_size=64
    )
    metrics = evaluate(tiny_model, dataset, progress=False)
    assert not any(k.startswith("box/") for k in metrics)
    feats = extract_features(tiny_model, dataset, progress=False)
    assert feats["text_to_image"].tolist() == [0] * 5 + [1] * 5
    expected = retrieval_recall(feats["image_emb"], feats["text_emb"], feats["text_to_image"])
    assert metrics == {**{f"retrieval/{k}": v for k, v in expected.items()}, "retrieval/protocol": "retrieval_default",
                       "retrieval/images": 2.0, "retrieval/t2i_queries": 10.0, "missing_images": 1.0}
