"""Metrics on precomputed scores: per-class box accuracy and retrieval recall@K."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def box_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of box classification.

    logits: (N, C) scores, labels: (N,) class indices. Returns, for each k, ``top{k}`` = mean over
    the classes present in ``labels`` of that class's top-k accuracy (the paper's metric), and
    ``overall_top{k}`` = plain accuracy over all boxes. k is capped at C.
    """
    if logits.shape[0] == 0:
        raise ValueError("no boxes to classify")
    out: dict[str, float] = {}
    classes = labels.unique()
    for k in ks:
        topk = logits.topk(min(k, logits.shape[1]), dim=1).indices
        hit = (topk == labels[:, None]).any(dim=1).float()
        per_class = torch.stack([hit[labels == c].mean() for c in classes])
        out[f"top{k}"] = 100.0 * per_class.mean().item()
        out[f"overall_top{k}"] = 100.0 * hit.mean().item()
    return out


@torch.no_grad()
def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Image→text and text→image recall@K with several captions per image.

    image_emb (N, D), text_emb (T, D) normalised; text_to_image (T,) gives each caption's image
    row. An image query scores a hit at K if any of its captions ranks in the top K; a caption
    query if its image does. Rank = number of wrong candidates scoring at least as high as the best
    correct one: a tie counts against the query, so a collapsed model (all embeddings equal)
    scores 0, not 100. Computed in chunks of ``chunk`` queries.
    """
    n_images = image_emb.shape[0]
    i2t_rank = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk):
        sims = image_emb[start : start + chunk] @ text_emb.t()
        rows = torch.arange(start, start + sims.shape[0], device=sims.device)
        correct = text_to_image[None, :].to(sims.device) == rows[:, None]
        if not correct.any(dim=1).all():
            raise ValueError("every image needs at least one caption for image→text retrieval")
        best = sims.masked_fill(~correct, float("-inf")).max(dim=1).values
        i2t_rank[start : start + sims.shape[0]] = ((sims >= best[:, None]) & ~correct).sum(dim=1).cpu()
    t2i_rank = torch.empty(text_emb.shape[0], dtype=torch.long)
    for start in range(0, text_emb.shape[0], chunk):
        sims = text_emb[start : start + chunk] @ image_emb.t()
        target = text_to_image[start : start + sims.shape[0]].to(sims.device)
        correct = sims.gather(1, target[:, None])
        t2i_rank[start : start + sims.shape[0]] = (sims >= correct).sum(dim=1).cpu() - 1  # minus itself
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return out
