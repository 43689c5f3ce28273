"""Zero-shot classification over a class-per-folder directory, against a per-image loop."""

import json

import pytest
import torch
from PIL import Image

from fineclip.errors import AnnotationError, ProtocolError
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


def _loop(model, dataset, names, prompt):
    """top-1 / top-5 hits of a per-image loop, each class the normalised mean of its prompts' embeddings."""
    with torch.no_grad():
        classes = []
        for name in names:
            emb = torch.stack([model.encode_text([p])[0] for p in prompt(name)])
            mean = torch.nn.functional.normalize(emb, dim=-1).mean(0)
            classes.append(mean / mean.norm())
        hits1 = hits5 = 0
        for image, label in dataset:
            v = model.encode_image(model.normalize_pixels(image[None]))[0]
            scores = [float(v @ c) for c in classes]
            ranking = sorted(range(len(scores)), key=lambda k: -scores[k])
            hits1 += ranking[0] == label
            hits5 += label in ranking[:5]
    return hits1, hits5


def test_zero_shot_classification_equals_a_per_image_loop(tmp_path, tiny_model):
    root = _folder(tmp_path)
    templates = ["a {}", "the {} here"]
    metrics = zero_shot_classification(tiny_model, root, templates, batch_size=4)
    dataset, names = image_folder(root, 64)
    assert names == [f"thing{c}" for c in range(7)]
    hits1, hits5 = _loop(tiny_model, dataset, names, lambda name: [t.format(name) for t in templates])
    assert metrics["zeroshot/images"] == 14 and metrics["zeroshot/classes"] == 7
    assert metrics["zeroshot/top1"] == pytest.approx(100 * hits1 / 14)
    assert metrics["zeroshot/top5"] == pytest.approx(100 * hits5 / 14)


def test_the_openai_protocols_crop_the_centre_and_use_the_published_templates(tmp_path, tiny_model):
    from omegaconf import OmegaConf
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    from fineclip.eval.classification import ZEROSHOT_PROTOCOLS, ZeroShotClassification

    # the 80 templates of CLIP's ImageNet notebook and the 7-template ensemble, as open_clip ships them
    assert len(ZEROSHOT_PROTOCOLS["zeroshot_openai"].templates) == 80
    assert ZEROSHOT_PROTOCOLS["zeroshot_openai"].templates[0]("dog") == "a bad photo of a dog."
    assert [t("dog") for t in ZEROSHOT_PROTOCOLS["zeroshot_openai_7"].templates][:2] == [
        "itap of a dog.", "a bad photo of the dog."]
    # shortest side to the size, then the centre: a 40 x 20 image of red | green | blue thirds keeps its
    # green middle at 20 px; squashing would keep all three
    root = tmp_path / "stripes"
    (root / "a").mkdir(parents=True)
    stripes = torch.zeros(20, 40, 3, dtype=torch.uint8)
    stripes[:, :10, 0], stripes[:, 10:30, 1], stripes[:, 30:, 2] = 255, 255, 255
    Image.fromarray(stripes.numpy()).save(root / "a" / "0.png")
    cropped, _ = image_folder(root, 20, "shortest_crop")
    assert torch.equal(cropped[0][0], stripes[:, 10:30].permute(2, 0, 1))
    squashed, _ = image_folder(root, 20, "squash")
    assert squashed[0][0][0, :, 0].float().mean() > 200 and squashed[0][0][2, :, -1].float().mean() > 200

    # through the evaluator: the protocol is named in the metrics and the numbers are the loop's
    folder = _folder(tmp_path)
    cfg = OmegaConf.create({"eval": {"batch_size": 4}})
    metrics = ZeroShotClassification(str(folder), "zeroshot_openai_7")(tiny_model, cfg, "cpu")
    dataset, names = image_folder(folder, 64, "shortest_crop")
    hits1, hits5 = _loop(tiny_model, dataset, names, lambda name: [t(name) for t in SIMPLE_IMAGENET_TEMPLATES])
    assert metrics["zeroshot/protocol"] == "zeroshot_openai_7" and metrics["zeroshot/templates"] == 7
    assert metrics["zeroshot/top1"] == pytest.approx(100 * hits1 / 14)
    assert metrics["zeroshot/top5"] == pytest.approx(100 * hits5 / 14)
    custom = ZeroShotClassification(str(folder), "zeroshot_openai", templates=["a {}"])
    assert custom.protocol_name == "zeroshot_openai+templates"
    with pytest.raises(ProtocolError, match="zeroshot_protocol=imagenet"):
        ZeroShotClassification(str(folder), "imagenet")


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(AnnotationError, match="image folder not found"):
        image_folder(tmp_path / "absent", 32)
    root = _folder(tmp_path, classes=2, per_class=1)
    (root / "class_names.json").write_text(json.dumps({"n00000000": "a"}))
    with pytest.raises(AnnotationError, match="names no class"):
        image_folder(root, 32)
