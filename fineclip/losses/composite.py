"""The weighted sum of loss terms; a term of weight 0 is neither computed nor asks for features."""

from __future__ import annotations

import torch
from torch import nn

from fineclip.losses.concepts import ConceptDistillation, ConceptSigmoid
from fineclip.losses.context import ContextDistillation
from fineclip.losses.contrastive import GlobalContrastive, MosaicContrastive, RegionalContrastive
from fineclip.losses.distillation import SelfDistillation
from fineclip.losses.vocabulary import VocabularyDistillation


class CompositeLoss(nn.Module):
    """L = Σ_k w_k · L_k over the terms with w_k ≠ 0.

    ``required_features`` is the union of what the enabled terms need, so the model computes
    nothing else (no crop forward when the self-distillation weight is 0).
    """

    def __init__(self, terms: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        missing = set(terms) - set(weights)
        if missing:
            raise ValueError(f"no weight given for loss terms {sorted(missing)}")
        enabled = {name: term for name, term in terms.items() if weights[name] != 0}
        if not enabled:
            raise ValueError("every loss weight is 0: nothing to train")
        self.terms = nn.ModuleDict(enabled)
        self.weights = {name: float(weights[name]) for name in enabled}

    def prepare(self, encode_text, class_names, teacher_encode_text=None) -> None:
        """Give the terms that embed a text pool once (RegionCLIP's concepts, DenseVLM's vocabulary) the text
        encoder and the training set's class names — and the teacher's text encoder to those that use one;
        called once before the first step."""
        for term in self.terms.values():
            if getattr(term, "uses_teacher_text", False):
                term.prepare(encode_text, class_names, teacher_encode_text)
            elif hasattr(term, "prepare"):
                term.prepare(encode_text, class_names)

    @property
    def required_features(self) -> frozenset[str]:
        return frozenset().union(*(term.requires for term in self.terms.values()))

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total, {term name: unweighted value})."""
        parts = {name: term(features) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts


class FineCLIPLoss(CompositeLoss):
    """L = w_gc·L_GC + λ·L_SD + γ·L_RC (paper: w_gc = λ = γ = 1), plus w_crop·L_crop.

    L_crop is L_RC with the crop embeddings v^r in place of the pooled dense features: CLIP's loss
    on (region crop, region caption) pairs. It is not part of FineCLIP (weight 0 by default); the
    synthetic pretraining uses it so that the global path learns the objects.
    """

    def __init__(
        self,
        gc_weight: float = 1.0,
        sd_weight: float = 1.0,
        rc_weight: float = 1.0,
        detach_teacher: bool = False,
        crop_weight: float = 0.0,
    ) -> None:
        super().__init__(
            terms={
                "gc": GlobalContrastive(),
                "sd": SelfDistillation(detach_teacher=detach_teacher),
                "rc": RegionalContrastive(),
                "crop": RegionalContrastive(region_key="crop_emb"),
            },
            weights={"gc": gc_weight, "sd": sd_weight, "rc": rc_weight, "crop": crop_weight},
        )


class RegionCLIPLoss(CompositeLoss):
    """L = w_gc·L_GC + w_distill·L_concept, where L_concept is ``objective``:

    - "kl": RegionCLIP's KL(teacher ‖ student) over the whole concept pool at τ (``ConceptDistillation``);
    - "sigmoid": the BCE over at most ``num_concepts`` sampled concepts against the teacher's
      top-1 pseudo-label (``ConceptSigmoid``), as the CLIPSelf code re-implements RegionCLIP.

    ``concepts``: None for the training set's class names, or a text file of nouns; ``templates``
    the prompts each concept is embedded with (averaged).
    """

    def __init__(
        self,
        objective: str = "kl",
        gc_weight: float = 1.0,
        distill_weight: float = 1.0,
        concepts: str | None = None,
        templates: list[str] | None = None,
        temperature: float = 0.01,
        num_concepts: int = 100,
        seed: int = 0,
    ) -> None:
        if objective == "kl":
            concept_term = ConceptDistillation(concepts, templates, temperature)
        elif objective == "sigmoid":
            concept_term = ConceptSigmoid(concepts, templates, num_concepts, seed)
        else:
            raise ValueError(f"loss.objective={objective!r}: use kl or sigmoid")
        super().__init__(
            terms={"gc": GlobalContrastive(), "concept": concept_term},
            weights={"gc": gc_weight, "concept": distill_weight},
        )


class CLIMLoss(CompositeLoss):
    """L = w_clim·L_CLIM: CLIM's one contrastive loss over the mosaic cells and the single images of the batch
    (``MosaicContrastive``; the regions from ``regions=mosaic`` with the same ``sizes``)."""

    def __init__(self, clim_weight: float = 1.0, sizes: tuple[int, ...] = (2, 3, 4)) -> None:
        super().__init__(terms={"clim": MosaicContrastive(tuple(sizes))}, weights={"clim": clim_weight})


class DeCLIPLoss(CompositeLoss):
    """L = w_content·L_content + w_context·L_context (DeCLIP; the scripts: 1.0 and 0.1).

    L_content = mean_j (1 − cos(RoI(content map, b_j), t_j)): L_SD with the frozen initial model's crop embedding
    t_j as the target (``SelfDistillation`` under teacher=frozen); the content map is the dense features of the
    model's dense mode (SelfSelfAttention under method=declip). L_context: ``ContextDistillation`` between the
    dense mode's context features and the external VFM teacher's patch features (vfm=...).
    """

    def __init__(self, content_weight: float = 1.0, context_weight: float = 0.1) -> None:
        super().__init__(terms={"content": SelfDistillation(), "context": ContextDistillation()},
                         weights={"content": content_weight, "context": context_weight})


class DenseVLMLoss(CompositeLoss):
    """L = w_vocab·L_vocab (DenseVLM): ``VocabularyDistillation`` from a checkpoint teacher (teacher=checkpoint),
    plus w_gc·L_GC (0 by default; composed rows may add it)."""

    def __init__(self, vocab_weight: float = 1.0, gc_weight: float = 0.0, vocabulary: str | None = None,
                 templates: list[str] | None = None, scale: float = 100.0, min_confidence: float = 0.3,
                 thing_count: int | None = None) -> None:
        super().__init__(
            terms={"gc": GlobalContrastive(),
                   "vocab": VocabularyDistillation(vocabulary, templates, scale, min_confidence, thing_count)},
            weights={"gc": gc_weight, "vocab": vocab_weight},
        )
