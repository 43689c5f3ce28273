"""python -m fineclip.viz checkpoint=RUN/checkpoints/last.pt ... (configs/viz.yaml): the pictures of a
checkpoint's dense features, text heatmaps, box classification and training curves, and an index page."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from fineclip.cli import CONFIG_DIR, exit_on_user_error
from fineclip.errors import ConfigError

log = logging.getLogger("fineclip.viz")


# the evaluation metrics drawn (the others are in metrics.jsonl and eval.json)
HEADLINE_METRICS = ("val/box/top1", "val/box/top5", "val/box/crop_top1", "val/retrieval/i2t_r1",
                    "val/retrieval/t2i_r1", "val/seg/zero_shot_miou", "val/seg/linear_probe_miou")


def read_curves(run_dir: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (steps, values)} of every numeric training metric in ``run_dir/metrics.jsonl`` and the
    ``HEADLINE_METRICS`` of the evaluations, in logged order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    series: dict[str, tuple[list[float], list[float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and (
                    not key.startswith("val/") or key in HEADLINE_METRICS):
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return series


def load_images(cfg: DictConfig, dataset, size: int) -> list[tuple[torch.Tensor, list[tuple[list[float], int]]]]:
    """(uint8 (3, size, size) image, [(x, y, w, h box, category id)]) for the files in ``images`` or the
    first val images."""
    if cfg.images:
        paths = cfg.images.split(",") if isinstance(cfg.images, str) else list(cfg.images)
        out = []
        for path in paths:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))
            out.append((torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), []))
        return out
    items = [dataset[i] for i in range(min(cfg.num_images, len(dataset)))]
    return [(it["image"], [([x1, y1, x2 - x1, y2 - y1], int(c)) for (x1, y1, x2, y2), c in
                           zip(it["boxes"].tolist(), it["category_ids"].tolist(), strict=True)]) for it in items]


def draw_worst_boxes(dataset, feats, classes, labels, names, count: int, out: Path, pictures: list) -> None:
    """The ``count`` boxes whose true class gets the lowest probability, cut from their images."""
    from fineclip.viz import figures

    if count <= 0:
        return
    probs = (100 * feats["box_emb"] @ classes.t()).softmax(1)
    true_prob = probs[torch.arange(len(labels)), labels]
    order = true_prob.argsort()[:count].tolist()
    crops, titles = [], []
    for k in order:
        x1, y1, x2, y2 = feats["boxes"][k].tolist()
        image = dataset[int(feats["box_image"][k])]["image"].permute(1, 2, 0).numpy()
        crops.append(image[int(y1):max(int(y2), int(y1) + 1), int(x1):max(int(x2), int(x1) + 1)])
        titles.append(f"{names[labels[k]]} → {names[int(probs[k].argmax())]}")
    pictures.append((f"the {count} worst-classified boxes (true → predicted)", figures.box_grid(
        crops, titles, out / "worst_boxes.png", "worst-classified boxes: true → predicted")))


def draw_retrieval(dataset, feats, count: int, out: Path, pictures: list) -> None:
    """The top-5 images of the first caption of ``count`` val images, the right one marked."""
    from fineclip.viz import figures

    if count <= 0 or not len(feats["text_emb"]):
        return
    captions = [c for record in dataset.records for c in record.captions]  # extraction order, no image read
    first = [int((feats["text_to_image"] == i).nonzero()[0]) for i in range(min(count, len(dataset)))
             if (feats["text_to_image"] == i).any()]
    results = []
    for t in first:
        top = (feats["text_emb"][t] @ feats["image_emb"].t()).topk(min(5, len(feats["image_emb"]))).indices.tolist()
        results.append([(dataset[i]["image"].permute(1, 2, 0).numpy(), i == int(feats["text_to_image"][t]))
                        for i in top])
    pictures.append(("text → image retrieval, top-5", figures.retrieval([captions[t] for t in first], results,
                                                                        out / "retrieval.png")))


def write_index(out: Path, pictures: list[tuple[str, Path]], title: str) -> Path:
    rows = "\n".join(f"<h2>{html.escape(caption)}</h2>\n<img src=\"{p.name}\" style=\"max-width:100%\">"
                     for caption, p in pictures)
    page = out / "index.html"
    page.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                    f"</head><body style=\"font-family:sans-serif\"><h1>{html.escape(title)}</h1>\n{rows}\n"
                    "</body></html>\n")
    return page


@torch.no_grad()
def run(cfg: DictConfig) -> dict[str, Path]:
    from fineclip.engine.distributed import resolve_device
    from fineclip.engine.load import chosen_model, load_model
    from fineclip.engine.rng import seed_everything
    from fineclip.eval.box_retrieval import class_embeddings_and_labels, extract_features
    from fineclip.eval.eval_set import build_eval_set
    from fineclip.eval.maps import kmeans_map, pca_rgb, text_heatmap
    from fineclip.eval.protocols import box_protocol, evaluation_templates
    from fineclip.eval.segmentation import confusion_matrix
    from fineclip.viz import figures

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    checkpoint = Path(cfg.checkpoint)
    run_dir = checkpoint.parent.parent
    out = Path(cfg.out) if cfg.out else run_dir / "viz"
    model, _ = load_model(cfg, chosen_model())
    model = model.to(device).eval()
    models = {"after" if cfg.before else "model": model}
    if cfg.before:
        before, _ = load_model(OmegaConf.merge(cfg, {"checkpoint": cfg.before}))
        models = {"before": before.to(device).eval(), **models}
    size = model.image_size[0]
    dataset = build_eval_set(cfg, size, model.tower.patch_size[0])
    if dataset is None and not cfg.images:
        raise ConfigError(f"data={cfg.data.get('name', '?')} has no val split: give images=a.jpg,b.jpg")
    names = dict(dataset.categories) if dataset is not None else {}
    templates = evaluation_templates(cfg)
    template = templates[0]
    shown = load_images(cfg, dataset, size)
    pixels = torch.stack([im for im, _ in shown]).to(device)
    pictures: list[tuple[str, Path]] = []

    maps, denses = {}, {}
    for name, m in models.items():
        _, denses[name] = m.encode_image_dense(m.normalize_pixels(pixels), with_global=False)
        maps[name] = [(kmeans_map(d.cpu(), cfg.clusters, cfg.seed).numpy(), pca_rgb(d.cpu()).numpy())
                      for d in denses[name]]
    arrays = [im.permute(1, 2, 0).numpy() for im, _ in shown]
    pictures.append(("dense features: K-means clusters and PCA → RGB of every token",
                     figures.dense_maps(arrays, maps, cfg.clusters, out / "dense_maps.png")))

    dense = denses["after" if cfg.before else "model"]
    fixed_texts = [t.strip() for t in cfg.texts.split(",")] if isinstance(cfg.texts, str) else list(cfg.texts or [])
    for i, ((_, boxes), array) in enumerate(zip(shown, arrays, strict=True)):
        texts = fixed_texts or list(dict.fromkeys(template.format(names[c]) for _, c in boxes))
        if not texts:
            continue
        emb = model.encode_text(texts).float().cpu()
        heats = {t: text_heatmap(dense[i].cpu(), e, (size, size)).numpy() for t, e in zip(texts, emb, strict=True)}
        labelled = [(b, names.get(c, "")) for b, c in boxes]
        pictures.append((f"text heatmaps, image {i + 1}", figures.text_heatmaps(array, heats, labelled,
                                                                                 out / f"heatmaps_{i + 1}.png")))

    if dataset is not None and len(dataset.categories):
        feats = extract_features(model, dataset, cfg.eval.batch_size, device=device, progress=False)
        if len(feats["box_emb"]):
            classes, labels, class_names = class_embeddings_and_labels(
                model, dataset, feats, templates, None, box_protocol(cfg))
            predicted = (feats["box_emb"] @ classes.t()).argmax(1)
            matrix = confusion_matrix(predicted, labels, len(class_names)).numpy()
            counts = matrix.sum(1)
            top1 = 100 * np.diag(matrix) / np.maximum(counts, 1)
            (out / "confusion.json").write_text(json.dumps({"classes": class_names, "matrix": matrix.tolist()}))
            pictures.append(("box classification: confusion (rows: true class)",
                             figures.confusion(matrix, class_names, out / "confusion.png")))
            pictures.append(("box classification: top-1 per class",
                             figures.per_class_bars(top1, counts, class_names, out / "per_class.png")))
            draw_worst_boxes(dataset, feats, classes, labels, class_names, cfg.worst_boxes, out, pictures)
            draw_retrieval(dataset, feats, cfg.retrieval_queries, out, pictures)
            off = matrix - np.diag(np.diag(matrix))
            worst = np.dstack(np.unravel_index(np.argsort(-off, axis=None)[:5], off.shape))[0]
            (out / "top_confusions.txt").write_text("".join(
                f"{class_names[t]} -> {class_names[p]}: {off[t, p]} boxes\n" for t, p in worst if off[t, p]))

    run_dirs = [Path(r) for r in (cfg.runs.split(",") if isinstance(cfg.runs, str) else cfg.runs or [run_dir])]
    curves = {}
    for r in run_dirs:
        try:
            curves[r.name] = read_curves(r)
        except FileNotFoundError as err:
            log.warning("%s: no curves drawn", err)
    if curves:
        pictures.append(("training curves", figures.curves(curves, out / "curves.png")))
    page = write_index(out, pictures, f"fineclip.viz: {checkpoint}")
    print(f"wrote {len(pictures)} pictures and {page}")
    return {caption: path for caption, path in pictures}


@hydra.main(config_path=str(CONFIG_DIR), config_name="viz", version_base="1.3")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: run(cfg), log)


if __name__ == "__main__":
    main()
