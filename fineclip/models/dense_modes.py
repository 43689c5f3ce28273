"""Dense modes: how the image tower's last block runs to give the dense features.

The blocks before the last run once (``TowerAdapter.trunk``); the normal last block gives the global
embedding, and a dense mode runs the *same* last block (same weights) another way for the per-token
features. A mode is called as ``mode(block, x, ctx, use_checkpoint)`` and returns the tokens after
the block (before the final norm and projection).

- ``ValuePath`` (CLIPSelf, FineCLIP): each token attends only to itself (an identity attention
  mask), so the attention output is out_proj(V(ln_1 x)) exactly, followed by the usual MLP residual.

A new mode (e.g. DeCLIP's q·q, k·k or CSA attention) is a new module with a ``DenseMode`` subclass,
selected by ``model.dense_mode._target_`` in the model config.
"""

from __future__ import annotations

import torch
from torch import nn

from fineclip.models.blocks import run_block


class DenseMode:
    """One way of running the last block for the dense features; ``name`` is how docs and logs call it."""

    name = "dense_mode"

    def __call__(self, block: nn.Module, x: torch.Tensor, ctx: dict, use_checkpoint: bool) -> torch.Tensor:
        raise NotImplementedError


def identity_attention_mask(num_tokens: int, device, dtype) -> torch.Tensor:
    """Additive mask (N, N): 0 on the diagonal, -inf elsewhere."""
    mask = torch.full((num_tokens, num_tokens), float("-inf"), device=device, dtype=dtype)
    return mask.fill_diagonal_(0.0)


class ValuePath(DenseMode):
    """The unchanged last block under an identity attention mask: softmax(q·kᵀ + mask) = I, so each
    token's attention output is out_proj(V(ln_1 x)) (open_clip ViTs and timm Eva trunks alike)."""

    name = "value"

    def __call__(self, block, x, ctx, use_checkpoint):
        mask = identity_attention_mask(x.shape[1], x.device, x.dtype)
        return run_block(block, x, use_checkpoint, attn_mask=mask, **ctx)
