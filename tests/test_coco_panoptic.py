import json

import numpy as np
import pytest
from PIL import Image

from fineclip.data.coco_panoptic import load_panoptic_boxes


def _rgb(segment_id):
    return (segment_id % 256, (segment_id // 256) % 256, segment_id // (256 * 256))


def _write_fixture(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "panoptic_val2017").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "val2017" / "1.jpg")
    ids = np.zeros((30, 40), dtype=np.int64)
    ids[2:12, 5:25] = 1001        # a thing; its json box is deliberately different from the mask
    ids[20:30, 0:40] = 70000      # stuff "road": rows 20-29, all columns -> box (0, 20, 40, 30)
    ids[0:3, 30:33] = 70001       # stuff of 9 px²: dropped
    ids[14:18, 30:38] = 300       # a small thing (bbox 8x4 = 32 px²): dropped
    png = np.stack([np.vectorize(lambda v, c=c: _rgb(int(v))[c])(ids) for c in range(3)], axis=-1)
    Image.fromarray(png.astype(np.uint8)).save(tmp_path / "panoptic_val2017" / "1.png")
    data = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 40, "height": 30}],
        "categories": [
            {"id": 1, "name": "person", "isthing": 1},
            {"id": 149, "name": "road", "isthing": 0},
            {"id": 184, "name": "tree", "isthing": 0},
        ],
        "annotations": [{
            "image_id": 1, "file_name": "1.png",
            "segments_info": [
                {"id": 1001, "category_id": 1, "bbox": [4, 1, 22, 12], "area": 200, "iscrowd": 0},
                {"id": 70000, "category_id": 149, "bbox": [0, 0, 1, 1], "area": 400, "iscrowd": 0},
                {"id": 70001, "category_id": 184, "bbox": [30, 0, 3, 3], "area": 9, "iscrowd": 0},
                {"id": 300, "category_id": 1, "bbox": [30, 14, 8, 4], "area": 32, "iscrowd": 0},
            ],
        }],
    }
    (tmp_path / "panoptic_val2017.json").write_text(json.dumps(data))


def test_panoptic_boxes_things_from_json_stuff_from_the_png(tmp_path):
    _write_fixture(tmp_path)
    ann = load_panoptic_boxes(tmp_path / "panoptic_val2017.json", tmp_path / "panoptic_val2017", tmp_path / "val2017")
    record = ann.records[0]
    assert record.boxes.tolist() == [[4, 1, 26, 13], [0, 20, 40, 30]]
    assert record.category_ids.tolist() == [1, 149]
    assert ann.stats["small_box"] == 2
    assert ann.categories == {1: "person", 149: "road", 184: "tree"}
    capped = load_panoptic_boxes(tmp_path / "panoptic_val2017.json", tmp_path / "panoptic_val2017",
                                 tmp_path / "val2017", max_boxes=1)
    assert capped.records[0].boxes.tolist() == [[4, 1, 26, 13]] and capped.stats["over_max_boxes"] == 1


def test_box_only_evaluation_on_panoptic_boxes(tmp_path, tiny_model):
    from fineclip.data import RegionCaptionDataset
    from fineclip.eval import evaluate, extract_features, format_metrics
    from fineclip.eval.box_retrieval import BoxRetrieval
    from fineclip.models.prompts import class_embeddings

    _write_fixture(tmp_path)
    dataset = RegionCaptionDataset.from_panoptic(
        str(tmp_path / "panoptic_val2017.json"), str(tmp_path / "panoptic_val2017"), str(tmp_path / "val2017"),
        image_size=64,
    )
    metrics = evaluate(tiny_model, dataset, templates=["a photo of a {}."], progress=False)
    assert not any(k.startswith("retrieval/") for k in metrics)
    # by hand: the two boxes' pooled features (person, road) against the three class prompts
    feats = extract_features(tiny_model, dataset, progress=False)
    classes = class_embeddings(tiny_model.encode_text, ["person", "road", "tree"], ["a photo of a {}."])
    hits = [(feats["box_emb"][i] @ classes.t()).argmax().item() == label for i, label in enumerate([0, 1])]
    assert metrics["box/top1"] == pytest.approx(100 * sum(hits) / 2)  # two classes, one box each
    assert metrics["box/overall_top1"] == pytest.approx(100 * sum(hits) / 2)
    assert (metrics["box/boxes"], metrics["box/images"], metrics["box/protocol"]) == (2, 1, "box_default")
    text = format_metrics(metrics, [BoxRetrieval()])
    assert "retrieval" not in text and "2 boxes on 1 images" in text


def test_thing_and_stuff_accuracy_are_per_class_means_over_each_kind(tmp_path, tiny_model):
    from fineclip.data import RegionCaptionDataset
    from fineclip.eval import evaluate, extract_features
    from fineclip.models.prompts import class_embeddings

    _write_fixture(tmp_path)
    dataset = RegionCaptionDataset.from_panoptic(
        str(tmp_path / "panoptic_val2017.json"), str(tmp_path / "panoptic_val2017"), str(tmp_path / "val2017"),
        image_size=64,
    )
    assert dataset.stuff_ids == {149, 184}
    templates = ["a photo of a {}."]
    metrics = evaluate(tiny_model, dataset, templates=templates, progress=False)
    feats = extract_features(tiny_model, dataset, progress=False)
    classes = class_embeddings(tiny_model.encode_text, ["person", "road", "tree"], templates)
    predicted = (feats["box_emb"] @ classes.t()).argmax(dim=1).tolist()  # boxes: person, road
    assert metrics["box/thing_top1"] == 100.0 * (predicted[0] == 0)
    assert metrics["box/stuff_top1"] == 100.0 * (predicted[1] == 1)
    assert metrics["box/thing_top5"] == metrics["box/stuff_top5"] == 100.0  # 3 classes
