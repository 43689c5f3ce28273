"""Create a FineCLIPModel from an open_clip model name and an optional local checkpoint."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import open_clip
import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import HFTokenizer

from fineclip.errors import CheckpointError
from fineclip.models.dense_modes import DenseMode
from fineclip.models.eva_clip import eva_clip_to_open_clip
from fineclip.models.fineclip_model import FineCLIPModel
from fineclip.models.weights import check_activation, clip_weights, describe_mismatch, read_weights

log = logging.getLogger(__name__)
_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)



def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of any recognised file (``fineclip/models/weights.py``) under open_clip's keys."""
    return read_weights(path)[0]


def _resize_timm_pos_embed(state: dict, clip: torch.nn.Module) -> None:
    key = "visual.trunk.pos_embed"
    trunk = getattr(clip.visual, "trunk", None)
    if key not in state or trunk is None or getattr(trunk, "pos_embed", None) is None:
        return
    if state[key].shape == trunk.pos_embed.shape:
        return
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(trunk, "no_embed_class", False) else trunk.num_prefix_tokens
    log.info("resizing position embedding %s -> %s", tuple(state[key].shape), tuple(trunk.pos_embed.shape))
    state[key] = resample_abs_pos_embed(
        state[key], new_size=trunk.patch_embed.grid_size, num_prefix_tokens=prefix, interpolation="bicubic",
        antialias=False)


def _load_into(clip: torch.nn.Module, state: dict, source: str | Path, fmt: str = "fineclip") -> None:
    try:  # open_clip asserts when a position embedding of another width cannot be resized
        # bicubic without antialiasing, as the EVA / CLIPSelf code resizes (the same when upsampling)
        resize_pos_embed(state, clip, antialias=False)
        resize_text_pos_embed(state, clip)
        _resize_timm_pos_embed(state, clip)
        clip.load_state_dict(state, strict=True)
    except (RuntimeError, AssertionError) as err:
        raise CheckpointError(describe_mismatch(clip, state, fmt, source)) from err


def load_clip_weights(clip: torch.nn.Module, path: str | Path) -> str:
    """Load the weights of ``path`` (any recognised format) into an open_clip model, interpolating position
    embeddings (bicubic) when the model was created at another image size; returns the format."""
    state, fmt = read_weights(path)
    check_activation(clip, fmt, path)
    if fmt.endswith("eva_clip"):
        state = eva_clip_to_open_clip(state, clip, str(path))
    _load_into(clip, state, path, fmt)
    return fmt


def load_model_weights(model: FineCLIPModel, state: dict, source: str | Path) -> None:
    """A fineclip model state dict into ``model``, which may be built at another image size
    (position embeddings interpolated bicubically, without antialiasing). DetailCLIP's head and decoder
    (``detail.*``) are loaded when the model has them and left out otherwise (only training uses them)."""
    _load_into(model.clip, clip_weights(state), source)
    detail = {k.removeprefix("detail."): v for k, v in state.items() if k.startswith("detail.")}
    if detail and model.detail is not None:
        model.detail.load_state_dict(detail)
    model.text_cache.clear()


