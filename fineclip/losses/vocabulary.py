"""DenseVLM's decoupled region–category distillation: a stronger teacher labels each region against a category
vocabulary, and the student's region features learn the teacher's distribution, over the thing categories for
regions the teacher calls a thing and over all categories for the others.

    p_T(r) = softmax(s · t̂_r C_Tᵀ)     t̂_r: the teacher's RoI feature of region r (normalised); C_T (K, D) the
                                         vocabulary embedded by the teacher's text tower; s = 100
    p_S(r) = softmax(s · ŝ_r C_Sᵀ)     the student's RoI feature and the vocabulary by the student's text tower
    kept:   max_k p_T(r)_k > 0.3;       thing: kept and argmax_k p_T(r) is a thing category (T ⊂ {1..K})
    L = mean_{r thing} KL(p_T(r)|_T ‖ p_S(r)|_T) + mean_{r kept, not thing} KL(p_T(r) ‖ p_S(r))

where p|_T is the softmax over the thing columns only (the logits restricted to T). A mean over no region is 0.
DDP: each mean is over the regions of every rank (sum on this rank × world size / global count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fineclip.errors import ConfigError
from fineclip.losses.gather import global_count, world_size
from fineclip.models.prompts import DEFAULT_TEMPLATES, class_embeddings

DEFAULT_VOCABULARY = Path(__file__).resolve().parents[1] / "data" / "vocabularies" / "coco_stuff_ade20k_316.tsv"


def read_vocabulary(path: str | Path) -> tuple[list[str], list[bool]]:
    """(names, is_thing) from a file of ``name<TAB>thing|stuff`` lines (``#`` comments and blank lines skipped;
    a line without a tab is a thing)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary not found: {path} (lines of name<TAB>thing|stuff)")
    names, things = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, kind = line.partition("\t")
        if kind.strip() not in ("", "thing", "stuff"):
            raise ConfigError(f"{path}:{number}: the kind must be thing or stuff, not {kind.strip()!r}")
        names.append(name.strip())
        things.append(kind.strip() != "stuff")
    if not names:
        raise ConfigError(f"{path}: the vocabulary is empty")
    return names, things


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)) of every row."""
    log_t, log_s = teacher_logits.log_softmax(dim=-1), student_logits.log_softmax(dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1)


class VocabularyDistillation(nn.Module):
    """L (module docstring) over ``region_emb`` (the student's) and ``teacher_region_emb``.

    ``vocabulary``: a name<TAB>thing|stuff file (default: the 316 COCO-Stuff + ADE20K categories, 204 thing + 112
    stuff); ``thing_count`` = N instead makes the first N categories the things (DenseVLM's code: 203 of that
    file); ``templates`` the prompts each name is embedded with (averaged, normalised)."""

    requires = frozenset({"region_emb", "teacher_region_emb"})
    uses_teacher_text = True

    def __init__(self, vocabulary: str | None = None, templates: Sequence[str] | None = None, scale: float = 100.0,
                 min_confidence: float = 0.3, thing_count: int | None = None) -> None:
        super().__init__()
        self.names, things = read_vocabulary(vocabulary or DEFAULT_VOCABULARY)
        if thing_count is not None:
            if not 0 < thing_count <= len(self.names):
                raise ConfigError(f"loss.thing_count={thing_count}: the vocabulary has {len(self.names)} names")
            things = [i < thing_count for i in range(len(self.names))]
        self.templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        self.scale, self.min_confidence = scale, min_confidence
        self.register_buffer("is_thing", torch.tensor(things), persistent=False)
        self.register_buffer("student_vocab", torch.zeros(0), persistent=False)
        self.register_buffer("teacher_vocab", torch.zeros(0), persistent=False)

    @torch.no_grad()
    def prepare(self, encode_text: Callable, class_names: Sequence[str],
                teacher_encode_text: Callable | None = None) -> None:
        """Embed the vocabulary once with each tower (the student's text tower is frozen under method=densevlm)."""
        if teacher_encode_text is None:
            raise ConfigError("the vocabulary distillation needs a teacher with its own text tower: teacher=checkpoint")
        device = self.is_thing.device
        self.student_vocab = class_embeddings(encode_text, self.names, self.templates).to(device, torch.float32)
        self.teacher_vocab = class_embeddings(teacher_encode_text, self.names, self.templates).to(device, torch.float32)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        if not len(self.student_vocab):
            raise RuntimeError("VocabularyDistillation.prepare() was not called: no vocabulary embeddings")
        dtype = torch.promote_types(features["region_emb"].dtype, torch.float32)  # float32 at least
        student = F.normalize(features["region_emb"].to(dtype), dim=-1)
        teacher = F.normalize(features["teacher_region_emb"].detach().to(dtype), dim=-1)
        logits_t = self.scale * teacher @ self.teacher_vocab.to(dtype).T
        logits_s = self.scale * student @ self.student_vocab.to(dtype).T
        confidence, label = logits_t.softmax(dim=-1).max(dim=-1)
        kept = confidence > self.min_confidence
        thing = kept & self.is_thing[label]
        stuff = kept & ~self.is_thing[label]
        columns = self.is_thing
        thing_kl = kl_rows(logits_t[thing][:, columns], logits_s[thing][:, columns]).sum()
        stuff_kl = kl_rows(logits_t[stuff], logits_s[stuff]).sum()
        n_thing = global_count(int(thing.sum()), student.device).clamp(min=1)
        n_stuff = global_count(int(stuff.sum()), student.device).clamp(min=1)
        return world_size() * (thing_kl / n_thing + stuff_kl / n_stuff)
