"""Dense modes: how the image tower's last block runs to give the dense features.

The blocks before the last run once (``TowerAdapter.trunk``); the normal last block gives the global
embedding, and a dense mode runs the *same* last block (same weights) another way for the per-token
features. A mode is called as ``mode(block, x, ctx, use_checkpoint)`` and returns the tokens after
the block (before the final norm and projection).

- ``ValuePath`` (CLIPSelf, FineCLIP): each token attends only to itself (an identity attention
  mask), so the attention output is out_proj(V(ln_1 x)) exactly, followed by the usual MLP residual.

- ``SelfSelfAttention`` (DeCLIP, ``Attention.ss_attn`` + ``Block.forward_without_rcffn``): the last block
  becomes ls(proj(inner_norm(A·V(norm1 x)))) with A = softmax(QQᵀ) + softmax(KKᵀ) per head (``csa``, the mode of
  DeCLIP's released weights) or softmax(QQᵀ) / softmax(KKᵀ) / softmax(VVᵀ) (``qq``/``kk``/``vv``); no residual,
  no MLP, no rotary embedding, and no 1/√d scale (as DeCLIP's EVA code computes it; ``scaled=True`` multiplies
  the scores by 1/√d, as DeCLIP's OpenAI-ViT code does). Both tower kinds: timm EVA blocks (inner norm = the
  attention sub-LN, ls = gamma_1) and open_clip ``ResidualAttentionBlock`` (no inner norm, ls = ls_1). It also
  gives DeCLIP's *context* features: the block's Q (``qq``), K (``kk``), V (``vv``) or Q and K (``csa``)
  projections of every token, heads concatenated (``with_context``).

A new mode is a new ``DenseMode`` subclass, selected by ``model.dense_mode._target_`` in the model config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fineclip.models.blocks import run_block


class DenseMode:
    """One way of running the last block for the dense features; ``name`` is how docs and logs call it."""

    name = "dense_mode"
    gives_context = False  # True: ``with_context`` also returns the block's context features

    def __call__(self, block: nn.Module, x: torch.Tensor, ctx: dict, use_checkpoint: bool) -> torch.Tensor:
        raise NotImplementedError

    def with_context(self, block: nn.Module, x: torch.Tensor, ctx: dict, use_checkpoint: bool):
        """(tokens, context (P, B, T, C)): the tokens of ``__call__`` and the P projections the mode attends with."""
        raise ValueError(f"dense mode {self.name} gives no context features: use "
                         "model.dense_mode._target_=fineclip.models.dense_modes.SelfSelfAttention (method=declip)")


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




def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, heads, T, C / heads)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class SelfSelfAttention(DenseMode):
    """DeCLIP's last-block attention surgery (see the module docstring); ``mode``: csa, qq, kk or vv."""

    MODES = ("csa", "qq", "kk", "vv")
    gives_context = True

    def __init__(self, mode: str = "csa", scaled: bool = False):
        if mode not in self.MODES:
            raise ValueError(f"dense_mode.mode={mode!r}: use one of {', '.join(self.MODES)}")
        self.mode, self.scaled = mode, scaled
        self.name = f"{mode}_scaled" if scaled else mode

    def __call__(self, block, x, ctx, use_checkpoint):
        return self.with_context(block, x, ctx, use_checkpoint)[0]

    def with_context(self, block, x, ctx, use_checkpoint):
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self.attend, block, x, use_reentrant=False)
        return self.attend(block, x)

    def attend(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens after the rewritten block (B, T, C), context (P, B, T, C))."""
        q, k, v, heads, finish = self.projections(block, x)
        context = {"qq": (q,), "kk": (k,), "vv": (v,), "csa": (q, k)}[self.mode]
        scale = (x.shape[-1] // heads) ** -0.5 if self.scaled else 1.0
        weights = sum((scale * split_heads(t, heads) @ split_heads(t, heads).transpose(-2, -1)).softmax(dim=-1)
                      for t in context)
        out = (weights @ split_heads(v, heads)).transpose(1, 2).reshape(x.shape)
        return finish(out), torch.stack(context)

    @staticmethod
    def projections(block: nn.Module, x: torch.Tensor):
        """(Q, K, V of the block's normed input, each (B, T, C); heads; the block's attention output path)."""
        from open_clip.transformer import ResidualAttentionBlock
        from timm.models.eva import EvaBlock

        if isinstance(block, EvaBlock):
            attn, h = block.attn, block.norm1(x)
            if attn.qkv is not None:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else None
                q, k, v = F.linear(h, attn.qkv.weight, bias).chunk(3, dim=-1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

            def finish(out):
                out = attn.proj(attn.norm(out))
                return out if block.gamma_1 is None else block.gamma_1 * out

            return q, k, v, attn.num_heads, finish
        if isinstance(block, ResidualAttentionBlock) and isinstance(block.attn, nn.MultiheadAttention):
            attn = block.attn
            q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            return q, k, v, attn.num_heads, lambda out: block.ls_1(attn.out_proj(out))
        raise ValueError(f"dense mode SelfSelfAttention runs on timm EVA blocks and open_clip ResidualAttentionBlocks, "
                         f"not {type(block).__name__}")
