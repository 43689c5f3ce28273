import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from fineclip.engine.step import forward_loss
from fineclip.losses import FineCLIPLoss
from fineclip.models import create_model, crop_regions, enlarge_boxes


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@torch.no_grad()
def test_global_path_of_shared_trunk_equals_open_clip_encode_image(tiny_model):
    pixels = tiny_model.normalize_pixels(_images())
    image_emb, dense = tiny_model.encode_image_dense(pixels)
    reference = F.normalize(tiny_model.clip.encode_image(pixels), dim=-1)
    torch.testing.assert_close(image_emb, reference, rtol=1e-5, atol=1e-6)
    assert dense.shape == (2, 64, 8, 8)
    torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 8, 8))


@torch.no_grad()
def test_value_path_dense_features_match_hand_computation(tiny_model):
    visual = tiny_model.clip.visual
    pixels = tiny_model.normalize_pixels(_images())
    # hand computation: every block but the last as usual, then x + out_proj(V(ln_1 x)) + MLP residual
    x = visual._embeds(pixels)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    width = x.shape[-1]
    w_v = last.attn.in_proj_weight[2 * width :]
    b_v = last.attn.in_proj_bias[2 * width :]
    y = x + last.attn.out_proj(F.linear(last.ln_1(x), w_v, b_v))
    y = y + last.mlp(last.ln_2(y))
    tokens = F.normalize(visual.ln_post(y[:, 1:]) @ visual.proj, dim=-1)
    expected = tokens.transpose(1, 2).reshape(2, -1, 8, 8)
    _, dense = tiny_model.encode_image_dense(pixels)
    torch.testing.assert_close(dense, expected, rtol=1e-5, atol=1e-5)
    # and it is not what the plain last block gives
    plain = F.normalize(visual.ln_post(last(x)[:, 1:]) @ visual.proj, dim=-1).transpose(1, 2).reshape(2, -1, 8, 8)
    assert (plain - dense).abs().max() > 1e-2


def _tiny_eva(tmp_path, image_size=56, checkpoint=None):
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 56, "timm_model_name": "eva02_tiny_patch14_224", "timm_model_pretrained": False,
                       "timm_pool": "token", "timm_proj": None},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
        "custom_text": True,
    }
    (tmp_path / "test-eva-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    return create_model("test-eva-tiny", image_size=image_size, checkpoint=checkpoint).eval()


@torch.no_grad()
def test_eva_tower_value_path_matches_hand_computation(tmp_path):
    model = _tiny_eva(tmp_path)
    trunk = model.clip.visual.trunk
    assert model.image_size == (56, 56) and tuple(trunk.patch_embed.img_size) == (56, 56)
    pixels = torch.randn(2, 3, 56, 56)
    image_emb, dense = model.encode_image_dense(pixels)
    torch.testing.assert_close(image_emb, F.normalize(model.clip.encode_image(pixels), dim=-1), rtol=1e-4, atol=1e-5)
    # hand computation of the value-only last block of timm's Eva
    x = trunk.patch_embed(pixels)
    x, rope = trunk._pos_embed(x)
    x = trunk.norm_pre(x)
    for block in trunk.blocks[:-1]:
        x = block(x, rope=rope)
    last = trunk.blocks[-1]
    attn = last.attn
    h = last.norm1(x)
    if attn.qkv is not None:
        dim = h.shape[-1]
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)) if attn.q_bias is not None else attn.qkv.bias
        v = F.linear(h, attn.qkv.weight[2 * dim :], bias[2 * dim :] if bias is not None else None)
    else:
        v = attn.v_proj(h)
    out = attn.proj(attn.norm(v))
    y = x + (last.gamma_1 * out if last.gamma_1 is not None else out)
    m = last.mlp(last.norm2(y))
    y = y + (last.gamma_2 * m if last.gamma_2 is not None else m)
    tokens = trunk.norm(y)[:, trunk.num_prefix_tokens :]
    tokens = F.normalize(model.clip.visual.head(trunk.head(trunk.fc_norm(tokens))), dim=-1)
    torch.testing.assert_close(dense, tokens.transpose(1, 2).reshape(2, -1, 4, 4), rtol=1e-4, atol=1e-5)
    plain = trunk.norm(last(x, rope=rope))[:, trunk.num_prefix_tokens :]
    plain = F.normalize(model.clip.visual.head(trunk.head(trunk.fc_norm(plain))), dim=-1)
    assert (plain - tokens).abs().max() > 1e-2


