"""The arrays behind the pictures: K-means clusters and a PCA-to-RGB map of the dense features, and
the similarity of each token to a text.

    kmeans_map(X)   labels of Lloyd's K-means (k-means++ start) over the h·w token features of X (D, h, w)
    pca_rgb(X)      the tokens projected on their first three principal components, each scaled to [0, 1]
    text_heatmap    cos(token feature, text embedding), bilinearly upsampled to the image
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from fineclip.eval.protocols import evaluation_templates

log = logging.getLogger(__name__)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,), centres (k, D)) of K-means on the rows of ``x``: k-means++ initialisation from a
    generator seeded by ``seed``, then Lloyd's updates until the labels stop changing (or ``iters``)."""
    x = x.float()
    if k > len(x):
        raise ValueError(f"k={k} clusters for {len(x)} points")
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(dim=1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=g)]])
    labels = torch.cdist(x, centres).argmin(dim=1)
    for _ in range(iters):
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centres[c] = members.mean(0)
        new = torch.cdist(x, centres).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centres


def kmeans_map(dense: torch.Tensor, k: int = 6, seed: int = 0) -> torch.Tensor:
    """(h, w) cluster index of each token of a (D, h, w) feature map (features L2-normalised)."""
    d, h, w = dense.shape
    labels, _ = kmeans(F.normalize(dense.reshape(d, h * w).t(), dim=1), k, seed=seed)
    return labels.view(h, w)


def pca_rgb(dense: torch.Tensor) -> torch.Tensor:
    """(h, w, 3) in [0, 1]: the centred tokens' coordinates on the first three principal axes, each
    min-max scaled (sign fixed so that the largest-magnitude coordinate is positive)."""
    d, h, w = dense.shape
    x = dense.reshape(d, h * w).t().float()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    coords = x @ v[: min(3, v.shape[0])].t()
    if coords.shape[1] < 3:
        coords = torch.cat([coords, coords.new_zeros(len(coords), 3 - coords.shape[1])], dim=1)
    signs = torch.sign(coords.gather(0, coords.abs().argmax(0, keepdim=True)))
    coords = coords * torch.where(signs == 0, torch.ones_like(signs), signs)
    lo, hi = coords.min(0).values, coords.max(0).values
    return ((coords - lo) / (hi - lo).clamp(min=1e-8)).view(h, w, 3)


def text_heatmap(dense: torch.Tensor, text_emb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) cosine similarity of every token of (D, h, w) to a (D,) text embedding, upsampled
    bilinearly to ``size`` (token centres on pixel centres, as the evaluation's RoIAlign reads them)."""
    sim = torch.einsum("dhw,d->hw", F.normalize(dense.float(), dim=0), F.normalize(text_emb.float(), dim=0))
    return F.interpolate(sim[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def feature_panel(image: torch.Tensor, dense: torch.Tensor, k: int = 6, text_emb: torch.Tensor | None = None,
                  seed: int = 0) -> torch.Tensor:
    """(H, (3 or 4)·W, 3) uint8: the image, its K-means map (tab10 colours), its PCA → RGB map (tokens
    shown as blocks) and, with ``text_emb``, the text heatmap (inferno, scaled to its own range):
    what training logs for a few val images at each evaluation."""
    from matplotlib import colormaps

    _, height, width = image.shape

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (h, w, 3) -> (H, W, 3), each token a block
        return F.interpolate(x.permute(2, 0, 1)[None].float(), size=(height, width), mode="nearest")[0].permute(1, 2, 0)

    palette = torch.tensor(colormaps["tab10"].colors, dtype=torch.float32)
    parts = [image.permute(1, 2, 0).float() / 255, blocks(palette[kmeans_map(dense, k, seed) % 10]),
             blocks(pca_rgb(dense))]
    if text_emb is not None:
        heat = text_heatmap(dense, text_emb, (height, width))
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-8)
        parts.append(torch.from_numpy(colormaps["inferno"](heat.numpy())[..., :3]).float())
    return (torch.cat(parts, dim=1).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def feature_maps(model, dataset, count: int, cfg, device) -> dict[str, np.ndarray]:
    """{"maps/val_i": ``feature_panel``} of the first ``count`` images of ``dataset``, each with the heatmap of
    its first box's class prompt (the first template of ``evaluation_templates(cfg)``); images whose dense
    features are not finite are left out (with a warning)."""
    count = min(count, len(dataset)) if dataset is not None else 0
    was_training = model.training
    model.eval()
    template = evaluation_templates(cfg)[0]
    panels = {}
    for i in range(count):
        item = dataset[i]
        pixels = model.normalize_pixels(item["image"][None].to(device))
        _, dense = model.encode_image_dense(pixels, with_global=False)
        if not bool(torch.isfinite(dense).all()):
            log.warning("val image %d: non-finite dense features, no feature maps logged", i)
            continue
        text = None
        if len(item["category_ids"]):
            name = dataset.categories[int(item["category_ids"][0])]
            text = model.encode_text([template.format(name)])[0].float().cpu()
        panels[f"maps/val_{i}"] = feature_panel(item["image"], dense[0].float().cpu(), text_emb=text).numpy()
    model.train(was_training)
    return panels
