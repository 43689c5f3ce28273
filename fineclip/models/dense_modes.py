"""Dense modes: how the image tower's last block runs to give the dense features.

The blocks before the last run once (``TowerAdapter.trunk``); the normal last block gives the global
embedding, and a dense mode runs the *same* last block (same weights) another way for the per-token
features. A mode is called as ``mode(block, x, ctx, use_checkpoint)`` and returns the tokens after
the block (before the final norm and projection).

- ``ValuePath`` (CLIPSelf, FineCLIP): each token attends only to itself (an identity attention
  mask), so the attention output is out_proj(V(ln_1 x)) exactly, followed by the usual MLP residual.

- ``SelfSelfAttention`` (DeCLIP, ``Attention.ss_attn`` + ``Block.forward_without_rcffn``): the last block
  becomes proj(inner_ln(A·V(norm1 x))) with A = softmax(QQᵀ) + softmax(KKᵀ) per head (``csa``, the mode of
  DeCLIP's released weights) or softmax(QQᵀ) / softmax(KKᵀ) / softmax(VVᵀ) (``qq``/``kk``/``vv``); no 1/√d
  scale, no rotary embedding, no residual, no MLP — as the reference computes it. timm EVA blocks only.

A new mode is a new ``DenseMode`` subclass, selected by ``model.dense_mode._target_`` in the model config.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


class SelfSelfAttention(DenseMode):
    """DeCLIP's last-block attention surgery (see the module docstring); ``mode``: csa, qq, kk or vv."""

    MODES = ("csa", "qq", "kk", "vv")

    def __init__(self, mode: str = "csa"):
        if mode not in self.MODES:
            raise ValueError(f"dense_mode.mode={mode!r}: use one of {', '.join(self.MODES)}")
        self.mode = self.name = mode

    def __call__(self, block, x, ctx, use_checkpoint):
        from timm.models.eva import EvaBlock

        if not isinstance(block, EvaBlock):
            raise ValueError(f"dense mode {self.mode} runs on timm EVA blocks (EVA02 models), "
                             f"not {type(block).__name__}")
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self.attend, block, x, use_reentrant=False)
        return self.attend(block, x)

    def attend(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        attn, (b, n, c) = block.attn, x.shape
        h = block.norm1(x)
        if attn.qkv is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
            q, k, v = torch.nn.functional.linear(h, attn.qkv.weight, bias).chunk(3, dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = (t.reshape(b, n, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = {"qq": (q,), "kk": (k,), "vv": (v,), "csa": (q, k)}[self.mode]
        weights = sum((t @ t.transpose(-2, -1)).softmax(dim=-1) for t in scores)
        out = attn.proj(attn.norm((weights @ v).transpose(1, 2).reshape(b, n, c)))
        return out if block.gamma_1 is None else block.gamma_1 * out
