"""The named evaluation protocols against independent computations on small COCO-format fixtures:
the prompt strings, the image resizing, the boxes, crops and masks, and the metrics."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image
from torchvision.ops import roi_align

from fineclip.cli import CONFIG_DIR
from fineclip.engine.rng import seed_everything
from fineclip.errors import MissingImagesError
from fineclip.eval.protocols import VILD_TEMPLATES, vild_prompts
from fineclip.evaluate import run as evaluate_run

MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)


def test_vild_prompts_of_awkward_names():
    assert len(VILD_TEMPLATES) == 63 and len(set(VILD_TEMPLATES)) == 63
    sky = vild_prompts("sky-other-merged")
    assert sky[:3] == ["There is a sky-other-merged in the scene.", "There is the sky-other-merged in the scene.",
                       "This is a photo of a sky-other-merged in the scene."]
    assert sky[5:8] == ["itap of a sky-other-merged.", "itap of my sky-other-merged.", "itap of the sky-other-merged."]
    hair = vild_prompts("hair drier")
    assert hair[8] == "This is a photo of a hair drier." and hair[-1] == "This is a painting of a hair drier."
    assert hair[59] == "This is an embroidered hair drier." and hair[52] == "This is the plastic hair drier."
    tv = vild_prompts("tv")
    assert tv[0] == "There is a tv in the scene." and tv[13] == "This is a good photo of a tv."
    assert sum(p.startswith("This is ") for p in tv) == 58  # all but the 2 "There is" and 3 "itap of"
    # name processing: "_" -> " ", "/" -> " or ", lower case, no final dot; a/an from the raw name's first letter
    assert vild_prompts("Traffic_light/Signal.")[0] == "There is a traffic light or signal in the scene."
    assert vild_prompts("apple")[8] == "This is a photo of an apple."


def _rgb(segment_id):
    return (segment_id % 256, (segment_id // 256) % 256, segment_id // (256 * 256))


def _noise_image(path, size, seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 5 + 1, size[0] // 5 + 1, 3), dtype=np.uint8)
    Image.fromarray(small).resize(size, Image.NEAREST).save(path)


def _panoptic_root(tmp_path):
    """COCO layout: val2017/1.png (40x30), annotations/panoptic_val2017.json + its PNG folder."""
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations" / "panoptic_val2017").mkdir(parents=True)
    _noise_image(tmp_path / "val2017" / "1.png", (40, 30), 0)
    ids = np.zeros((30, 40), dtype=np.int64)
    ids[2:12, 5:25] = 1001        # person (thing): json box differs from the mask on purpose
    ids[20:30, 0:40] = 70000      # road (stuff): rows 20-29, all columns
    ids[12:20, 26:40] = 70002     # tree (stuff): rows 12-19, columns 26-39
    ids[0:3, 30:33] = 70001       # tree, 3x3 pixels: its box is under 64 px², dropped
    png = np.stack([np.vectorize(lambda v, c=c: _rgb(int(v))[c])(ids) for c in range(3)], axis=-1)
    Image.fromarray(png.astype(np.uint8)).save(tmp_path / "annotations" / "panoptic_val2017" / "1.png")
    data = {
        "images": [{"id": 1, "file_name": "1.png", "width": 40, "height": 30}],
        "categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "tv", "isthing": 1},
                       {"id": 149, "name": "road", "isthing": 0}, {"id": 184, "name": "tree-merged", "isthing": 0}],
        "annotations": [{"image_id": 1, "file_name": "1.png", "segments_info": [
            {"id": 1001, "category_id": 1, "bbox": [4, 1, 22, 12], "area": 200, "iscrowd": 0},
            {"id": 70000, "category_id": 149, "bbox": [0, 0, 1, 1], "area": 400, "iscrowd": 0},
            {"id": 70002, "category_id": 184, "bbox": [0, 0, 1, 1], "area": 112, "iscrowd": 0},
            {"id": 70001, "category_id": 184, "bbox": [30, 0, 3, 3], "area": 9, "iscrowd": 0},
        ]}],
    }
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(json.dumps(data))
    return tmp_path


def _evaluate(tmp_path, *overrides):
    args = ["model=tiny", f"cache_dir={tmp_path / 'cache'}", "eval.class_cache_dir=null", *overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=args)
    return evaluate_run(cfg), cfg


def _model(cfg, image_size=None):
    from hydra.utils import instantiate

    seed_everything(cfg.seed)  # as the evaluation builds it: the same random weights
    model = instantiate(cfg.model).eval()
    if image_size:
        big = instantiate(cfg.model, image_size=image_size).eval()
        from fineclip.models.factory import load_model_weights

        load_model_weights(big, model.state_dict(), "test")
        return model, big
    return model


@torch.no_grad()
def _classes(model, names):
    out = []
    for name in names:
        emb = F.normalize(model.clip.encode_text(model.tokenizer(vild_prompts(name))), dim=-1)
        out.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(out)


def _mean_per_class(logits, labels, k):
    hits = (logits.topk(min(k, logits.shape[1]), dim=1).indices == labels[:, None]).any(1).float()
    return 100 * torch.stack([hits[labels == c].mean() for c in labels.unique()]).mean().item()


def _pixels(array):
    return ((torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255 - MEAN) / STD)[None]


@torch.no_grad()
def test_box_fc_on_panoptic_against_a_hand_computation(tmp_path):
    root = _panoptic_root(tmp_path)
    metrics, cfg = _evaluate(tmp_path, "data=coco_panoptic", f"data.root={root}")  # the data set's own: box_fc
    assert metrics["box/protocol"] == "box_fc" and metrics["box/images"] == 1 and metrics["box/boxes"] == 3
    model = _model(cfg)
    image = np.asarray(Image.open(root / "val2017" / "1.png").convert("RGB").resize((64, 64), Image.BILINEAR))
    _, dense = model.encode_image_dense(_pixels(image))
    # person: the json box; road and tree: the mask's box with the last pixel's index as far edge
    boxes = torch.tensor([[4, 1, 26, 13], [0, 20, 39, 29], [26, 12, 39, 19]], dtype=torch.float32)
    boxes = boxes * torch.tensor([64 / 40, 64 / 30, 64 / 40, 64 / 30])
    rois = roi_align(dense, [boxes], (1, 1), spatial_scale=1 / 8, sampling_ratio=-1, aligned=True).flatten(1)
    logits = F.normalize(rois, dim=-1) @ _classes(model, ["person", "tv", "road", "tree-merged"]).t()
    labels = torch.tensor([0, 2, 3])
    assert metrics["box/top1"] == pytest.approx(_mean_per_class(logits, labels, 1), abs=1e-4)
    assert metrics["box/top5"] == 100.0  # 4 classes
    assert metrics["box/stuff_top1"] == pytest.approx(_mean_per_class(logits[1:], labels[1:], 1), abs=1e-4)


@torch.no_grad()
def test_box_cs_longest_side_64_patches_with_crops_and_mask_pooling(tmp_path):
    root = _panoptic_root(tmp_path)
    metrics, cfg = _evaluate(tmp_path, "data=coco_panoptic", f"data.root={root}", "eval.protocol=box_cs")
    assert metrics["box/protocol"] == "box_cs" and "box/top1" not in metrics  # thing and stuff apart only
    model, big = _model(cfg, image_size=512)  # tiny: patch 8 -> 64 patches = 512 px
    original = Image.open(root / "val2017" / "1.png").convert("RGB")
    canvas = np.zeros((512, 512, 3), dtype=np.uint8)  # 40x30 -> 512x384, padded below
    canvas[:384] = np.asarray(original.resize((512, 384), Image.BICUBIC))
    _, dense = big.encode_image_dense(_pixels(canvas))
    boxes = torch.tensor([[4, 1, 26, 13], [0, 20, 39, 29], [26, 12, 39, 19]], dtype=torch.float32) * 12.8
    rois = F.normalize(roi_align(dense, [boxes], (1, 1), 1 / 8, -1, True).flatten(1), dim=-1)
    classes = _classes(model, ["person", "tv", "road", "tree-merged"])
    labels = torch.tensor([0, 2, 3])
    logits = rois @ classes.t()
    assert metrics["box/thing_top1"] == pytest.approx(_mean_per_class(logits[:1], labels[:1], 1), abs=1e-4)
    assert metrics["box/stuff_top1"] == pytest.approx(_mean_per_class(logits[1:], labels[1:], 1), abs=1e-4)
    # crops: the thing box 1.5x about its centre, clipped; stuff boxes as they are; letterboxed to 64
    crops = []
    for (x1, y1, x2, y2), thing in zip([(4, 1, 26, 13), (0, 20, 39, 29), (26, 12, 39, 19)], [1, 0, 0], strict=True):
        if thing:
            cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, 0.75 * (x2 - x1), 0.75 * (y2 - y1)
            x1, y1, x2, y2 = max(cx - hw, 0), max(cy - hh, 0), min(cx + hw, 40), min(cy + hh, 30)
        crop = original.crop((x1, y1, x2, y2))
        scale = 64 / max(crop.size)
        w, h = round(crop.width * scale), round(crop.height * scale)
        box = np.zeros((64, 64, 3), dtype=np.uint8)
        box[(64 - h) // 2 : (64 - h) // 2 + h, (64 - w) // 2 : (64 - w) // 2 + w] = np.asarray(
            crop.resize((w, h), Image.BICUBIC))
        crops.append(_pixels(box))
    crop_logits = F.normalize(model.clip.encode_image(torch.cat(crops)), dim=-1) @ classes.t()
    assert metrics["box/crop_stuff_top1"] == pytest.approx(_mean_per_class(crop_logits[1:], labels[1:], 1), abs=1e-4)
    assert metrics["box/crop_thing_top1"] == pytest.approx(_mean_per_class(crop_logits[:1], labels[:1], 1), abs=1e-4)
    # mask pooling: each segment's mask, resized like the image to the 64x48 part of the grid, > 0
    ids = np.asarray(Image.open(root / "annotations" / "panoptic_val2017" / "1.png").convert("RGB"), dtype=np.int64)
    ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
    pooled = []
    for segment in (1001, 70000, 70002):
        mask = torch.from_numpy(ids == segment).float()[None, None]
        small = F.interpolate(mask, size=(48, 64), mode="bicubic", antialias=True, align_corners=False)[0, 0] > 0
        grid = torch.zeros(64, 64, dtype=torch.bool)
        grid[:48] = small
        tokens = dense[0][:, grid]  # (D, n)
        pooled.append(F.normalize(tokens.mean(1), dim=0))
    mask_logits = torch.stack(pooled) @ classes.t()
    assert metrics["box/maskpool_stuff_top1"] == pytest.approx(_mean_per_class(mask_logits[1:], labels[1:], 1),
                                                               abs=1e-4)
    assert metrics["box/maskpool_thing_top1"] == pytest.approx(_mean_per_class(mask_logits[:1], labels[:1], 1),
                                                               abs=1e-4)


def _instances_root(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    _noise_image(tmp_path / "val2017" / "1.png", (40, 30), 1)
    _noise_image(tmp_path / "val2017" / "2.png", (30, 40), 2)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 18, "bbox": [2, 3, 20, 10], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 10, 16, 18], "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 30], "iscrowd": 1},  # crowd: dropped
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 30], "iscrowd": 0},
    ]
    data = {"images": [{"id": 1, "file_name": "1.png", "width": 40, "height": 30},
                       {"id": 2, "file_name": "2.png", "width": 30, "height": 40}],
            "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 20, "name": "sheep"}],
            "annotations": anns}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return tmp_path


@torch.no_grad()
def test_box_fg_per_box_accuracy_on_instances_without_crowd_boxes(tmp_path):
    root = _instances_root(tmp_path)
    metrics, cfg = _evaluate(tmp_path, "data=coco_instances", f"data.root={root}")  # the data set's own: box_fg
    assert metrics["box/protocol"] == "box_fg" and metrics["box/boxes"] == 3  # the crowd box is not scored
    model = _model(cfg)
    classes = _classes(model, ["person", "dog", "sheep"])
    feats, crops = [], []
    for name, boxes in (("1.png", [[2, 3, 22, 13], [20, 10, 36, 28]]), ("2.png", [[5, 5, 25, 35]])):
        image = Image.open(root / "val2017" / name).convert("RGB")
        _, dense = model.encode_image_dense(_pixels(np.asarray(image.resize((64, 64), Image.BILINEAR))))
        scaled = torch.tensor(boxes, dtype=torch.float32) * torch.tensor([64 / image.width, 64 / image.height] * 2)
        feats.append(F.normalize(roi_align(dense, [scaled], (1, 1), 1 / 8, -1, True).flatten(1), dim=-1))
        crops += [_pixels(np.asarray(image.crop(tuple(b)).resize((64, 64), Image.BICUBIC))) for b in boxes]
    labels = torch.tensor([1, 0, 0])
    logits = torch.cat(feats) @ classes.t()
    per_box = 100 * (logits.argmax(1) == labels).float().mean().item()
    assert metrics["box/top1"] == pytest.approx(per_box, abs=1e-4)
    assert metrics["box/mean_top1"] == pytest.approx(_mean_per_class(logits, labels, 1), abs=1e-4)
    crop_logits = F.normalize(model.clip.encode_image(torch.cat(crops)), dim=-1) @ classes.t()
    assert metrics["box/crop_top1"] == pytest.approx(100 * (crop_logits.argmax(1) == labels).float().mean().item(),
                                                     abs=1e-4)


def _captions_root(tmp_path, missing=False):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in (1, 2):
        _noise_image(tmp_path / "val2017" / f"{i}.png", (40, 30), i)
    ids = (1, 2, 3) if missing else (1, 2)  # image 3 has a caption but no file
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in ids]
    anns = [{"id": k, "image_id": 1, "caption": f"one {k}"} for k in range(7)]
    anns += [{"id": 10 + k, "image_id": 2, "caption": f"two {k}"} for k in range(6)]
    anns += [{"id": 30, "image_id": 3, "caption": "three"}] if missing else []
    data = {"images": images, "annotations": anns}
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    return tmp_path


def test_retrieval_fc_scores_every_caption_and_karpathy_five(tmp_path):
    root = _captions_root(tmp_path)
    every, _ = _evaluate(tmp_path, "data=coco_captions", f"data.root={root}")
    assert every["retrieval/protocol"] == "retrieval_fc"
    assert (every["retrieval/images"], every["retrieval/t2i_queries"]) == (2, 13)
    five, _ = _evaluate(tmp_path, "data=coco_captions", f"data.root={root}", "eval.protocol=retrieval_karpathy")
    assert five["retrieval/protocol"] == "retrieval_karpathy" and five["retrieval/t2i_queries"] == 10


def test_a_missing_benchmark_image_stops_the_evaluation_unless_allowed(tmp_path):
    root = _captions_root(tmp_path, missing=True)
    with pytest.raises(MissingImagesError, match=r"1 image\(s\) of the benchmark are missing.*:\n  \S*val2017/3.png\n"):
        _evaluate(tmp_path, "data=coco_captions", f"data.root={root}")
    metrics, _ = _evaluate(tmp_path, "data=coco_captions", f"data.root={root}", "eval.allow_missing=true",
                           f"output={tmp_path / 'metrics.json'}")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["missing_images"] == 1 and saved["retrieval/images"] == 2 and saved == metrics


def test_a_protocol_on_the_wrong_data_is_refused(tmp_path):
    from fineclip.errors import ProtocolError

    root = _instances_root(tmp_path)
    with pytest.raises(ProtocolError, match="box_cs is defined on data=coco_panoptic, not on data=coco_instances"):
        _evaluate(tmp_path, "data=coco_instances", f"data.root={root}", "eval.protocol=box_cs")
