"""EVA-CLIP's native checkpoint layout, written from its definition (``eva_clip/eva_vit_model.py``,
``eva_clip/rope.py``, ``eva_clip/transformer.py`` of the EVA-CLIP / FineCLIP code), and a float64
computation of what such a state dict means. Independent of timm and open_clip: the tests compare the
converted open_clip model with it.

Vision tower (``EVAVisionTransformer`` with ``rope, subln, naiveswiglu, qkv_bias``, ``use_mean_pooling=False``,
LayerNorm eps 1e-6): x = [cls; patches] + pos; per block
    x += proj(inner_ln(softmax(rope(q)·rope(k)ᵀ/√d) v)),  q = W_q h + b_q, k = W_k h, v = W_v h + b_v, h = norm1(x)
    x += w3(ffn_ln(silu(w1 h') ⊙ w2 h')),  h' = norm2(x)
rope on the patch tokens only, interleaved pairs rotated, positions t = arange(g)/g·pt_seq_len per axis.
Global: head(norm(x)[0]). Dense (``encode_dense``): the last block without attention,
x += proj(inner_ln(v)), then the MLP; head(norm(x[1:])), L2-normalised. RoI: RoIAlign (1×1, aligned).
DeCLIP's ``ss_attn`` modes replace the last block by proj(inner_ln(A v)), A = softmax(qqᵀ)+softmax(kkᵀ)
(``csa``) or softmax(qqᵀ) (``qq``): no scale, no rope, no residual, no MLP.
Text tower: open_clip's causal transformer (LayerNorm eps 1e-5, GELU), EOT (argmax) token, projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

TINY = {"width": 64, "heads": 2, "depth": 2, "patch": 16, "image": 64, "pt_seq_len": 16, "mlp": 170,
        "embed": 32, "text_width": 64, "text_heads": 2, "text_layers": 1, "context": 16, "vocab": 49408}


def rope_tables(head_dim: int, grid: int, pt_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len, ft_seq_len=grid)``: (grid², head_dim) cos, sin."""
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    t = torch.arange(grid, dtype=torch.float64) / grid * pt_seq_len
    f = torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # (grid, dim): each frequency twice, interleaved
    rows = f[:, None, :].expand(grid, grid, dim)
    cols = f[None, :, :].expand(grid, grid, dim)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 2 * dim)
    return table.cos(), table.sin()


