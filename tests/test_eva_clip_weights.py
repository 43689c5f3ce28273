"""EVA-CLIP-layout weights: recognised in each wrapping, converted onto open_clip's EVA02 model, and the
converted model computes what the layout means (float64 computation from EVA's definition,
tests/eva_clip_layout.py): global, text, dense and RoI features, at the native size and another one;
DeCLIP's ``csa``/``qq`` dense modes likewise."""

from __future__ import annotations

import eva_clip_layout as eva
import open_clip
import pytest
import torch
import torch.nn.functional as F

from fineclip.convert import convert
from fineclip.engine.checkpoint import save_checkpoint
from fineclip.errors import CheckpointError
from fineclip.models import create_model
from fineclip.models.dense_modes import SelfSelfAttention
from fineclip.models.weights import read_weights

TOL = {"atol": 1e-6, "rtol": 0}  # timm builds its rotary tables in float32 (5e-8 apart from float64 ones)


@pytest.fixture(scope="module")
def eva_file(tmp_path_factory):
    state = eva.generate(seed=0)
    path = tmp_path_factory.mktemp("eva") / "EVA02_CLIP_tiny.pt"
    save_checkpoint(state, path)
    return path, state


def _inputs(image_size: int):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, image_size, image_size, generator=g)
    boxes = torch.tensor([[0, 3.0, 5.0, 40.0, 30.0], [1, 10.5, 0.0, 63.0, 63.0], [1, 20.0, 22.0, 28.0, 29.0]])
    return pixels, boxes * image_size / 64


def _assert_computes_the_layout(model, state, image_size, dense_mode="value"):
    model = model.double().eval()
    pixels, boxes = _inputs(image_size)
    ref_image, ref_dense = eva.vision(state, pixels, dense_mode=dense_mode)
    with torch.no_grad():
        image, dense = model.encode_image_dense(pixels.double())
        rois = model.pool_regions(dense, boxes.double())
        texts = ["a photo of a cat", "two dogs on a red sofa"]
        text_emb = model.encode_text(texts)
    torch.testing.assert_close(image, F.normalize(ref_image, dim=-1), **TOL)
    torch.testing.assert_close(model.encode_image(pixels.double()), F.normalize(ref_image, dim=-1), **TOL)
    torch.testing.assert_close(dense, ref_dense, **TOL)
    torch.testing.assert_close(rois, eva.roi_features(ref_dense, boxes, image_size), **TOL)
    ref_text = eva.text(state, model.tokenizer(texts))
    torch.testing.assert_close(text_emb.double(), F.normalize(ref_text, dim=-1), **TOL)


def test_each_wrapping_of_the_layout_is_recognised(eva_file, tmp_path):
    path, state = eva_file
    found, fmt = read_weights(path)
    assert fmt == "eva_clip" and set(found) == set(state)
    save_checkpoint({"epoch": 6, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                     "optimizer": {"state": {}}}, tmp_path / "training.pt")
    found, fmt = read_weights(tmp_path / "training.pt")
    assert fmt == "training-code/eva_clip" and set(found) == set(state)


@pytest.mark.parametrize("wrapping", ["plain", "training-code", "text-at-top"])
def test_the_converted_model_computes_what_the_layout_means(eva_file, tmp_path, wrapping):
    path, state = eva_file
    if wrapping == "training-code":
        path = tmp_path / "epoch_6.pt"
        save_checkpoint({"epoch": 6, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif wrapping == "text-at-top":
        state = eva.generate(seed=2, text_at_top=True)
        path = tmp_path / "old.pt"
        save_checkpoint(state, path)
    _assert_computes_the_layout(create_model("fineclip-tiny-eva-clip", checkpoint=str(path)), state, 64)


def test_at_another_size_position_embeddings_and_rotary_tables_follow_the_reference(eva_file):
    path, state = eva_file
    _assert_computes_the_layout(create_model("fineclip-tiny-eva-clip", checkpoint=str(path), image_size=96), state, 96)


@pytest.mark.parametrize("mode", ["csa", "qq", "kk", "vv"])
def test_declip_dense_modes_compute_the_reference_attention(eva_file, mode):
    path, state = eva_file
    model = create_model("fineclip-tiny-eva-clip", checkpoint=str(path), dense_mode=SelfSelfAttention(mode))
    _assert_computes_the_layout(model, state, 64, dense_mode=mode)
    pixels = _inputs(64)[0]
    with torch.no_grad():  # the context features: the last block's projections of the patch tokens, heads concatenated
        _, dense, context = model.dense_pass(pixels.double(), with_context=True)
    _, ref_dense, ref_context = eva.vision(state, pixels, dense_mode=mode, with_context=True)
    torch.testing.assert_close(dense, ref_dense, **TOL)
    torch.testing.assert_close(context, ref_context, **TOL)
    assert context.shape[0] == (2 if mode == "csa" else 1)
    value = create_model("fineclip-tiny-eva-clip", checkpoint=str(path)).double().eval()
    pixels = _inputs(64)[0].double()
    with torch.no_grad():  # the mode changes the dense features, not the global embedding
        assert not torch.allclose(value.encode_image_dense(pixels)[1], model.encode_image_dense(pixels)[1])


def test_a_dense_mode_that_cannot_run_is_refused():
    with pytest.raises(ValueError, match="use one of csa, qq, kk, vv"):
        SelfSelfAttention("qk")
    with pytest.raises(ValueError, match="gives no context features"):
        create_model("fineclip-tiny").dense_pass(torch.zeros(1, 3, 64, 64), with_context=True)


def test_a_model_that_is_not_eva_refuses_the_file_and_a_misfit_names_the_format(eva_file, tmp_path):
    path, state = eva_file
    with pytest.raises(CheckpointError, match="needs an EVA02 model"):
        create_model("fineclip-tiny", checkpoint=str(path))
    save_checkpoint({k: v for k, v in state.items() if k != "visual.norm.bias"}, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"read as eva_clip\) does not fit the model: 1 missing "
                                              r"\['visual.trunk.norm.bias'\]"):
        create_model("fineclip-tiny-eva-clip", checkpoint=str(tmp_path / "cut.pt"))


def test_convert_writes_an_eva_clip_file_that_plain_open_clip_loads(eva_file, tmp_path):
    path, state = eva_file
    out = tmp_path / "open_clip.pt"
    assert convert(str(path), str(out), ["model=tiny_eva_clip"]) == "fineclip-tiny-eva-clip"
    loaded = open_clip.create_model("fineclip-tiny-eva-clip", pretrained=str(out)).double().eval()
    pixels = _inputs(64)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels.double()), eva.vision(state, pixels)[0], **TOL)


def test_the_gpu_checks_layout_writer_is_the_inverse_of_the_conversion(tmp_path, gpu_check):
    torch.manual_seed(0)
    original = open_clip.create_model("fineclip-tiny-eva-clip").state_dict()
    written = gpu_check.eva_clip_layout(original)
    assert "visual.blocks.0.attn.q_bias" in written and "visual.blocks.1.mlp.ffn_ln.weight" in written
    save_checkpoint(written, tmp_path / "eva.pt")
    loaded = create_model("fineclip-tiny-eva-clip", checkpoint=str(tmp_path / "eva.pt")).clip.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in original.items())


def test_the_gpu_checks_eva_clip_row_runs_on_a_cpu(gpu_check):
    import argparse

    row = gpu_check.eva_clip_eval_row(argparse.Namespace(eva_model="tiny_eva_clip", eva_images=3, device="cpu",
                                                            batch=4))
    assert row["ok"] and "boxes/s (24 boxes on 3 images" in row["result"], row