def test_eva_position_embeddings_are_interpolated_for_another_size(tmp_path):
    small = _tiny_eva(tmp_path)
    path = tmp_path / "eva.pt"
    torch.save(small.clip.state_dict(), path)
    bigger = _tiny_eva(tmp_path, image_size=84, checkpoint=str(path))
    old = small.clip.visual.trunk.pos_embed.detach()  # (1, 1 + 4*4, C)
    grid = old[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    # bicubic without antialiasing, as the EVA / CLIPSelf code resizes
    grid = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=False, align_corners=False)
    expected = torch.cat([old[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 36, -1)], dim=1)
    torch.testing.assert_close(bigger.clip.visual.trunk.pos_embed.detach(), expected, rtol=1e-5, atol=1e-5)
    _, dense = bigger.encode_image_dense(torch.randn(1, 3, 84, 84))
    assert dense.shape == (1, 32, 6, 6)


@torch.no_grad()
def test_pooling_a_grid_aligned_box_is_the_normalised_token_mean(tiny_model):
    pixels = tiny_model.normalize_pixels(_images())
    _, dense = tiny_model.encode_image_dense(pixels)
    # patch 8: pixels x 8..24, y 16..40 cover token columns 1..2 and rows 2..4 of image 1
    regions = torch.tensor([[1.0, 8.0, 16.0, 24.0, 40.0], [0.0, 0.0, 0.0, 64.0, 64.0]])
    pooled = tiny_model.pool_regions(dense, regions)
    expected0 = F.normalize(dense[1, :, 2:5, 1:3].mean(dim=(1, 2)), dim=0)
    expected1 = F.normalize(dense[0].mean(dim=(1, 2)), dim=0)
    torch.testing.assert_close(pooled[0], expected0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled[1], expected1, rtol=1e-5, atol=1e-6)


