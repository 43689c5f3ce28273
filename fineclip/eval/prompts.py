"""Class-name prompt templates and their embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
    "a {} in the scene.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
)


@torch.no_grad()
def class_embeddings(encode_text, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D): for each class, the normalised mean of the normalised embeddings of its prompts."""
    if not templates:
        raise ValueError("need at least one prompt template")
    prompts = [t.format(name) for name in class_names for t in templates]
    emb = F.normalize(encode_text(prompts).float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)
