"""Weights files of every recognised format are read under open_clip's keys and load into the model they
fit; OpenAI's TorchScript archive (written here with torch.jit for a tiny QuickGELU CLIP, as OpenAI's
``ViT-B-16.pt`` is for ViT-B/16) is read without unpickling and computes what open_clip's own OpenAI
builder computes from the same tensors; a GELU model refuses it."""

import warnings

import open_clip
import pytest
import torch
from open_clip.model import build_model_from_openai_state_dict
from torch import nn

from fineclip.convert import convert
from fineclip.engine.checkpoint import save_checkpoint
from fineclip.errors import CheckpointError
from fineclip.models import create_model
from fineclip.models.weights import read_weights


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _openai_archive(path, state: dict) -> None:
    """A TorchScript archive whose state dict is ``state`` in fp16 plus OpenAI's three integer entries."""
    root = _Holder()
    extras = {"input_resolution": torch.tensor(64), "context_length": torch.tensor(32),
              "vocab_size": torch.tensor(49408)}
    for key, value in {**state, **extras}.items():
        *path_parts, leaf = key.split(".")
        module = root
        for part in path_parts:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, value.half() if value.is_floating_point() else value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope="module")
def openai_file(tmp_path_factory):
    torch.manual_seed(0)
    original = open_clip.create_model("fineclip-tiny-quickgelu")
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    _openai_archive(path, original.state_dict())
    return path, original.state_dict()


def test_openai_archive_is_read_without_unpickling_and_computes_what_open_clips_builder_does(openai_file):
    path, original = openai_file
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.load(path, weights_only=True)  # not a pickle: the reader must not need one
    state, fmt = read_weights(path)
    assert fmt == "openai" and set(state) == set(original)  # input_resolution, context_length, vocab_size dropped
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    for key, value in original.items():
        torch.testing.assert_close(state[key], value.half().float(), rtol=0, atol=0)

    model = create_model("fineclip-tiny-quickgelu", checkpoint=str(path)).eval()
    reference_state = {k: v.clone() for k, v in state.items()}
    reference_state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(32),
                           vocab_size=torch.tensor(49408))
    reference = build_model_from_openai_state_dict(reference_state, quick_gelu=True).float().eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = model.tokenizer(["a red circle", "two blue squares"])
    with torch.no_grad():
        torch.testing.assert_close(model.clip.encode_image(pixels), reference.encode_image(pixels), rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(model.clip.encode_text(tokens), reference.encode_text(tokens), rtol=1e-4, atol=1e-5)


def test_a_gelu_model_refuses_openai_weights(openai_file):
    with pytest.raises(CheckpointError, match="trained with QuickGELU, but the model computes GELU"):
        create_model("fineclip-tiny", checkpoint=str(openai_file[0]))


def test_every_other_format_is_recognised_and_a_mismatch_names_its_keys(tmp_path):
    torch.manual_seed(0)
    model = create_model("fineclip-tiny", detailclip={})
    clip_state = model.clip.state_dict()
    save_checkpoint({"model": model.state_dict(), "config": {"model": {"name": "fineclip-tiny"}}}, tmp_path / "f.pt")
    save_checkpoint({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in clip_state.items()}},
                    tmp_path / "t.pt")
    save_checkpoint(clip_state, tmp_path / "o.pt")
    for name, fmt in (("f.pt", "fineclip"), ("t.pt", "training-code"), ("o.pt", "open_clip")):
        state, found = read_weights(tmp_path / name)
        assert found == fmt and set(state) == set(clip_state), name  # DetailCLIP's heads left out
        assert all(torch.equal(state[k], v) for k, v in clip_state.items())
    eva = {"visual.blocks.0.attn.q_proj.weight": torch.zeros(4, 4), "visual.rope.freqs_cos": torch.zeros(4)}
    save_checkpoint(eva, tmp_path / "eva.pt")
    assert read_weights(tmp_path / "eva.pt")[1] == "eva_clip"  # mapped at load time: tests/test_eva_clip_weights.py
    save_checkpoint({k: v for k, v in clip_state.items() if k != "logit_scale"} | {"extra.weight": torch.zeros(1)},
                    tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"read as open_clip\) does not fit the model: 1 missing \['logit_scale'\]"
                                              r"; 1 unexpected \['extra.weight'\]"):
        create_model("fineclip-tiny", checkpoint=str(tmp_path / "bad.pt"))
    save_checkpoint(clip_state | {"text_projection": torch.zeros(3, 3)}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"1 of another shape \['text_projection'\]"):
        create_model("fineclip-tiny", checkpoint=str(tmp_path / "shape.pt"))


def test_convert_writes_a_file_plain_open_clip_loads(tmp_path, openai_file):
    path, _ = openai_file
    out = tmp_path / "converted.pt"
    name = convert(str(path), str(out), ["model=tiny", "model.name=fineclip-tiny-quickgelu"])
    assert name == "fineclip-tiny-quickgelu"
    loaded = open_clip.create_model(name, pretrained=str(out))
    state, _ = read_weights(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="QuickGELU"):
        convert(str(path), str(tmp_path / "no.pt"), ["model=tiny"])
    assert not (tmp_path / "no.pt").exists()


def test_position_embeddings_resize_bicubically_without_antialiasing_as_the_reference(tmp_path):
    """The EVA / CLIPSelf code resizes position embeddings bicubically without antialiasing. Loading 96-px
    weights into a 64-px model (12 x 12 -> 8 x 8 tokens) and 64-px weights into a 96-px one gives exactly
    that. It matters in both directions: PyTorch's antialiased bicubic is another kernel (a = -0.5, not
    -0.75), so even upsampling (224 -> 1024 px for box_cs) differs from the reference with it."""
    import torch.nn.functional as F

    from fineclip.models.factory import load_clip_weights

    def grid(model, side):
        pos = model.visual.positional_embedding.detach()
        return pos[1:].reshape(1, side, side, pos.shape[1]).permute(0, 3, 1, 2)

    def bicubic(x, side, antialias=False):
        return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False, antialias=antialias)

    torch.manual_seed(0)
    models = {size: open_clip.create_model("fineclip-tiny", force_image_size=size) for size in (64, 96)}
    for source, target in ((96, 64), (64, 96)):
        save_checkpoint(models[source].state_dict(), tmp_path / f"{source}.pt")
        resized = open_clip.create_model("fineclip-tiny", force_image_size=target)
        load_clip_weights(resized, tmp_path / f"{source}.pt")
        expected = bicubic(grid(models[source], source // 8), target // 8)
        torch.testing.assert_close(grid(resized, target // 8), expected)
        cls_position = models[source].visual.positional_embedding[0]
        torch.testing.assert_close(resized.visual.positional_embedding[0], cls_position)
        antialiased = bicubic(grid(models[source], source // 8), target // 8, antialias=True)
        assert (antialiased - expected).abs().max() > 1e-3  # the other kernel, in either direction