def test_crops_equal_reference_crop_and_resize():
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    # a crop already of the output size is the pixels themselves
    same = crop_regions(images, torch.tensor([[1, 10, 20, 42, 52.0]], dtype=torch.float64), 32)
    torch.testing.assert_close(same[0], images[1, :, 20:52, 10:42])
    # shrinking by 2 averages 2x2 pixel blocks
    half = crop_regions(images, torch.tensor([[0, 0, 0, 64, 64.0]], dtype=torch.float64), 32)
    torch.testing.assert_close(half[0], F.avg_pool2d(images[0:1], 2)[0])
    # enlarging: bilinear resize of the cut-out pixels (compare away from the border, where
    # RoIAlign may also read the pixels just outside the box)
    up = crop_regions(images, torch.tensor([[0, 8, 4, 24, 20.0]], dtype=torch.float64), 64)
    ref = F.interpolate(images[0:1, :, 4:20, 8:24], size=(64, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(up[0, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2])


def test_enlarged_boxes_are_scaled_about_the_centre_and_clipped():
    boxes = torch.tensor([[0, 10, 10, 30, 20.0], [1, 0, 0, 20, 20.0]])
    out = enlarge_boxes(boxes, 1.5, (64, 64))
    torch.testing.assert_close(out[0], torch.tensor([0, 5.0, 7.5, 35.0, 22.5]))
    torch.testing.assert_close(out[1], torch.tensor([1, 0.0, 0.0, 25.0, 25.0]))


def test_model_crops_use_enlarged_boxes(tiny_model):
    pixels = torch.rand(1, 3, 64, 64)
    regions = torch.tensor([[0, 16, 16, 32, 48.0]])
    expected = crop_regions(pixels, torch.tensor([[0, 12, 8, 36, 56.0]]), 64)
    torch.testing.assert_close(tiny_model.crop_regions(pixels, regions), expected)


def _batch():
    return {
        "images": _images(3),
        "captions": ["a red circle", "a blue square", "two shapes"],
        "regions": torch.tensor([[0, 4, 4, 30, 30.0], [0, 30, 30, 60, 60], [2, 10, 10, 40, 50]]),
        "region_captions": ["red circle", "blue square", "green cross"],
    }


def test_no_crop_forward_when_self_distillation_is_off(tiny_model, monkeypatch):
    calls = []
    original = tiny_model.encode_image
    monkeypatch.setattr(tiny_model, "encode_image", lambda pixels: calls.append(pixels.shape) or original(pixels))
    forward_loss(tiny_model, FineCLIPLoss(sd_weight=0.0), _batch())
    assert calls == []
    forward_loss(tiny_model, FineCLIPLoss(sd_weight=1.0), _batch())
    assert calls == [torch.Size([3, 3, 64, 64])]  # one batched forward of the 3 crops


def test_frozen_text_tower_is_cached_and_not_trained(frozen_text_model):
    model = frozen_text_model
    text_params = [p for n, p in model.clip.named_parameters() if not n.startswith("visual.") and "logit" not in n]
    assert text_params and not any(p.requires_grad for p in text_params)
    first = model.encode_text(["a red circle", "a blue square", "a red circle"])
    assert model.text_cache.encoded == 2
    again = model.encode_text(["a blue square", "a red circle"])
    assert model.text_cache.encoded == 2
    torch.testing.assert_close(again, first[[1, 0]])
    direct = F.normalize(model.clip.encode_text(model.tokenizer(["a blue square"])), dim=-1)
    torch.testing.assert_close(again[0], direct[0], rtol=1e-5, atol=1e-6)
    loss, _ = forward_loss(model, FineCLIPLoss(), _batch())
    loss.backward()
    assert all(p.grad is None for p in text_params)
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0


def test_position_embeddings_are_interpolated_bicubic_for_another_size(tmp_path, tiny_model):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_model.clip.state_dict(), path)
    bigger = create_model("fineclip-tiny", checkpoint=str(path), image_size=96)
    old = tiny_model.clip.visual.positional_embedding.detach()
    grid = old[1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    # bicubic without antialiasing, as the EVA / CLIPSelf code resizes
    expected = F.interpolate(grid, size=(12, 12), mode="bicubic", antialias=False, align_corners=False)
    expected = torch.cat([old[:1], expected.permute(0, 2, 3, 1).reshape(144, -1)])
    torch.testing.assert_close(bigger.clip.visual.positional_embedding.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bigger.clip.visual.conv1.weight, tiny_model.clip.visual.conv1.weight)
    image_emb, dense = bigger.encode_image_dense(bigger.normalize_pixels(_images(1, 96)))
    assert dense.shape == (1, 64, 12, 12)


def test_logit_scale_starts_at_100_and_is_clamped(tiny_model):
    assert tiny_model.logit_scale.item() == pytest.approx(100.0, rel=1e-5)
    with torch.no_grad():
        tiny_model.clip.logit_scale.fill_(10.0)
    tiny_model.clamp_logit_scale()
    assert tiny_model.clip.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        tiny_model.clip.logit_scale.fill_(-1.0)
    tiny_model.clamp_logit_scale()
    assert tiny_model.clip.logit_scale.item() == 0.0


def test_repeated_captions_are_encoded_once_with_the_same_gradients(tiny_model, monkeypatch):
    texts = ["a red circle", "a blue square", "a red circle", "a red circle"]
    weights = torch.randn(4, tiny_model.embed_dim)
    seen = []
    original = tiny_model._encode_tokens
    monkeypatch.setattr(tiny_model, "_encode_tokens", lambda t: seen.append(list(t)) or original(t))
    (tiny_model.encode_text(texts) * weights).sum().backward()
    assert seen == [["a red circle", "a blue square"]]
    grad = tiny_model.clip.text_projection.grad.clone()
    tiny_model.zero_grad()
    reference = F.normalize(tiny_model.clip.encode_text(tiny_model.tokenizer(texts)), dim=-1)
    (reference * weights).sum().backward()
    torch.testing.assert_close(grad, tiny_model.clip.text_projection.grad, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model, monkeypatch):
    import fineclip.models.blocks as blocks

    calls = []
    original = blocks.checkpoint
    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))

    def step():
        tiny_model.zero_grad()
        loss, _ = forward_loss(tiny_model, FineCLIPLoss(), _batch())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    loss, grads = step()
    tiny_model.clip.set_grad_checkpointing(True)
    assert tiny_model.clip.visual.transformer.grad_checkpointing
    loss_ckpt, grads_ckpt = step()
    assert len(calls) >= 4  # the image blocks did go through torch.utils.checkpoint
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-4, atol=1e-6)


