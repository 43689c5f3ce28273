"""Class-name prompt templates and their embeddings, cached on disk for a frozen text tower."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

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


def text_tower_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every text-tower parameter and buffer (names, shapes, values): the same weights,
    whichever checkpoint file they came from, give the same fingerprint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith("clip.visual.") or "logit_" in name:
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_class_embeddings(
    model: torch.nn.Module,
    encode_text: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | Path | None,
) -> torch.Tensor:
    """``class_embeddings``, stored in ``cache_dir`` under a key of (text-tower weights, class
    names, templates) and read back on the next evaluation of the same model. No cache when
    ``cache_dir`` is None."""
    if cache_dir is None:
        return class_embeddings(encode_text, class_names, templates)
    key = hashlib.sha256(
        "\n".join([text_tower_fingerprint(model), *class_names, "--", *templates]).encode()
    ).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.shape[0] == len(class_names):
                log.info("class embeddings from cache %s", path)
                return cached
        except Exception as err:  # noqa: BLE001 - a bad cache file is recomputed, never trusted
            log.warning("ignoring unreadable class-embedding cache %s: %s", path, err)
    emb = class_embeddings(encode_text, class_names, templates)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(emb, tmp)
    os.replace(tmp, path)
    return emb
