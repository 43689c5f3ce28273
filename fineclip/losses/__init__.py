"""Losses: each term is a small module over a dict of features, with its formula in the docstring."""

from fineclip.losses.composite import (
    CLIMLoss,
    CompositeLoss,
    DeCLIPLoss,
    DenseVLMLoss,
    FineCLIPLoss,
    RegionCLIPLoss,
)
from fineclip.losses.concepts import ConceptDistillation, ConceptSigmoid, sample_concepts
from fineclip.losses.contrastive import GlobalContrastive, MosaicContrastive, RegionalContrastive, infonce_row_sum
from fineclip.losses.detailclip import DetailCLIPLoss
from fineclip.losses.distillation import SelfDistillation

__all__ = [
    "CLIMLoss",
    "CompositeLoss",
    "DeCLIPLoss",
    "DenseVLMLoss",
    "DetailCLIPLoss",
    "ConceptDistillation",
    "ConceptSigmoid",
    "FineCLIPLoss",
    "GlobalContrastive",
    "MosaicContrastive",
    "RegionCLIPLoss",
    "RegionalContrastive",
    "SelfDistillation",
    "infonce_row_sum",
    "sample_concepts",
]