def test_text_cache_keeps_one_host_table_and_moves_only_the_batch_rows():
    import zlib

    from fineclip.models.text_cache import TextEmbeddingCache

    def embed(text):
        g = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return F.normalize(torch.randn(8, generator=g), dim=0)

    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.stack([embed(t) for t in texts])

    cache = TextEmbeddingCache(dtype=torch.float16)
    out = cache.lookup(["a dog", "a cat", "a dog"], encode, torch.device("cpu"))
    assert calls == [["a dog", "a cat"] + ["a cat"] * (cache.chunk - 2)] and len(cache) == 2  # one padded call
    assert out.dtype == torch.float32  # the encoder's dtype, from an fp16 table
    torch.testing.assert_close(out, torch.stack([embed(t) for t in ("a dog", "a cat", "a dog")]).half().float())
    texts = [f"caption {i}" for i in range(5000)]
    for start in range(0, 5000, 700):  # the table grows; every row stays what it was
        cache.lookup(texts[start : start + 700], encode, torch.device("cpu"))
    assert len(cache) == 5002 and cache.encoded == 5002
    assert cache._table.device.type == "cpu" and cache._table.dtype == torch.float16
    assert cache.host_bytes == cache._table.shape[0] * 8 * 2 and cache._table.shape[0] >= 5002
    again = cache.lookup(texts[::997], encode, torch.device("meta"))  # rows go to the asking device
    assert again.device.type == "meta" and again.shape == (6, 8) and cache.encoded == 5002
    torch.testing.assert_close(cache.lookup(texts[::997], encode, torch.device("cpu")),
                               torch.stack([embed(t) for t in texts[::997]]).half().float())


def test_a_frozen_towers_caption_embedding_does_not_depend_on_the_captions_encoded_with_it():
    """The cache encodes in calls of a fixed size: the same bits whichever captions share a call (a resumed run
    groups them differently). On this CPU a caption encoded alone and among 16 others differs in the last bits."""
    from fineclip.models.text_cache import TextEmbeddingCache

    torch.manual_seed(0)
    model = create_model("fineclip-tiny", image_size=64).train()
    captions = [f"a {c} {s} left of a {d} {t}" for c, s, d, t in
                zip(["red", "green", "blue", "white"] * 5, ["circle", "star", "ring", "heart", "cross"] * 4,
                    ["pink", "grey", "black", "cyan", "teal"] * 4, ["arrow", "moon", "square", "hexagon"] * 5,
                    strict=True)]
    alone, grouped = TextEmbeddingCache(), TextEmbeddingCache()
    first = alone.lookup(captions[:1], model._encode_tokens, torch.device("cpu"))
    many = grouped.lookup(captions[3:] + captions[:1], model._encode_tokens, torch.device("cpu"))
    assert torch.equal(first[0], many[-1])
    with torch.no_grad():
        unpadded = model._encode_tokens(captions[3:] + captions[:1])[-1]
        single = model._encode_tokens(captions[:1])[0]
    assert torch.allclose(unpadded, single, atol=1e-5)  # the same up to rounding
