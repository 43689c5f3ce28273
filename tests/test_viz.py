"""The arrays behind fineclip.viz's pictures: K-means maps, PCA colours, text heatmaps (aligned with the
image), the confusion matrix and the curves, each against an independent computation."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fineclip.eval.maps import kmeans_map, pca_rgb, text_heatmap


def test_kmeans_map_has_the_requested_clusters_on_the_token_grid():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (6, 8), generator=g)
    centres = F.normalize(torch.randn(4, 16, generator=g), dim=1) * 5
    dense = (centres[truth] + 0.05 * torch.randn(6, 8, 16, generator=g)).permute(2, 0, 1)  # (D, h, w)
    labels = kmeans_map(dense, k=4, seed=0)
    assert labels.shape == (6, 8) and len(labels.unique()) == 4
    pairs = set(zip(truth.flatten().tolist(), labels.flatten().tolist(), strict=True))
    assert len(pairs) == 4  # the same partition as the truth, up to the cluster names


def test_pca_rgb_follows_the_principal_axes():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(10, 5, 7, generator=g)
    rgb = pca_rgb(dense)
    assert rgb.shape == (5, 7, 3) and rgb.min() >= 0 and rgb.max() <= 1
    x = dense.reshape(10, 35).t().double().numpy()
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    for c in range(3):
        coord = x @ vt[c]
        expected = (coord - coord.min()) / (coord.max() - coord.min())
        got = rgb[..., c].flatten().double().numpy()
        assert min(np.abs(got - expected).max(), np.abs(got - (1 - expected)).max()) < 1e-4  # up to the sign


def test_text_heatmap_is_the_cosine_per_token_and_lines_up_with_the_image(synthetic_root):
    g = torch.Generator().manual_seed(2)
    dense, text = torch.randn(8, 4, 5, generator=g), torch.randn(8, generator=g)
    at_grid = text_heatmap(dense, text, (4, 5))
    for i in range(4):
        for j in range(5):
            assert at_grid[i, j].item() == pytest.approx(F.cosine_similarity(dense[:, i, j], text, dim=0).item(),
                                                         abs=1e-6)
    # oracle tokens (each 8 x 8 cell's class fractions) and one-hot texts: the heatmap of an object's
    # class peaks inside that object's mask, unless a rotation or flip broke the alignment
    from fineclip.eval.segmentation import IGNORE, SegmentationSet

    dataset = SegmentationSet.from_instances(str(synthetic_root / "val.json"), size=64)
    inside = total = 0
    for index in range(len(dataset)):
        _, label = dataset[index]
        onehot = F.one_hot(torch.where(label == IGNORE, 12, label).long(), 13).permute(2, 0, 1).float()
        cells = F.avg_pool2d(onehot[None], 8)[0]  # (13, 8, 8)
        for c in label.unique().tolist():
            if c == IGNORE:
                continue
            heat = text_heatmap(cells, F.one_hot(torch.tensor(c), 13).float(), (64, 64))
            peak = divmod(int(heat.argmax()), 64)
            inside += int(label[peak] == c)
            total += 1
    assert total > 10 and inside / total > 0.9, (inside, total)


def test_class_heatmaps_of_a_fine_tuned_model_peak_inside_the_objects(tmp_path):
    """A minute of FineCLIP training on scenes whose classes are colours (visible in every patch):
    the heatmap of "a {class}" then peaks inside that class's pixels for over 75 % of the val texts
    (measured: 92-96 % over four seeds, 60 steps; chance ~10 %), where the untrained model's peaks
    stay near chance."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fineclip.cli import CONFIG_DIR
    from fineclip.data.synthetic import generate
    from fineclip.engine.load import load_model
    from fineclip.engine.trainer import train
    from fineclip.models import create_model
    from fineclip.viz.peaks import heatmap_peak_rate

    root = generate(tmp_path / "data", train=480, val=64, size=64, seed=0, classes="colour")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "data=synthetic_colours", f"data.root={root}", "data.synthetic.train=480", "data.synthetic.val=64",
            "trainer.epochs=4", "trainer.progress=false", "trainer.log_maps=0", "trainer.tensorboard=false"])
    train(cfg, tmp_path / "run")  # 4 epochs of 15 steps, batch 32, all three losses, from scratch
    model, _ = load_model(OmegaConf.create({"checkpoint": str(tmp_path / "run/checkpoints/last.pt"), "model": None}))
    trained = heatmap_peak_rate(model.eval(), root / "val.json")
    torch.manual_seed(0)
    untrained = heatmap_peak_rate(create_model("fineclip-tiny", freeze_text=False).eval(), root / "val.json")
    assert trained.total == untrained.total > 150
    assert 0.05 < trained.chance_rate < 0.15
    assert trained.rate > 0.75, (trained.rate, trained.chance_rate)
    assert untrained.rate < 0.4, untrained.rate


