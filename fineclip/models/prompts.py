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


def template_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """Each class's prompts: every template filled with the class name."""
    if not templates:
        raise ValueError("need at least one prompt template")
    return [[t.format(name) for t in templates] for name in class_names]


@torch.no_grad()
def prompt_embeddings(encode_text, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """(C, D): for each class, the normalised mean of the normalised embeddings of its prompts."""
    flat = [p for class_prompts in prompts for p in class_prompts]
    emb = F.normalize(encode_text(flat).float(), dim=-1)
    means = [chunk.mean(dim=0) for chunk in emb.split([len(c) for c in prompts])]
    return F.normalize(torch.stack(means), dim=-1)


def class_embeddings(encode_text, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) class embeddings from templates (``"a photo of a {}."``) filled with each name."""
    return prompt_embeddings(encode_text, template_prompts(class_names, templates))


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
    prompts: Sequence[Sequence[str]],
    cache_dir: str | Path | None,
) -> torch.Tensor:
    """``prompt_embeddings``, stored in ``cache_dir`` under a key of (text-tower weights, every
    class's prompts) and read back on the next evaluation of the same model. No cache when
    ``cache_dir`` is None."""
    if cache_dir is None:
        return prompt_embeddings(encode_text, prompts)
    lines = [text_tower_fingerprint(model)] + ["\t".join(class_prompts) for class_prompts in prompts]
    key = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.shape[0] == len(prompts):
                log.info("class embeddings from cache %s", path)
                return cached
        except Exception as err:  # noqa: BLE001 - a bad cache file is recomputed, never trusted
            log.warning("ignoring unreadable class-embedding cache %s: %s", path, err)
    emb = prompt_embeddings(encode_text, prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(emb, tmp)
    os.replace(tmp, path)
    return emb
