"""Losses: each term is a small module over a dict of features, with its formula in the docstring."""

from fineclip.losses.composite import CompositeLoss, FineCLIPLoss
from fineclip.losses.contrastive import GlobalContrastive, RegionalContrastive, infonce_row_sum
from fineclip.losses.distillation import SelfDistillation

__all__ = [
    "CompositeLoss",
    "FineCLIPLoss",
    "GlobalContrastive",
    "RegionalContrastive",
    "SelfDistillation",
    "infonce_row_sum",
]
