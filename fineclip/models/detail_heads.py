"""DetailCLIP's trainable parts beside the CLIP model: the projection head shared by the CLS and
patch tokens, and the one-block decoder that fills the removed tokens with a mask token.

    head(x)    = W_last · normalise(MLP(x)),  MLP: width → hidden → hidden → bottleneck (GELU),
                 W_last bottleneck → out without bias, each row's norm fixed at 1 (DINO's head)
    decoder(z) = norm(block(scatter(embed(z), mask token at removed positions) + sin-cos positions))
    pixels     = linear(decoder output of each patch token) → patch·patch·3 values

Widths are ViT-B's (768 → 2048 → 2048 → 256 → 8192) scaled by the tower's width / 768 unless given.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, ResidualAttentionBlock
from timm.layers import build_sincos2d_pos_embed
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

VIT_B_WIDTH = 768
VIT_B_HEAD = {"hidden": 2048, "bottleneck": 256, "out_dim": 8192}


class DetailCLIPHead(nn.Module):
    """MLP in → hidden → hidden → bottleneck (GELU), L2-normalise, then a weight-normalised linear
    bottleneck → out without bias whose direction is learnt and norm fixed at 1 (DINO's head;
    768 → 2048 → 2048 → 256 → 8192 for ViT-B). Shared by the CLS and the patch tokens."""

    def __init__(self, in_dim: int, hidden: int = 2048, bottleneck: int = 256, out_dim: int = 8192) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class MaskedDecoder(nn.Module):
    """One transformer block over the encoder's output with a learnt mask token at every removed
    position (MAE's decoder, depth 1, at the encoder's width), and the pixel predictor."""

    def __init__(self, width: int, heads: int, grid: tuple[int, int], patch: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        positions = build_sincos2d_pos_embed(list(grid), dim=width)  # (h·w, width), fixed
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, width), positions])[None], persistent=False)
        self.block = ResidualAttentionBlock(width, heads, batch_first=True, norm_layer=partial(LayerNorm, eps=norm_eps))
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.pixels = nn.Linear(width, patch * patch * 3)

    def forward(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + K, width): CLS and the kept tokens in index order; keep (B, N) bool with K
        True per row. Returns (B, 1 + N, width)."""
        x = self.embed(latent)
        b, n, width = keep.shape[0], keep.shape[1], x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, n, width)
        full = full.masked_scatter(keep[..., None].expand(b, n, width), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed.to(x.dtype)
        return self.norm(self.block(x))


@torch.no_grad()
def reference_init(heads: nn.Module) -> None:
    """The public DetailCLIP code's initialisation: the head's MLP trunc-normal (std 0.02) with zero
    biases (DINO's head); the decoder's input projection and every linear layer of its block
    Xavier-uniform with zero biases, its layer norms 1 / 0 (MAE's decoder); the mask token N(0, 0.02²) and
    the pixel predictor as PyTorch makes them."""
    for layer in heads.head.mlp:
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)
            nn.init.zeros_(layer.bias)
    decoder = heads.decoder
    for module in (decoder.embed, *decoder.block.modules()):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):  # its fused q, k, v projection, as timm's qkv Linear
            nn.init.xavier_uniform_(module.in_proj_weight)
            nn.init.zeros_(module.in_proj_bias)
    nn.init.ones_(decoder.norm.weight)
    nn.init.zeros_(decoder.norm.bias)


def scaled_width(value: int | None, base: int, width: int) -> int:
    """``value``, or ViT-B's ``base`` scaled by width / 768 (a multiple of 8, at least 8)."""
    if value is not None:
        return int(value)
    return max(8, round(base * width / VIT_B_WIDTH / 8) * 8)


# DetailCLIP's student features: view_emb (V, B, D), student_cls (V, B, K), student_patch (V·B, R, K) at the R
# removed tokens, rec_pred (V·B, N, patch²·3)
DETAIL_FEATURES = frozenset({"view_emb", "student_cls", "student_patch", "rec_pred"})


class DetailCLIPHeads(nn.Module):
    """The head and the decoder, sized from the image tower, and the student pass that uses them:
    the model's extra pass (``FineCLIPModel.extra_passes``), which gives ``DETAIL_FEATURES`` from the
    views and kept tokens that the teacher chose (``taught``)."""

    provides = DETAIL_FEATURES
    section = "student views"

    def __init__(self, width: int, heads: int, grid: tuple[int, int], patch: int, hidden: int | None = None,
                 bottleneck: int | None = None, out_dim: int | None = None, decoder_heads: int | None = None,
                 norm_eps: float = 1e-5, init: str = "torch") -> None:
        super().__init__()
        self.head = DetailCLIPHead(width, scaled_width(hidden, VIT_B_HEAD["hidden"], width),
                                   scaled_width(bottleneck, VIT_B_HEAD["bottleneck"], width),
                                   scaled_width(out_dim, VIT_B_HEAD["out_dim"], width))
        self.decoder = MaskedDecoder(width, decoder_heads or heads, grid, patch, norm_eps)
        if init == "reference":
            reference_init(self)
        elif init != "torch":
            raise ValueError(f"detailclip init={init!r}: use torch (PyTorch's defaults) or reference")

    def forward(self, model, images: torch.Tensor, taught: dict, need) -> dict[str, torch.Tensor]:
        """The student on V·B normalised views (view-major) that keep the tokens where ``taught["keep"]``
        (V·B, N) is True: the views' embeddings, the head on CLS (encoder) and on the removed tokens
        (decoder), and the decoder's pixel predictions; only those in ``need``."""
        views, keep = taught["views"], taught["keep"]
        x = model.tower.kept_tokens(views, keep)  # (V·B, 1 + K, width), before the final norm
        views_count = len(views) // len(images)
        view_emb = F.normalize(model.tower.global_head(x), dim=-1)
        latent = model.tower.final_norm(x)
        decoded = self.decoder(latent, keep)[:, 1:]  # (V·B, N, width)
        removed = ~keep
        removed_tokens = decoded[removed].view(len(views), int(removed[0].sum()), decoded.shape[-1])
        out = {
            "view_emb": view_emb.view(views_count, len(images), -1),
            "student_cls": self.head(latent[:, 0]).view(views_count, len(images), -1),
            "student_patch": self.head(removed_tokens),
            "rec_pred": self.decoder.pixels(decoded),
        }
        return {k: v for k, v in out.items() if k in need}