def hf_text_config(name: str, folder: str, pooler: str, proj: str) -> dict:
    """open_clip keyword overrides that give model ``name`` the Hugging Face text tower in the
    local ``folder``: its weights when the folder has them, else random weights of its config."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"hf_text_tower={folder}: no Hugging Face config.json there")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    has_weights = any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    if not has_weights:
        log.warning("%s holds no weights: the text tower starts from random weights", folder)
    context = min(77, getattr(hf_config, "max_position_embeddings", 77))
    text_cfg = {"hf_model_name": str(path), "hf_tokenizer_name": str(path), "hf_model_pretrained": has_weights,
                "hf_pooler_type": pooler, "hf_proj_type": proj, "context_length": context}
    return {"text_cfg": text_cfg, "force_custom_text": True}


@contextlib.contextmanager
def _quiet_root_logger(level: int = logging.ERROR):
    root = logging.getLogger()
    previous = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(previous)


def create_model(
    name: str,
    checkpoint: str | None = None,
    image_size: int | None = None,
    freeze_text: bool = True,
    crop_scale: float = 1.5,
    crop_chunk: int = 0,
    text_cache_dtype: str = "auto",
    init_logit_scale: float = math.log(100),
    hf_text_tower: str | None = None,
    hf_pooler: str = "mean_pooler",
    hf_proj: str = "linear",
    detailclip: dict | None = None,
    dense_mode: DenseMode | None = None,
    freeze_patch_embed: bool = False,
) -> FineCLIPModel:
    """Build ``name`` (any open_clip model with a ViT image tower) with random weights, load a
    local ``checkpoint`` if given, and wrap it. Never downloads anything.

    ``hf_text_tower``: a local Hugging Face model folder (``config.json``, tokenizer files and,
    for pretrained weights, ``model.safetensors``) that replaces the text tower: open_clip's
    ``hf_model_name`` text config (e.g. a BERT), pooled by ``hf_pooler`` (mean_pooler, cls_pooler,
    ...) and projected (``hf_proj``: linear or mlp) to the embedding width.

    ``detailclip``: options of DetailCLIP's head and decoder (``DetailCLIPHeads``), added beside the
    CLIP model when ``method=detailclip`` trains it; null otherwise.

    ``freeze_patch_embed``: the patch embedding keeps its initial weights (the public DetailCLIP code
    trains its from-scratch tower so).

    ``dense_mode``: how the last block runs for the dense features (``fineclip/models/dense_modes.py``);
    None is the value path.

    The logit scale θ starts at ``init_logit_scale`` (ln 100) unless the checkpoint brings one.
    ``text_cache_dtype`` is the dtype of the host table of a frozen text tower's caption
    embeddings: "auto" (fp16 for embeddings computed on a GPU, as computed otherwise), "float16",
    "bfloat16" or "float32".
    """
    if text_cache_dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise ValueError(f"text_cache_dtype={text_cache_dtype!r}: use auto, float16, bfloat16 or float32")
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    overrides = hf_text_config(name, hf_text_tower, hf_pooler, hf_proj) if hf_text_tower else {}
    with _quiet_root_logger():  # open_clip reports every creation step on the root logger
        clip = open_clip.create_model(name, pretrained=None, force_image_size=image_size, **overrides)
    visual = clip.visual
    if isinstance(visual, TimmModel) and tuple(visual.trunk.patch_embed.img_size) != tuple(visual.image_size):
        visual.set_input_size(visual.image_size)  # open_clip builds timm trunks at their default size
    with torch.no_grad():
        clip.logit_scale.fill_(init_logit_scale)
    if freeze_patch_embed:
        visual = clip.visual
        (visual.conv1 if hasattr(visual, "conv1") else visual.trunk.patch_embed.proj).requires_grad_(False)
    if checkpoint:
        fmt = load_clip_weights(clip, checkpoint)
        log.info("loaded %s weights from %s (%s format)", name, checkpoint, fmt)
    cfg = clip.visual.preprocess_cfg if hasattr(clip.visual, "preprocess_cfg") else {}
    with _quiet_root_logger():
        if hf_text_tower:
            tokenizer = HFTokenizer(hf_text_tower, context_length=overrides["text_cfg"]["context_length"])
        else:
            tokenizer = open_clip.get_tokenizer(name)
    model = FineCLIPModel(
        clip,
        tokenizer,
        freeze_text=freeze_text,
        crop_scale=crop_scale,
        crop_chunk=crop_chunk,
        text_cache_dtype=None if text_cache_dtype == "auto" else getattr(torch, text_cache_dtype),
        detailclip=dict(detailclip) if detailclip is not None else None,
        dense_mode=dense_mode,
        mean=cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
        std=cfg.get("std", open_clip.OPENAI_DATASET_STD),
    )
    # how it was built, so that the same weights can be rebuilt at another image size (``at_size``)
    model.build_args = {"name": name, "image_size": image_size, "freeze_text": freeze_text, "crop_scale": crop_scale,
                        "crop_chunk": crop_chunk, "text_cache_dtype": text_cache_dtype,
                        "init_logit_scale": init_logit_scale, "hf_text_tower": hf_text_tower, "hf_pooler": hf_pooler,
                        "hf_proj": hf_proj, "detailclip": detailclip, "dense_mode": dense_mode,
                        "freeze_patch_embed": freeze_patch_embed}
    return model


def at_size(model: FineCLIPModel, image_size: int) -> FineCLIPModel:
    """The weights of ``model`` in the same model built for ``image_size`` (position embeddings resized
    bicubically without antialiasing), on the same device, in eval mode."""
    resized = create_model(**(model.build_args | {"image_size": image_size}))
    device = next(model.parameters()).device
    load_model_weights(resized, {k: v.cpu() for k, v in model.state_dict().items()}, f"the model at {image_size} px")
    return resized.to(device).eval()