def generate(seed: int = 0, cfg: dict = TINY, text_at_top: bool = False) -> dict[str, torch.Tensor]:
    """A random state dict in EVA-CLIP's native layout (every tensor non-trivial, so each role matters)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, n):
        return {f"{prefix}.weight": 1 + rand(n), f"{prefix}.bias": rand(n)}

    w, p, m, e = cfg["width"], cfg["patch"], cfg["mlp"], cfg["embed"]
    grid = cfg["image"] // p
    cos, sin = rope_tables(w // cfg["heads"], grid, cfg["pt_seq_len"])
    s = {"visual.cls_token": rand(1, 1, w, scale=0.5), "visual.pos_embed": rand(1, 1 + grid * grid, w, scale=0.5),
         "visual.patch_embed.proj.weight": rand(w, 3, p, p, scale=0.05), "visual.patch_embed.proj.bias": rand(w),
         "visual.rope.freqs_cos": cos.float(), "visual.rope.freqs_sin": sin.float()}
    for i in range(cfg["depth"]):
        b = f"visual.blocks.{i}"
        s |= norm(f"{b}.norm1", w) | norm(f"{b}.norm2", w) | norm(f"{b}.attn.inner_attn_ln", w)
        s |= norm(f"{b}.mlp.ffn_ln", m)
        s |= {f"{b}.attn.q_proj.weight": rand(w, w, scale=0.2), f"{b}.attn.k_proj.weight": rand(w, w, scale=0.2),
              f"{b}.attn.v_proj.weight": rand(w, w, scale=0.2), f"{b}.attn.q_bias": rand(w),
              f"{b}.attn.v_bias": rand(w), f"{b}.attn.proj.weight": rand(w, w, scale=0.2),
              f"{b}.attn.proj.bias": rand(w), f"{b}.attn.rope.freqs_cos": cos.float(),
              f"{b}.attn.rope.freqs_sin": sin.float(),
              f"{b}.mlp.w1.weight": rand(m, w, scale=0.2), f"{b}.mlp.w1.bias": rand(m),
              f"{b}.mlp.w2.weight": rand(m, w, scale=0.2), f"{b}.mlp.w2.bias": rand(m),
              f"{b}.mlp.w3.weight": rand(w, m, scale=0.2), f"{b}.mlp.w3.bias": rand(w)}
    s |= norm("visual.norm", w) | {"visual.head.weight": rand(e, w, scale=0.2), "visual.head.bias": rand(e)}
    tw = cfg["text_width"]
    text = {"positional_embedding": rand(cfg["context"], tw), "token_embedding.weight": rand(cfg["vocab"], tw),
            "text_projection": rand(tw, e, scale=0.2)} | norm("ln_final", tw)
    for i in range(cfg["text_layers"]):
        b = f"transformer.resblocks.{i}"
        text |= norm(f"{b}.ln_1", tw) | norm(f"{b}.ln_2", tw)
        text |= {f"{b}.attn.in_proj_weight": rand(3 * tw, tw, scale=0.2), f"{b}.attn.in_proj_bias": rand(3 * tw),
                 f"{b}.attn.out_proj.weight": rand(tw, tw, scale=0.2), f"{b}.attn.out_proj.bias": rand(tw),
                 f"{b}.mlp.c_fc.weight": rand(4 * tw, tw, scale=0.2), f"{b}.mlp.c_fc.bias": rand(4 * tw),
                 f"{b}.mlp.c_proj.weight": rand(tw, 4 * tw, scale=0.2), f"{b}.mlp.c_proj.bias": rand(tw)}
    s |= {(k if text_at_top else f"text.{k}"): v for k, v in text.items()}
    s["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return s


def _ln(x, s, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], s[f"{prefix}.weight"], s[f"{prefix}.bias"], eps)


def _lin(x, s, prefix, bias=None):
    b = s.get(f"{prefix}.bias") if bias is None else bias
    return x @ s[f"{prefix}.weight"].T + (0 if b is None else b)


def _rotate_half(x):
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(x.shape)


def _heads(x, heads):
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _qkv(s, b, h, heads):
    q = _heads(_lin(h, s, f"{b}.attn.q_proj", s[f"{b}.attn.q_bias"]), heads)
    k = _heads(h @ s[f"{b}.attn.k_proj.weight"].T, heads)
    v = _heads(_lin(h, s, f"{b}.attn.v_proj", s[f"{b}.attn.v_bias"]), heads)
    return q, k, v


def _mlp(x, s, b):
    h = _ln(x, s, f"{b}.norm2", 1e-6)
    hidden = F.silu(_lin(h, s, f"{b}.mlp.w1")) * _lin(h, s, f"{b}.mlp.w2")
    return _lin(_ln(hidden, s, f"{b}.mlp.ffn_ln", 1e-6), s, f"{b}.mlp.w3")


def _attn_out(s, b, o):
    o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)
    return _lin(_ln(o, s, f"{b}.attn.inner_attn_ln", 1e-6), s, f"{b}.attn.proj")


def _block(x, s, b, heads, cos, sin):
    q, k, v = _qkv(s, b, _ln(x, s, f"{b}.norm1", 1e-6), heads)
    q = torch.cat([q[:, :, :1], q[:, :, 1:] * cos + _rotate_half(q[:, :, 1:]) * sin], dim=2)
    k = torch.cat([k[:, :, :1], k[:, :, 1:] * cos + _rotate_half(k[:, :, 1:]) * sin], dim=2)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    x = x + _attn_out(s, b, attn @ v)
    return x + _mlp(x, s, b)


def _dense_last_block(x, s, b, heads, mode):
    """(tokens after the last block in ``mode``, DeCLIP's context: the Q/K/V projections, heads concatenated)."""
    q, k, v = _qkv(s, b, _ln(x, s, f"{b}.norm1", 1e-6), heads)
    if mode == "value":
        x = x + _attn_out(s, b, v)
        return x + _mlp(x, s, b), None
    qq, kk = (q @ q.transpose(-2, -1)).softmax(-1), (k @ k.transpose(-2, -1)).softmax(-1)
    vv = (v @ v.transpose(-2, -1)).softmax(-1)
    weights = {"csa": qq + kk, "qq": qq, "kk": kk, "vv": vv}[mode]
    merge = [t.transpose(1, 2).reshape(x.shape) for t in {"csa": (q, k), "qq": (q,), "kk": (k,), "vv": (v,)}[mode]]
    return _attn_out(s, b, weights @ v), torch.stack(merge)


def _pos_embed(s, grid):
    pos = s["visual.pos_embed"]
    native = math.isqrt(pos.shape[1] - 1)
    if native == grid:
        return pos
    patches = pos[0, 1:].T.reshape(1, -1, native, native)  # EVA's rescale_positional_embedding
    patches = F.interpolate(patches, (grid, grid), mode="bicubic", align_corners=False).reshape(-1, grid * grid)
    return torch.cat([pos[:, :1], patches.T[None]], dim=1)


def vision(s: dict, pixels: torch.Tensor, cfg: dict = TINY, dense_mode: str = "value", with_context: bool = False):
    """(global embedding (B, E), dense features (B, E, g, g) L2-normalised per token), float64; with
    ``with_context`` also the dense mode's context features of the patch tokens (P, B, g·g, width)."""
    s = {k: v.double() for k, v in s.items()}
    pixels, heads = pixels.double(), cfg["heads"]
    x = F.conv2d(pixels, s["visual.patch_embed.proj.weight"], s["visual.patch_embed.proj.bias"], stride=cfg["patch"])
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.cls_token"].expand(len(x), -1, -1), x], dim=1) + _pos_embed(s, grid)
    cos, sin = rope_tables(cfg["width"] // heads, grid, cfg["pt_seq_len"])
    for i in range(cfg["depth"] - 1):
        x = _block(x, s, f"visual.blocks.{i}", heads, cos, sin)
    last = f"visual.blocks.{cfg['depth'] - 1}"
    out = _block(x, s, last, heads, cos, sin)
    image = _lin(_ln(out, s, "visual.norm", 1e-6)[:, 0], s, "visual.head")
    dense, context = _dense_last_block(x, s, last, heads, dense_mode)
    tokens = F.normalize(_lin(_ln(dense[:, 1:], s, "visual.norm", 1e-6), s, "visual.head"), dim=-1)
    dense = tokens.transpose(1, 2).reshape(len(x), -1, grid, grid)
    return (image, dense, context[:, :, 1:]) if with_context else (image, dense)


def roi_features(dense: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """EVA-CLIP's ``extract_roi_features``: boxes (M, 5) in pixels, RoIAlign 1×1 aligned, then normalised."""
    pooled = roi_align(dense, boxes.double(), (1, 1), dense.shape[-1] / image_size, -1, True)[..., 0, 0]
    return F.normalize(pooled, dim=-1)


def text(s: dict, tokens: torch.Tensor, cfg: dict = TINY) -> torch.Tensor:
    """The text tower's embedding (B, E), float64."""
    s = {k.removeprefix("text."): v.double() for k, v in s.items()}
    x = s["token_embedding.weight"][tokens] + s["positional_embedding"]
    n, heads = tokens.shape[1], cfg["text_heads"]
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(cfg["text_layers"]):
        b = f"transformer.resblocks.{i}"
        h = _ln(x, s, f"{b}.ln_1", 1e-5)
        q, k, v = (_heads(t, heads) for t in (h @ s[f"{b}.attn.in_proj_weight"].T
                                              + s[f"{b}.attn.in_proj_bias"]).chunk(3, dim=-1))
        attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + causal).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(x.shape)
        x = x + _lin(o, s, f"{b}.attn.out_proj")
        h = _ln(x, s, f"{b}.ln_2", 1e-5)
        x = x + _lin(F.gelu(_lin(h, s, f"{b}.mlp.c_fc")), s, f"{b}.mlp.c_proj")
    x = _ln(x, s, "ln_final", 1e-5)
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ s["text_projection"]