def test_peak_rate_counts_a_peak_inside_the_mask_by_brute_force(synthetic_root):
    """heatmap_peak_rate against a direct count: the argmax of each text's bilinear heatmap, looked
    up in the mask decoded from the json."""
    from pycocotools import mask as mask_utils

    from fineclip.viz.peaks import heatmap_peak_rate

    data = json.loads((synthetic_root / "val.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}

    class Recorder(torch.nn.Module):  # a model whose tokens are random, and records what it was asked
        image_size = (64, 64)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.g = torch.Generator().manual_seed(3)
            self.calls = []

        def normalize_pixels(self, x):
            return x

        def encode_image_dense(self, pixels, with_global=False):
            self.calls.append(["dense", torch.randn(1, 6, 8, 8, generator=self.g)])
            return None, self.calls[-1][1]

        def encode_text(self, texts):
            self.calls.append(["text", texts, torch.randn(len(texts), 6, generator=self.g)])
            return self.calls[-1][2]

    model = Recorder()
    got = heatmap_peak_rate(model, synthetic_root / "val.json")
    inside = on_objects = total = 0
    annotated = sorted({a["image_id"] for a in data["annotations"]})
    for image_id, (dense_call, text_call) in zip(annotated,
                                              zip(model.calls[::2], model.calls[1::2], strict=True), strict=True):
        masks, anywhere = {}, False
        for a in data["annotations"]:
            if a["image_id"] == image_id:
                m = mask_utils.decode(a["segmentation"]).astype(bool)
                masks[a["category_id"]] = masks.get(a["category_id"], False) | m
                anywhere = anywhere | m
        assert text_call[1] == [f"a {names[c]}" for c in masks]
        for m, t in zip(masks.values(), text_call[2], strict=True):
            sim = F.cosine_similarity(dense_call[1][0], t[:, None, None], dim=0)
            heat = F.interpolate(sim[None, None], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
            inside += int(m.reshape(-1)[int(heat.argmax())])
            on_objects += int(anywhere.reshape(-1)[int(heat.argmax())])
            total += 1
    assert (got.inside, got.on_objects, got.total) == (inside, on_objects, total) and total > 10
    assert inside < on_objects  # random tokens: some peaks land on the wrong object


def test_curves_plot_exactly_the_logged_values(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from fineclip.viz import figures
    from fineclip.viz.__main__ import read_curves

    records = [{"step": 10, "epoch": 0, "train/loss": 3.0, "train/lr": 1e-3},
               {"step": 20, "epoch": 0, "train/loss": 2.5, "train/lr": 5e-4},
               {"step": 20, "epoch": 0, "val/box/top1": 12.5, "val/box/images": 8.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    series = read_curves(tmp_path)
    assert series == {"train/loss": ([10, 20], [3.0, 2.5]), "train/lr": ([10, 20], [1e-3, 5e-4]),
                      "val/box/top1": ([20], [12.5])}
    drawn = []
    original = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **k: drawn.append((self.get_title(), list(x), list(y)))
                        or original(self, x, y, *a, **k))
    figures.curves({"run": series}, tmp_path / "curves.png")
    assert sorted(drawn) == sorted((k, list(v[0]), list(v[1])) for k, v in series.items())
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_viz_of_a_checkpoint_writes_every_picture_and_a_true_confusion(tmp_path, synthetic_root, trained_tiny_run):
    from hydra import compose, initialize_config_dir

    from fineclip.cli import CONFIG_DIR
    from fineclip.data import RegionCaptionDataset
    from fineclip.viz.__main__ import run

    data = [f"data.root={synthetic_root}", "data.synthetic.train=24", "data.synthetic.val=8"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):  # the run logged maps of 2 images
        viz = compose(config_name="viz", overrides=[*data, f"checkpoint={trained_tiny_run / 'checkpoints/last.pt'}",
                                                    f"out={tmp_path / 'viz'}", "num_images=2", "clusters=3"])
    pictures = run(viz)
    out = tmp_path / "viz"
    assert {p.name for p in pictures.values()} == {"dense_maps.png", "heatmaps_1.png", "heatmaps_2.png",
                                                   "confusion.png", "per_class.png", "worst_boxes.png",
                                                   "retrieval.png", "curves.png"}
    assert all(p.stat().st_size > 1000 for p in pictures.values())
    page = (out / "index.html").read_text()
    assert all(f'src="{p.name}"' in page for p in pictures.values())
    confusion = json.loads((out / "confusion.json").read_text())
    val = RegionCaptionDataset.from_file(str(synthetic_root / "val.json"), image_root=str(synthetic_root),
                                         train=False, max_regions=100, min_box_area=64)
    per_class = {}
    for i in range(len(val)):
        for c in val[i]["category_ids"].tolist():
            per_class[c] = per_class.get(c, 0) + 1
    names = {c: n for c, n in val.categories.items()}
    expected = [per_class.get(c, 0) for c in sorted(names)]
    assert [sum(row) for row in confusion["matrix"]] == expected
    assert confusion["classes"] == [names[c] for c in sorted(names)]

    # training logged the same maps for its first val images to TensorBoard, with the final weights
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fineclip.engine.load import load_model
    from fineclip.eval.maps import feature_panel

    events = EventAccumulator(str(trained_tiny_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(t for t in events.Tags()["images"]) == ["maps/val_0", "maps/val_1"]
    model, _ = load_model(viz)
    model.eval()
    val = RegionCaptionDataset.from_file(str(synthetic_root / "val.json"), image_root=str(synthetic_root),
                                         train=False, max_regions=100, min_box_area=64, image_size=64)
    for i in range(2):
        logged = np.asarray(Image.open(io.BytesIO(events.Images(f"maps/val_{i}")[-1].encoded_image_string)))
        item = val[i]
        with torch.no_grad():
            _, dense = model.encode_image_dense(model.normalize_pixels(item["image"][None]), with_global=False)
            text = model.encode_text([f"a {val.categories[int(item['category_ids'][0])]}"])[0]
        expected = feature_panel(item["image"], dense[0], text_emb=text).numpy()
        assert logged.shape == (64, 256, 3) and np.abs(logged.astype(int) - expected.astype(int)).max() <= 1
