"""The recomputed CLS attention against nn.MultiheadAttention's own weights, and DetailCLIP's
kept-token rule against a loop over cells."""

import math

import torch

from fineclip.models.attention import cls_attention, kept_tokens


def test_cls_attention_equals_the_attention_modules_own_weights(tiny_model):
    visual = tiny_model.clip.visual
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
             for b in visual.transformer.resblocks]
    with torch.no_grad():
        visual(pixels)
    for h in hooks:
        h.remove()
    expected = []
    with torch.no_grad():
        for block, x in zip(visual.transformer.resblocks, inputs, strict=True):
            _, weights = block.attn(x, x, x, need_weights=True, average_attn_weights=True)  # (B, N, N)
            expected.append(weights[:, 0, 1:])
    expected = torch.stack(expected).mean(0).reshape(2, 8, 8)
    got = cls_attention(visual, pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=(1, 2)), expected.sum(dim=(1, 2)))


def test_kept_tokens_keep_the_top_cells_of_the_pooled_map():
    g = torch.Generator().manual_seed(1)
    attention = torch.rand(3, 14, 14, generator=g)
    mask = kept_tokens(attention, cells=7, ratio=0.5)
    assert mask.shape == (3, 196) and (mask.sum(1) == 4 * (math.floor(49 * 0.5) + 1)).all()  # 25 cells, 100 tokens
    for b in range(3):
        cell_means = {(i, j): attention[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean().item()
                      for i in range(7) for j in range(7)}
        top = sorted(cell_means, key=cell_means.get, reverse=True)[:25]
        expected = torch.zeros(14, 14, dtype=torch.bool)
        for i, j in top:
            expected[2 * i:2 * i + 2, 2 * j:2 * j + 2] = True
        assert torch.equal(mask[b], expected.flatten())


def _check_kept_pass(short_pass, full_pass, size, tokens, kept, seed):
    """``short_pass(pixels, keep)`` on the kept tokens equals, on CLS and the kept rows,
    ``full_pass(pixels, mask)`` over the whole sequence with every query barred from the removed keys."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, size, size, generator=g)
    keep = torch.zeros(2, tokens, dtype=torch.bool)
    for b in range(2):
        keep[b, torch.randperm(tokens, generator=g)[:kept]] = True
    with torch.no_grad():
        short = short_pass(pixels, keep)
        for b in range(2):
            removed = torch.cat([torch.tensor([False]), ~keep[b]])
            mask = torch.zeros(tokens + 1, tokens + 1).masked_fill(removed[None, :], float("-inf"))
            full = full_pass(pixels[b : b + 1], mask)[0]
            kept_rows = torch.cat([torch.tensor([True]), keep[b]])
            torch.testing.assert_close(short[b], full[kept_rows], rtol=1e-5, atol=1e-5)


def test_kept_token_pass_equals_the_full_pass_with_removed_tokens_masked_out(tiny_model):
    from fineclip.models.attention import encode_kept_tokens

    visual = tiny_model.clip.visual
    _check_kept_pass(lambda x, keep: encode_kept_tokens(visual, x, keep),
                     lambda x, mask: visual.transformer(visual._embeds(x), attn_mask=mask), 64, 64, 20, seed=3)


def _tiny_eva():
    from fineclip.models import create_model

    torch.manual_seed(0)
    return create_model("fineclip-tiny-eva", freeze_text=False).eval()


def test_eva_cls_attention_equals_timms_own_softmax_with_rotary_embeddings():
    from fineclip.models.attention import eva_tokens_and_cls_attention

    trunk = _tiny_eva().clip.visual.trunk
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    weights = []
    for block in trunk.blocks:  # timm's unfused path applies attn_drop to the softmax: capture it there
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: weights.append(out))
    with torch.no_grad():
        reference_tokens = trunk.forward_features(pixels)
    expected = torch.stack([w[:, :, 0, 1:].mean(1) for w in weights]).mean(0).reshape(2, 4, 4)
    tokens, got = eva_tokens_and_cls_attention(trunk, pixels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(trunk.norm(tokens), reference_tokens, rtol=1e-5, atol=1e-5)


def test_eva_kept_token_pass_equals_the_full_pass_with_removed_tokens_masked_out():
    from fineclip.models.attention import eva_kept_tokens

    trunk = _tiny_eva().clip.visual.trunk
    _check_kept_pass(lambda x, keep: trunk.norm(eva_kept_tokens(trunk, x, keep)),
                     lambda x, mask: trunk.forward_features(x, attn_mask=mask), 56, 16, 7, seed=5)
