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


def _eva_query_key(attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, N, d) of a timm ``EvaAttention`` on its input ``x``, as its forward makes them
    (fused or separate projections, q/k norms, rotary embedding of the patch tokens)."""
    from timm.layers import apply_rot_embed_cat

    b, n, _ = x.shape
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = F.linear(x, attn.qkv.weight, bias if not attn.qkv_bias_separate else None)
        if attn.qkv_bias_separate and bias is not None:
            qkv = qkv + bias
        q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    return q, k


@torch.no_grad()
def eva_tokens_and_cls_attention(trunk: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens_and_cls_attention`` for a timm ``Eva`` trunk (rotary embeddings): tokens after the last
    block (before the final norm) and the CLS→patch attention averaged over layers and heads."""
    captured: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    hooks = [block.attn.register_forward_pre_hook(
        lambda _m, args, kwargs: captured.append((args[0], kwargs.get("rope"))), with_kwargs=True)
        for block in trunk.blocks]
    try:
        x, rope = trunk._pos_embed(trunk.patch_embed(pixels))
        x = trunk.norm_pre(x)
        for block in trunk.blocks:
            x = block(x, rope=rope)
    finally:
        for hook in hooks:
            hook.remove()
    maps = []
    prefix = trunk.num_prefix_tokens
    for block, (inputs, block_rope) in zip(trunk.blocks, captured, strict=True):
        q, k = _eva_query_key(block.attn, inputs, block_rope)
        weights = torch.softmax(q[:, :, :1].float() @ k.float().transpose(-2, -1) * block.attn.scale, dim=-1)
        maps.append(weights[:, :, 0, prefix:].mean(dim=1))
    grid = trunk.patch_embed.grid_size
    return x, torch.stack(maps).mean(dim=0).reshape(pixels.shape[0], *grid)


def eva_kept_tokens(trunk: nn.Module, pixels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``encode_kept_tokens`` for a timm ``Eva`` trunk: the kept patches take their own rows of the
    rotary embedding. Returns (B, prefix + K, width) before the final norm."""
    index = _kept_index(keep)
    x, rope = trunk._pos_embed(trunk.patch_embed(pixels))
    prefix = trunk.num_prefix_tokens
    patches = x[:, prefix:].gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    x = trunk.norm_pre(torch.cat([x[:, :prefix], patches], dim=1))
    if rope is not None:  # (N, dim) -> (B, 1, K, dim): the head axis broadcast, as timm's patch dropout does
        rope = rope[index].unsqueeze(1)
    for block in trunk.blocks:
        x = block(x, rope=rope)
    return x


def _kept_index(keep: torch.Tensor) -> torch.Tensor:
    """(B, K) indices of the True entries of each row of ``keep`` (the same count in every row)."""
    counts = keep.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every image must keep the same number of tokens")
    return keep.nonzero()[:, 1].view(keep.shape[0], int(counts[0]))


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
    index = _kept_index(keep)
    x = visual._embeds(pixels)
    patches = x[:, 1:].gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    return visual.transformer(torch.cat([x[:, :1], patches], dim=1))
