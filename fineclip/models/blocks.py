"""Running one transformer block, stored or recomputed in backward."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(block: nn.Module, x: torch.Tensor, use_checkpoint: bool, **kwargs) -> torch.Tensor:
    """``block(x, **kwargs)``, recomputed in backward instead of stored when ``use_checkpoint``."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False, **kwargs)
    return block(x, **kwargs)
