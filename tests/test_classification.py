"""Zero-shot classification over a class-per-folder directory, against a per-image loop."""

import json

import pytest
import torch
from PIL import Image

from fineclip.errors import AnnotationError
from fineclip.eval.classification import image_folder, zero_shot_classification


def _folder(tmp_path, classes=7, per_class=2):
    root = tmp_path / "val"
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(root / f"n{c:08d}" / f"{i}.png")
    names = {f"n{c:08d}": f"thing{c}" for c in range(classes)}
    (root / "class_names.json").write_text(json.dumps(names))
    return root


def test_zero_shot_classification_equals_a_per_image_loop(tmp_path, tiny_model):
    root = _folder(tmp_path)
    templates = ["a {}", "the {} here"]
    metrics = zero_shot_classification(tiny_model, root, templates, batch_size=4)
    dataset, names = image_folder(root, 64)
    assert names == [f"thing{c}" for c in range(7)]
    with torch.no_grad():
        classes = []
        for name in names:
            emb = torch.stack([tiny_model.encode_text([t.format(name)])[0] for t in templates])
            mean = torch.nn.functional.normalize(emb, dim=-1).mean(0)
            classes.append(mean / mean.norm())
        hits1 = hits5 = 0
        for image, label in dataset:
            v = tiny_model.encode_image(tiny_model.normalize_pixels(image[None]))[0]
            scores = [float(v @ c) for c in classes]
            ranking = sorted(range(len(scores)), key=lambda k: -scores[k])
            hits1 += ranking[0] == label
            hits5 += label in ranking[:5]
    assert metrics["zeroshot/images"] == 14 and metrics["zeroshot/classes"] == 7
    assert metrics["zeroshot/top1"] == pytest.approx(100 * hits1 / 14)
    assert metrics["zeroshot/top5"] == pytest.approx(100 * hits5 / 14)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(AnnotationError, match="image folder not found"):
        image_folder(tmp_path / "absent", 32)
    root = _folder(tmp_path, classes=2, per_class=1)
    (root / "class_names.json").write_text(json.dumps({"n00000000": "a"}))
    with pytest.raises(AnnotationError, match="names no class"):
        image_folder(root, 32)
