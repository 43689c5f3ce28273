"""RegionCLIP-style region–concept objectives: a frozen teacher labels each region's crop against a
pool of concepts (class names or a noun list, template-averaged text embeddings, computed once),
and the student's RoI-pooled dense feature learns those labels.

Both terms take the concept embeddings c_k (K, D) as a buffer set once by ``prepare`` and read the
teacher's crop embedding as a target (no gradient flows into it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fineclip.losses.gather import gather_ragged_rows, global_count, world_size
from fineclip.models.prompts import DEFAULT_TEMPLATES, class_embeddings


def read_concepts(source: str | None, class_names: Sequence[str]) -> list[str]:
    """The concept pool: ``class_names`` when ``source`` is None, else the lines of the text file
    ``source`` (one noun per line; blank lines and duplicates dropped)."""
    if source is None:
        names = list(class_names)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"concept list not found: {path} (one noun per line)")
        names = list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))
    if not names:
        raise ValueError(f"empty concept pool (from {source or 'the training set class names'})")
    return names


class _ConceptTerm(nn.Module):
    """Holds the pool: ``prepare(encode_text, class_names)`` embeds it once (under no_grad)."""

    requires = frozenset({"region_emb", "crop_emb_nograd"})

    def __init__(self, concepts: str | None = None, templates: Sequence[str] | None = None) -> None:
        super().__init__()
        self.concepts_source = concepts
        self.templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        self.concept_names: list[str] = []
        self.register_buffer("concept_emb", torch.zeros(0), persistent=False)

    @torch.no_grad()
    def prepare(self, encode_text: Callable[[list[str]], torch.Tensor], class_names: Sequence[str]) -> None:
        self.concept_names = read_concepts(self.concepts_source, class_names)
        emb = class_embeddings(encode_text, self.concept_names, self.templates)
        self.concept_emb = emb.to(self.concept_emb.device, torch.float32)

    def _check_ready(self) -> None:
        if not len(self.concept_emb):
            raise RuntimeError(f"{type(self).__name__}.prepare() was not called: no concept embeddings")


class ConceptDistillation(_ConceptTerm):
    """L_KL = mean_j Σ_k q_jk (log q_jk − log p_jk) over all regions j of the global batch.

    q_j = softmax_k(cos(v^r_j, c_k) / τ): the frozen teacher's pseudo-label distribution from its
    embedding v^r_j of region j's crop; p_j = softmax_k(cos(r_j, c_k) / τ) from the student's pooled
    dense feature r_j; τ = 0.01 (RegionCLIP). 0 when there is no region.
    """

    def __init__(self, concepts: str | None = None, templates: Sequence[str] | None = None,
                 temperature: float = 0.01) -> None:
        super().__init__(concepts, templates)
        self.temperature = temperature

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check_ready()
        student, teacher = features["region_emb"], features["crop_emb_nograd"]
        c = self.concept_emb.to(student.dtype)
        log_p = F.log_softmax(F.normalize(student, dim=-1) @ c.t() / self.temperature, dim=-1)
        log_q = F.log_softmax(F.normalize(teacher, dim=-1).to(c.dtype) @ c.t() / self.temperature, dim=-1)
        total = (log_q.exp() * (log_q - log_p)).sum()
        return total * world_size() / global_count(student.shape[0], student.device).clamp(min=1)


def sample_concepts(labels: torch.Tensor, pool_size: int, count: int, seed: int) -> torch.Tensor:
    """The concepts a sigmoid step scores: every label that occurs in ``labels``, plus concepts
    drawn uniformly without replacement from the others up to ``count`` (all of them when the pool
    is no larger). The draw is seeded by (``seed``, the set of labels), so every rank that holds the
    same global labels draws the same set, and a resumed run the same again. Sorted indices."""
    appeared = torch.unique(labels.cpu())
    if pool_size <= count:
        return torch.arange(pool_size)
    if len(appeared) >= count:
        return appeared
    digest = hashlib.sha256(f"{seed}:{appeared.tolist()}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    weights = torch.ones(pool_size)
    weights[appeared] = 0
    others = torch.multinomial(weights, count - len(appeared), replacement=False, generator=generator)
    return torch.cat([appeared, others]).sort().values


class ConceptSigmoid(_ConceptTerm):
    """L_BCE = mean_j Σ_{k∈S} BCE(s·cos(r_j, c_k), 1[k = y_j]) over all regions j of the global batch.

    y_j = argmax_k cos(v^r_j, c_k): the frozen teacher's pseudo-label of region j's crop; r_j the
    student's pooled dense feature; s = exp(θ) the model's logit scale, not trained by this term;
    S = ``sample_concepts``: the labels that occur in the global batch plus random others, at most
    ``num_concepts`` (100) concepts. BCE(z, y) = −y·log σ(z) − (1 − y)·log(1 − σ(z)). 0 without regions.
    """

    requires = frozenset({"region_emb", "crop_emb_nograd", "logit_scale"})

    def __init__(self, concepts: str | None = None, templates: Sequence[str] | None = None,
                 num_concepts: int = 100, seed: int = 0) -> None:
        super().__init__(concepts, templates)
        self.num_concepts = num_concepts
        self.seed = seed

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check_ready()
        student, teacher = features["region_emb"], features["crop_emb_nograd"]
        c = self.concept_emb.to(student.dtype)
        labels = (F.normalize(teacher, dim=-1).to(c.dtype) @ c.t()).argmax(dim=-1)
        all_labels, valid, _ = gather_ragged_rows(labels[:, None].float())
        chosen = sample_concepts(all_labels[valid, 0].long(), len(c), self.num_concepts, self.seed).to(labels.device)
        logits = features["logit_scale"].detach() * F.normalize(student, dim=-1) @ c[chosen].t()
        target = (chosen[None, :] == labels[:, None]).to(logits.dtype)
        total = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        return total * world_size() / global_count(student.shape[0], student.device).clamp(min=1)
