"""The CLS token's attention to the patch tokens, recomputed from each block's own projections
(open_clip blocks call attention without returning its weights), and DetailCLIP's choice of the
tokens to keep from it.

    A_l = softmax(q_l k_lᵀ / √d) per head, q_l, k_l = in_proj(ln_1(x_l)) of block l
    attention map = mean over layers l and heads of A_l[CLS, patches]            (B, h, w)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _open_clip_blocks(visual: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or not all(isinstance(b.attn, nn.MultiheadAttention) for b in blocks):
        raise NotImplementedError("CLS attention and kept-token passes need an open_clip VisionTransformer "
                                  "(nn.MultiheadAttention blocks), e.g. model=tiny or model=vit_b16")
    return blocks


@torch.no_grad()
def tokens_and_cls_attention(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of an open_clip ``VisionTransformer``: its tokens after the last block, before the
    final norm (B, 1 + h·w, width), and the (B, h, w) CLS→patch attention averaged over all layers
    and heads, from the inputs of every block's attention (captured by hooks on ``ln_1``)."""
    blocks = _open_clip_blocks(visual)
    inputs: list[torch.Tensor] = []
    hooks = [b.ln_1.register_forward_hook(lambda _m, _i, out: inputs.append(out)) for b in blocks]
    try:
        tokens = visual.transformer(visual._embeds(pixels))
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    for block, x in zip(blocks, inputs, strict=True):
        attn: nn.MultiheadAttention = block.attn
        x = x if attn.batch_first or x.shape[0] == pixels.shape[0] else x.transpose(0, 1)  # (B, N, C)
        q, k, _ = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads, dim = attn.num_heads, x.shape[-1] // attn.num_heads
        q = q[:, :1].reshape(x.shape[0], 1, heads, dim).transpose(1, 2)  # the CLS query only
        k = k.reshape(x.shape[0], -1, heads, dim).transpose(1, 2)
        weights = torch.softmax(q.float() @ k.float().transpose(-2, -1) / math.sqrt(dim), dim=-1)  # (B, H, 1, N)
        maps.append(weights[:, :, 0, 1:].mean(dim=1))
    grid = visual.grid_size
    return tokens, torch.stack(maps).mean(dim=0).reshape(pixels.shape[0], *grid)


def cls_attention(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, h, w) CLS→patch attention of an open_clip ``VisionTransformer`` (``tokens_and_cls_attention``)."""
    return tokens_and_cls_attention(visual, pixels)[1]


def kept_tokens(attention: torch.Tensor, cells: int = 7, ratio: float = 0.5) -> torch.Tensor:
    """DetailCLIP's token removal: the (B, h, w) attention map averaged onto a ``cells`` × ``cells``
    grid, the ⌊cells²·ratio⌋ + 1 highest cells kept; returns a (B, h·w) bool mask of the patch
    tokens inside kept cells (h, w multiples of ``cells``)."""
    b, h, w = attention.shape
    if h % cells or w % cells:
        raise ValueError(f"a {h}x{w} token grid does not divide into {cells}x{cells} cells")
    pooled = F.adaptive_avg_pool2d(attention[:, None], cells).flatten(1)  # (B, cells²)
    keep = pooled.topk(math.floor(cells * cells * ratio) + 1, dim=1).indices
    cell_mask = torch.zeros_like(pooled, dtype=torch.bool).scatter_(1, keep, True).view(b, 1, cells, cells)
    return F.interpolate(cell_mask.float(), size=(h, w), mode="nearest").bool().flatten(1)


def encode_kept_tokens(visual: nn.Module, pixels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The student's pass over the kept tokens only: an open_clip ``VisionTransformer``'s embedded
    tokens (CLS + patches, position embeddings added), the patches where the (B, N) ``keep`` mask is
    True (the same count in every row, as ``kept_tokens`` gives), through every block. Returns
    (B, 1 + K, width) before the final norm."""
    _open_clip_blocks(visual)
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every image must keep the same number of tokens")
    x = visual._embeds(pixels)
    index = keep.nonzero()[:, 1].view(keep.shape[0], int(counts[0]))
    patches = x[:, 1:].gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    return visual.transformer(torch.cat([x[:, :1], patches], dim=1))
