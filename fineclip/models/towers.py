"""Adapters that split an open_clip image tower into "all blocks but the last" and the last block.

FineCLIP needs two outputs from one trunk pass: the global embedding (normal last block) and dense
features (value-path last block, CLIPSelf-style). Both open_clip tower kinds are covered:
``VisionTransformer`` (e.g. ``ViT-B-16``) and ``TimmModel`` around a timm ``Eva`` (e.g.
``EVA02-B-16``). ``last_block(x, ctx, mode)`` runs the normal last block (``mode=None``) or a dense
mode of it (``fineclip/models/dense_modes.py``; the value path by default).
"""

from __future__ import annotations

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from fineclip.models.attention import (
    encode_kept_tokens,
    eva_kept_tokens,
    eva_tokens_and_cls_attention,
    tokens_and_cls_attention,
)
from fineclip.models.blocks import run_block
from fineclip.models.dense_modes import DenseMode


class TowerAdapter:
    """Common interface: ``trunk`` runs all blocks but the last; heads finish either branch.

    A plain object holding a reference to the tower (not a submodule, so that the weights appear
    once in the state dict, under the open_clip model).
    """

    visual: nn.Module
    patch_size: tuple[int, int]

    prefix_tokens: int  # class (and register) tokens before the patch tokens

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Patch tokens with prefix tokens and position embeddings: (tokens, the blocks' keyword arguments)."""
        raise NotImplementedError

    def trunk(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """All blocks but the last: (tokens, the blocks' keyword arguments)."""
        x, ctx, _ = self.trunk_taps(images, ())
        return x, ctx

    def trunk_taps(self, images: torch.Tensor, taps) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
        """``trunk`` and the tokens after each block of ``taps`` (0-based, before the last block)."""
        x, ctx = self.embed(images)
        tapped = []
        for index, block in enumerate(self.blocks()[:-1]):
            x = run_block(block, x, self.grad_checkpointing(), **ctx)
            if index in taps:
                tapped.append(x)
        return x, ctx, tapped

    def last_block(self, x: torch.Tensor, ctx: dict, mode: DenseMode | None = None) -> torch.Tensor:
        """The last block on the trunk's output: as it is (``mode=None``) or in a dense mode."""
        block, use_checkpoint = self.blocks()[-1], self.grad_checkpointing()
        if mode is None:
            return run_block(block, x, use_checkpoint, **ctx)
        return mode(block, x, ctx, use_checkpoint)

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def grad_checkpointing(self) -> bool:
        raise NotImplementedError

    def global_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + projection of every patch token (prefix tokens dropped): (B, N, D)."""
        raise NotImplementedError

    # -- DetailCLIP's passes ------------------------------------------------------------------------
    width: int
    heads: int

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's final norm over every token (B, T, width)."""
        raise NotImplementedError(f"{type(self).__name__} has no DetailCLIP passes: use an open_clip ViT tower")

    def tokens_and_cls_attention(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens after the last block (B, 1 + N, width), CLS→patch attention (B, h, w))."""
        raise NotImplementedError(f"{type(self).__name__} has no DetailCLIP passes: use an open_clip ViT tower")

    def kept_tokens(self, pixels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The pass over CLS and the patch tokens where ``keep`` (B, N) is True: (B, 1 + K, width)."""
        raise NotImplementedError(f"{type(self).__name__} has no DetailCLIP passes: use an open_clip ViT tower")


class OpenCLIPViTAdapter(TowerAdapter):
    def __init__(self, visual: VisionTransformer):
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("towers with attentional pooling have no per-token projection")
        if getattr(visual.patch_dropout, "prob", 0.0) > 0:
            raise ValueError("patch dropout removes tokens that the dense features need")
        if not visual.transformer.batch_first:
            raise ValueError("only batch-first open_clip transformers are supported")
        self.visual = visual
        self.patch_size = tuple(visual.patch_size)
        self.width = visual.transformer.width
        self.heads = visual.transformer.resblocks[0].attn.num_heads
        self.prefix_tokens = 1

    def embed(self, images):
        return self.visual._embeds(images), {}

    def blocks(self):
        return self.visual.transformer.resblocks

    def grad_checkpointing(self):
        return self.visual.transformer.grad_checkpointing

    def global_head(self, x):
        pooled, _ = self.visual._pool(x)
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled

    def dense_head(self, x):
        tokens = self.visual.ln_post(x[:, 1:])
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens

    def final_norm(self, x):
        return self.visual.ln_post(x)

    def tokens_and_cls_attention(self, pixels):
        return tokens_and_cls_attention(self.visual, pixels)

    def kept_tokens(self, pixels, keep):
        return encode_kept_tokens(self.visual, pixels, keep)


class TimmEvaAdapter(TowerAdapter):
    def __init__(self, visual: TimmModel):
        trunk = visual.trunk
        if not hasattr(trunk, "_pos_embed") or not hasattr(trunk, "blocks"):
            raise ValueError(f"unsupported timm trunk {type(trunk).__name__}: needs a ViT/Eva trunk")
        if getattr(trunk, "rope_mixed", False):
            raise ValueError("depth-dependent (mixed) rotary embeddings are not supported")
        self.visual = visual
        self.patch_size = tuple(trunk.patch_embed.patch_size)
        self.width = trunk.embed_dim
        self.heads = trunk.blocks[0].attn.num_heads
        self.prefix_tokens = trunk.num_prefix_tokens

    def embed(self, images):
        trunk = self.visual.trunk
        x, rope = trunk._pos_embed(trunk.patch_embed(images))
        return trunk.norm_pre(x), ({"rope": rope} if rope is not None else {})

    def blocks(self):
        return self.visual.trunk.blocks

    def grad_checkpointing(self):
        return self.visual.trunk.grad_checkpointing

    def global_head(self, x):
        trunk = self.visual.trunk
        return self.visual.head(trunk.forward_head(trunk.norm(x)))

    def dense_head(self, x):
        trunk = self.visual.trunk
        tokens = trunk.norm(x)[:, trunk.num_prefix_tokens :]
        return self.visual.head(trunk.head(trunk.fc_norm(tokens)))

    def final_norm(self, x):
        return self.visual.trunk.norm(x)

    def tokens_and_cls_attention(self, pixels):
        return eva_tokens_and_cls_attention(self.visual.trunk, pixels)

    def kept_tokens(self, pixels, keep):
        return eva_kept_tokens(self.visual.trunk, pixels, keep)


def make_tower_adapter(visual: nn.Module) -> TowerAdapter:
    if isinstance(visual, VisionTransformer):
        return OpenCLIPViTAdapter(visual)
    if isinstance(visual, TimmModel):
        return TimmEvaAdapter(visual)
    raise ValueError(
        f"image tower {type(visual).__name__} is not a ViT: fineclip needs open_clip's "
        "VisionTransformer or a timm ViT/Eva trunk (TimmModel)"
    )
