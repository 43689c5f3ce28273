"""The weighted sum of loss terms; a term of weight 0 is neither computed nor asks for features."""

from __future__ import annotations

import torch
from torch import nn

from fineclip.losses.contrastive import GlobalContrastive, RegionalContrastive
from fineclip.losses.distillation import SelfDistillation


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
