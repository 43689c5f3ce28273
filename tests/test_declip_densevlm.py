"""DeCLIP and DenseVLM parts against written-out computations: the self-self attention of an open_clip ViT block
(float64, every mode, scaled and not, gradients), the external VFM teacher (its preprocessing against timm's own
transform, its features, a local DINOv2-format file, never saved), DenseVLM's vocabulary distillation (a float64
loop over regions), the checkpoint teacher and the teacher set."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config

from fineclip.engine.checkpoint import save_checkpoint
from fineclip.errors import ConfigError
from fineclip.losses import DeCLIPLoss
from fineclip.losses.vocabulary import DEFAULT_VOCABULARY, VocabularyDistillation, read_vocabulary
from fineclip.methods import CheckpointTeacher, FrozenTeacher, TeacherSet, VisionFoundationTeacher
from fineclip.models import create_model
from fineclip.models.dense_modes import SelfSelfAttention

# -- DeCLIP's attention on open_clip ViT blocks ---------------------------------------------------------------


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _reference_block(block, x, mode, scaled):
    """DeCLIP's ss_attn/csa_attn on an open_clip ResidualAttentionBlock, one head and one token at a time."""
    s = {k: v.double() for k, v in block.state_dict().items()}
    h = _layer_norm(x, s["ln_1.weight"], s["ln_1.bias"], block.ln_1.eps)
    width, heads = x.shape[-1], block.attn.num_heads
    q, k, v = (h @ s["attn.in_proj_weight"].T + s["attn.in_proj_bias"]).split(width, dim=-1)
    d = width // heads
    scale = 1 / math.sqrt(d) if scaled else 1.0
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            qh, kh, vh = q[b, :, cols], k[b, :, cols], v[b, :, cols]
            sources = {"qq": [qh], "kk": [kh], "vv": [vh], "csa": [qh, kh]}[mode]
            weights = sum(torch.softmax(scale * t @ t.T, dim=-1) for t in sources)
            out[b, :, cols] = weights @ vh
    out = out @ s["attn.out_proj.weight"].T + s["attn.out_proj.bias"]
    context = {"qq": [q], "kk": [k], "vv": [v], "csa": [q, k]}[mode]
    return out, torch.stack(context)


