"""What a weights file holds, whatever wrote it: the format is recognised and the tensors come back
under open_clip's keys.

- ``fineclip``: a fineclip training checkpoint ``{"model", "config", ...}``: ``model`` without the
  ``clip.`` prefix; DetailCLIP's ``detail.*`` heads are left out.
- ``training-code``: ``{"epoch", "name", "state_dict", ...}`` of open_clip's training code: ``state_dict``,
  the ``module.`` prefix removed.
- ``open_clip``: a plain state dict in open_clip's layout, as it is.
- ``openai``: OpenAI's TorchScript archive (``ViT-B-16.pt``), read with ``torch.jit.load(...).state_dict()``
  and never unpickled; fp16 cast to fp32; ``input_resolution``, ``context_length`` and ``vocab_size``
  dropped. Trained with QuickGELU: refused by a model that computes GELU.
- ``eva_clip``: EVA-CLIP's native layout (``visual.blocks.N.attn.q_proj``, ``visual.rope``), plain or inside a
  training-code checkpoint (``training-code/eva_clip``): returned as stored; ``fineclip/models/eva_clip.py``
  maps it onto the model it is loaded into (the mapping needs the model's trunk).
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path

import torch
from open_clip.transformer import QuickGELU
from torch import nn

from fineclip.errors import CheckpointError
from fineclip.models.eva_clip import is_eva_clip_layout

log = logging.getLogger(__name__)
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip written by ``torch.jit.save`` (it holds compiled code, which a state dict never does)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(the weights of ``path`` under open_clip's keys, the format they were read as)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated; OpenAI's archive is TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as err:  # noqa: BLE001 - a broken archive raises many types
            raise CheckpointError(f"cannot read TorchScript archive {path}: {err}") from err
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()
                if k not in OPENAI_EXTRA_KEYS}, "openai"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from err
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "config" in obj:
        fmt, obj = "fineclip", obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        fmt, obj = "training-code", obj["state_dict"]
    else:
        fmt = "open_clip"
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict")
    state = clip_weights(obj)
    if is_eva_clip_layout(state):
        fmt = "eva_clip" if fmt == "open_clip" else f"{fmt}/eva_clip"
    return state, fmt


def clip_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The open_clip model's tensors of a state dict: ``module.`` and ``clip.`` prefixes removed, DetailCLIP's
    training heads (``detail.*``, not part of the CLIP model) left out."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("clip.")
        if not key.startswith("detail."):
            out[key] = value
    return out


def computes_quick_gelu(model: nn.Module) -> bool:
    return any(isinstance(m, QuickGELU) for m in model.modules())


def check_activation(model: nn.Module, fmt: str, source: str | Path) -> None:
    """OpenAI's weights were trained with QuickGELU: a model computing GELU would load them silently
    and compute another function."""
    if fmt == "openai" and not computes_quick_gelu(model):
        raise CheckpointError(f"{source} is OpenAI's CLIP, trained with QuickGELU, but the model computes GELU: "
                              "use its -quickgelu config (model=vit_b16, or model.name=<name>-quickgelu)")


def describe_mismatch(model: nn.Module, state: dict, fmt: str, source: str | Path) -> str:
    """Which keys are missing and unexpected, and the format the file was read as."""
    expected, given = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    shapes = sorted(k for k in expected & given if tuple(model.state_dict()[k].shape) != tuple(state[k].shape))
    parts = [f"{len(missing)} missing {missing[:5]}" if missing else "",
             f"{len(unexpected)} unexpected {unexpected[:5]}" if unexpected else "",
             f"{len(shapes)} of another shape {shapes[:5]}" if shapes else ""]
    return f"checkpoint {source} (read as {fmt}) does not fit the model: " + "; ".join(p for p in parts if p)