@pytest.fixture(scope="module")
def tiny_vit_block():
    torch.manual_seed(0)
    model = create_model("fineclip-tiny").double()
    return model, model.tower.blocks()[-1]


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("mode", ["qq", "kk", "vv", "csa"])
def test_self_self_attention_on_an_open_clip_block_equals_a_float64_loop(tiny_vit_block, mode, scaled):
    _, block = tiny_vit_block
    x = torch.randn(2, 5, block.attn.embed_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, context = SelfSelfAttention(mode, scaled=scaled).with_context(block, x, {}, False)
    ref_out, ref_context = _reference_block(block, x, mode, scaled)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(context, ref_context, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tower", ["fineclip-tiny", "fineclip-tiny-eva-clip"])  # open_clip ViT, EVA (sub-LN, SwiGLU)
def test_self_self_attention_gradients_match_finite_differences(tower):
    torch.manual_seed(0)
    model = create_model(tower).double()
    block = model.tower.blocks()[-1]
    x = torch.randn(1, 3, model.tower.width, dtype=torch.float64, requires_grad=True,
                    generator=torch.Generator().manual_seed(2))
    mode = SelfSelfAttention("csa")
    weights = torch.randn(2, 1, 3, model.tower.width, dtype=torch.float64)  # a random linear read-out of the outputs
    assert torch.autograd.gradcheck(
        lambda t: [(o * w).sum() for o, w in zip(mode.with_context(block, t * 0.1, {}, False), (weights[0], weights),
                                                 strict=True)], (x,), fast_mode=True)


def test_the_model_gives_the_patch_tokens_context_and_the_modes_dense_features(tiny_vit_block):
    model = create_model("fineclip-tiny", dense_mode=SelfSelfAttention("csa")).double().eval()
    model.load_state_dict(tiny_vit_block[0].state_dict())
    pixels = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x, _ = model.tower.trunk(model.normalize_pixels(pixels))  # the forward normalises [0, 1] pixels
        ref_out, ref_context = _reference_block(model.tower.blocks()[-1], x, "csa", False)
        ref_dense = F.normalize(model.tower.dense_head(ref_out), dim=-1).transpose(1, 2).reshape(2, -1, 8, 8)
        features = model(pixels, [], torch.zeros(0, 5, dtype=torch.float64), [], need={"context", "dense"})
    torch.testing.assert_close(features["dense"], ref_dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(features["context"], ref_context[:, :, 1:], rtol=1e-10, atol=1e-12)  # no CLS


# -- the external VFM teacher -------------------------------------------------------------------------------------

TINY_VFM = {"embed_dim": 48, "depth": 2, "num_heads": 3}
ARCH = "vit_small_patch14_reg4_dinov2"


def _student():
    return create_model("fineclip-tiny")  # 64 px, patch 8: an 8 x 8 grid -> a 112 px proxy for patch 14


def test_the_proxy_image_follows_timms_own_transform_and_the_features_its_forward():
    torch.manual_seed(0)
    teacher = VisionFoundationTeacher(ARCH, random_init=True, model_kwargs=TINY_VFM)
    teacher.setup(_student())
    assert teacher.proxy_size == (112, 112)
    # smooth images (PIL resizes in two 8-bit passes, so on pixel noise its overshoots are clipped in between)
    coarse = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 255
    images = F.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False).round().to(torch.uint8)
    config = resolve_data_config({"input_size": (3, 112, 112)}, model=teacher.network)
    transform = create_transform(**config)  # timm's eval transform: resize, centre crop, to tensor, normalise
    expected = torch.stack([transform(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in images])
    proxy = teacher.proxy_images(images)
    assert proxy.shape == expected.shape
    # PIL rounds its resized image to 8 bits: about half a grey level (over std ~0.225) apart
    assert (proxy - expected).abs().max() < 1.5 / 255 / 0.224
    assert (proxy - expected).abs().mean() < 0.4 / 255 / 0.224
    with torch.no_grad():
        tokens = teacher.network.forward_features(proxy)  # (B, 5 prefix + 64 patches, 48)
    features = teacher.features({"images": images}, frozenset({"vfm_context"}))["vfm_context"]
    assert features.shape == (2, 48, 8, 8)
    torch.testing.assert_close(features[1, :, 2, 5], tokens[1, 5 + 2 * 8 + 5])


def test_the_vfm_loads_a_local_dinov2_format_file_and_is_never_trained_nor_saved(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model(ARCH, pretrained=False, img_size=112, **TINY_VFM)
    # the original DINOv2 release: registers named register_tokens, a mask token, a position for the class token
    state = {("register_tokens" if k == "reg_token" else k): v for k, v in source.state_dict().items()}
    state["mask_token"] = torch.zeros(1, TINY_VFM["embed_dim"])
    class_position = torch.randn(1, 1, TINY_VFM["embed_dim"])
    state["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
    state["cls_token"] = state["cls_token"] - class_position
    torch.save(state, tmp_path / "dinov2_tiny.pth")
    teacher = VisionFoundationTeacher(ARCH, checkpoint=str(tmp_path / "dinov2_tiny.pth"), model_kwargs=TINY_VFM)
    student = _student()
    teacher.setup(student)
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        # (the class token is rebuilt as cls + its position: float32 rounding, ~1e-7 relative)
        torch.testing.assert_close(teacher.network.forward_features(pixels), source.eval().forward_features(pixels),
                                   rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in teacher.network.parameters())
    assert teacher.state_dict() == {}
    set_ = TeacherSet([FrozenTeacher(), teacher])
    set_.setup(student)
    assert set_.provides == {"crop_emb", "crop_emb_nograd", "vfm_context"}
    assert set(set_.state_dict()["1"]) == set() and "model" in set_.state_dict()["0"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        VisionFoundationTeacher(ARCH, checkpoint=str(tmp_path / "missing.pth")).setup(student)
    with pytest.raises(ConfigError, match="vfm.checkpoint is not set"):
        VisionFoundationTeacher(ARCH)


def test_a_sam_teacher_loads_the_original_layout_at_its_native_size_and_gives_its_neck_features(tmp_path):
    torch.manual_seed(2)
    sam = {"embed_dim": 48, "depth": 2, "num_heads": 3, "global_attn_indexes": [1], "img_size": 1024}
    source = timm.create_model("samvit_base_patch16", pretrained=False, **sam).eval()
    # the original release: the encoder under image_encoder., its MLP layers named lin1/lin2
    state = {f"image_encoder.{k.replace('mlp.fc', 'mlp.lin')}": v for k, v in source.state_dict().items()}
    state["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)  # dropped at load
    torch.save(state, tmp_path / "sam_tiny.pth")
    teacher = VisionFoundationTeacher("samvit_base_patch16", checkpoint=str(tmp_path / "sam_tiny.pth"),
                                      model_kwargs=sam)
    teacher.setup(_student())
    assert teacher.proxy_size == (128, 128)  # 8 x 16: below the encoder's native 1024, resampled at each forward
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    features = teacher.features({"images": images}, frozenset({"vfm_context"}))["vfm_context"]
    with torch.no_grad():
        expected = source.forward_features(teacher.proxy_images(images))
    assert features.shape == (1, 256, 8, 8)
    torch.testing.assert_close(features, expected)


def test_declip_loss_is_content_distillation_plus_weighted_context():
    g = torch.Generator().manual_seed(5)
    region, crops = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    context, vfm = torch.randn(2, 2, 9, 4, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    total, parts = DeCLIPLoss(content_weight=2.0, context_weight=0.05)(
        {"region_emb": region, "crop_emb": crops, "context": context, "vfm_context": vfm})
    content = (1 - F.cosine_similarity(region, crops, dim=-1)).mean()
    s_t = F.normalize(vfm.flatten(2), dim=1)
    s_t = s_t.transpose(1, 2) @ s_t
    s_s = sum(F.normalize(c, dim=-1) @ F.normalize(c, dim=-1).transpose(1, 2) for c in context) / 2
    torch.testing.assert_close(parts["content"], content)
    torch.testing.assert_close(parts["context"], (s_t - s_s).norm(dim=-1).mean())
    torch.testing.assert_close(total, 2.0 * content + 0.05 * parts["context"])


# -- DenseVLM -----------------------------------------------------------------------------------------------------


def test_the_packaged_vocabulary_has_204_things_then_112_stuff(tmp_path):
    names, things = read_vocabulary(DEFAULT_VOCABULARY)
    assert len(names) == 316 and sum(things) == 204 and all(things[:204]) and not any(things[204:])
    # as DenseVLM's list: three names are both a thing and a stuff category
    twice = {n for n in names if names.count(n) == 2}
    assert twice == {"cradle", "cupboard", "fruit"} and len(set(names)) == 313
    assert all(sorted(things[i] for i, n in enumerate(names) if n == name) == [False, True] for name in twice)
    (tmp_path / "bad.tsv").write_text("cat\tthing\nsky\tbackground\n")
    with pytest.raises(ConfigError, match="bad.tsv:2: the kind must be thing or stuff"):
        read_vocabulary(tmp_path / "bad.tsv")


def _kl_reference(teacher, student, t_vocab, s_vocab, is_thing, scale, threshold):
    """The loss with one region at a time, in float64."""
    thing_sum, thing_n, stuff_sum, stuff_n = 0.0, 0, 0.0, 0
    for t, s in zip(F.normalize(teacher.double(), dim=-1), F.normalize(student.double(), dim=-1), strict=True):
        lt, ls = (scale * t_vocab.double() @ t).tolist(), (scale * s_vocab.double() @ s).tolist()
        pt = [math.exp(v) for v in lt]
        pt = [p / sum(pt) for p in pt]
        label = max(range(len(pt)), key=pt.__getitem__)
        if pt[label] <= threshold:
            continue
        cols = [k for k in range(len(pt)) if is_thing[k]] if is_thing[label] else list(range(len(pt)))
        zt = math.log(sum(math.exp(lt[k]) for k in cols))
        zs = math.log(sum(math.exp(ls[k]) for k in cols))
        kl = sum(math.exp(lt[k] - zt) * ((lt[k] - zt) - (ls[k] - zs)) for k in cols)
        if is_thing[label]:
            thing_sum, thing_n = thing_sum + kl, thing_n + 1
        else:
            stuff_sum, stuff_n = stuff_sum + kl, stuff_n + 1
    return thing_sum / max(thing_n, 1) + stuff_sum / max(stuff_n, 1), thing_n, stuff_n


def _prepared_term(tmp_path, dim=6, **options):
    names = ["cat", "dog", "car", "sky", "grass"]
    (tmp_path / "vocab.tsv").write_text("".join(f"{n}\t{'thing' if i < 3 else 'stuff'}\n" for i, n in enumerate(names)))
    term = VocabularyDistillation(str(tmp_path / "vocab.tsv"), templates=["{}"], **options)
    g = torch.Generator().manual_seed(6)
    table = {"student": torch.randn(5, dim, generator=g), "teacher": torch.randn(5, dim, generator=g)}

    def encoder(which):
        return lambda texts: table[which][[names.index(t) for t in texts]]

    term.prepare(encoder("student"), [], encoder("teacher"))
    return term


@pytest.mark.parametrize("thing_count", [None, 2])  # the file's column, and the first N as things (their 203)
def test_vocabulary_distillation_equals_a_float64_loop_over_regions(tmp_path, thing_count):
    term = _prepared_term(tmp_path, scale=4.0, min_confidence=0.5, thing_count=thing_count)
    g = torch.Generator().manual_seed(7)
    teacher, student = torch.randn(40, 6, generator=g), torch.randn(40, 6, generator=g)
    loss = term({"region_emb": student, "teacher_region_emb": teacher})
    is_thing = [True, True, True, False, False] if thing_count is None else [True, True, False, False, False]
    expected, n_thing, n_stuff = _kl_reference(teacher, student, term.teacher_vocab, term.student_vocab, is_thing,
                                               4.0, 0.5)
    assert n_thing > 0 and n_stuff > 0 and n_thing + n_stuff < 40  # every branch, and some regions dropped
    torch.testing.assert_close(loss.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_vocabulary_distillation_gradients_and_an_empty_batch(tmp_path):
    term = _prepared_term(tmp_path, scale=4.0)
    g = torch.Generator().manual_seed(8)
    teacher = torch.randn(12, 6, generator=g, dtype=torch.float64)
    student = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: term({"region_emb": s, "teacher_region_emb": teacher}), (student,),
                                    fast_mode=True)
    none = torch.zeros(0, 6, requires_grad=True)
    loss = term({"region_emb": none, "teacher_region_emb": torch.zeros(0, 6)})
    loss.backward()
    assert loss.item() == 0.0 and none.grad is not None


def test_the_vocabulary_term_refuses_a_teacher_without_text(tmp_path):
    term = VocabularyDistillation(templates=["{}"])
    with pytest.raises(ConfigError, match="teacher=checkpoint"):
        term.prepare(lambda texts: torch.zeros(len(texts), 4), [], None)


def test_the_checkpoint_teacher_pools_its_own_dense_features_and_keeps_the_initial_student(tmp_path):
    from omegaconf import OmegaConf

    torch.manual_seed(2)
    other = create_model("fineclip-tiny")
    save_checkpoint({"model": other.state_dict(), "config": {}}, tmp_path / "teacher.pt")  # a training checkpoint
    model_cfg = OmegaConf.create({"_target_": "fineclip.models.create_model", "name": "fineclip-tiny"})
    teacher = CheckpointTeacher(model_cfg, str(tmp_path / "teacher.pt"), ensemble_alpha=0.9)
    student = create_model("fineclip-tiny")
    teacher.setup(student)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    regions = torch.tensor([[0, 4.0, 4.0, 40.0, 30.0], [1, 10.0, 20.0, 60.0, 60.0]])
    got = teacher.features({"images": images, "regions": regions}, frozenset({"teacher_region_emb"}))
    other.eval()
    with torch.no_grad():
        _, dense = other.encode_image_dense(other.normalize_pixels(images), with_global=False)
    torch.testing.assert_close(got["teacher_region_emb"], other.pool_regions(dense, regions))
    torch.testing.assert_close(teacher.text_encoder()(["a cat"]), other.encode_text_pool(["a cat"]))
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    released = teacher.final_weights(student)
    name = "clip.visual.proj"
    torch.testing.assert_close(released[name], 0.9 * student.state_dict()[name] + 0.1 * initial[name])
    assert set(teacher.state_dict()) == {"initial"}  # the teacher's own weights are read from its file, not saved
    with pytest.raises(ConfigError, match="teacher.checkpoint is not set"):
        CheckpointTeacher(model_cfg, None)


def test_a_frozen_teacher_at_its_own_crop_size_releases_the_ensemble_at_the_students_size():
    torch.manual_seed(3)
    student = create_model("fineclip-tiny")
    teacher = FrozenTeacher(ensemble_alpha=0.7, crop_size=32)
    teacher.setup(student)
    assert teacher.model.image_size == (32, 32)
    pos = "clip.visual.positional_embedding"
    assert teacher.model.state_dict()[pos].shape[0] == 1 + 4 * 4 and student.state_dict()[pos].shape[0] == 1 + 8 * 8
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    regions = torch.tensor([[0, 4.0, 4.0, 40.0, 30.0], [1, 10.0, 20.0, 60.0, 60.0]])
    crops = teacher.features({"images": images, "regions": regions}, frozenset({"crop_emb"}))["crop_emb"]
    with torch.no_grad():  # the cells cut at the teacher's own size, through the initial weights at 32 px
        expected = teacher.model.encode_image(teacher.model.crop_regions(student.normalize_pixels(images), regions))
    torch.testing.assert_close(crops, expected)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        student.clip.visual.positional_embedding.add_(1.0)
    released = teacher.final_weights(student)
    torch.testing.assert_close(released[pos], 0.7 * student.state_dict()[pos] + 0.3 * initial[pos])
    again = FrozenTeacher(ensemble_alpha=0.7, crop_size=32)
    again.setup(create_model("fineclip-tiny"))
    again.load_state_dict(teacher.state_dict())  # a resumed run releases the same
    torch.testing.assert_close(again.final_weights(student)[pos], released[pos])


def test_the_gpu_checks_declip_row_runs_on_a_cpu(gpu_check):
    import argparse

    args = argparse.Namespace(device="cpu", batch=32, regions=4, precision="fp32", compile=False, warmup=1, steps=1,
                              declip_model="tiny", declip_size=64, declip_crop=32, declip_vfm="tiny",
                              declip_batch=2)
    row = gpu_check.declip_row(args)
    assert row["ok"] and row["check"] == "method=declip 64 px, vfm=tiny, batch 2", row
    assert row["images_per_s"] > 0
