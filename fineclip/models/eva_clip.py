"""EVA-CLIP's native weights layout, mapped onto open_clip's EVA02 models (a timm ``Eva`` image trunk).

The EVA-CLIP release (``EVA02_CLIP_B_psz16_s8B.pt``, ``EVA02_CLIP_L_336_psz14_s6B.pt``) and the training
code of FineCLIP, CLIPSelf, DeCLIP and DenseVLM store the image tower as EVA's own ``EVAVisionTransformer``
(``visual.blocks.N.attn.q_proj``, separate ``q_bias``/``v_bias``, ``inner_attn_ln``, SwiGLU ``mlp.w1/w2/w3``
with ``ffn_ln``, ``visual.rope.*`` buffers, ``visual.head``) and the text tower under ``text.*`` in open_clip's
names. The vision mapping is timm's (``timm.models.eva.checkpoint_filter_fn``: prefix stripped, rotary
buffers dropped — they are recomputed —, names translated, ``visual.head`` becomes the trunk's head);
ours only re-prefixes its keys under ``visual.trunk.``, moves text keys that older files keep at the top
level under ``text.``, and resizes the position embedding as the reference does (bicubic, no antialiasing).

``fineclip_eva02_tiny_clip`` is a timm model of the same structure as ``eva02_base_patch16_clip_224``
(unfused q/k/v, SwiGLU with sub-LN, attention sub-LN, rotary embeddings on a 16×16 reference grid) at
CPU scale, for tests and the tiny stand-ins of the model zoo.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.eva import Eva, checkpoint_filter_fn
from torch import nn

from fineclip.errors import CheckpointError

EVA_CLIP_VISION_MARKERS = ("visual.blocks.", "visual.rope", "visual.patch_embed.")
TEXT_KEYS_AT_TOP = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")


def is_eva_clip_layout(state: dict[str, torch.Tensor]) -> bool:
    """EVA's own vision tower keys (``visual.blocks.N...``), not open_clip's (``visual.trunk...``)."""
    return any(k.startswith(EVA_CLIP_VISION_MARKERS) for k in state)


def eva_clip_to_open_clip(state: dict[str, torch.Tensor], clip: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """The weights of an EVA-CLIP-layout state dict under the keys of ``clip`` (an open_clip EVA02 model)."""
    trunk = getattr(clip.visual, "trunk", None)
    if not isinstance(trunk, Eva):
        raise CheckpointError(f"{source} is an EVA-CLIP checkpoint (visual.blocks.N.attn.q_proj, ...): it needs an "
                              "EVA02 model (model=eva02_b16 or eva02_l14), not "
                              f"{type(clip.visual).__name__}")
    vision = {k: v for k, v in state.items() if k.startswith("visual.")}
    # timm resizes the position embedding when the model's grid differs: bicubic without antialiasing, as
    # EVA's ``rescale_positional_embedding``
    out = {f"visual.trunk.{k}": v for k, v in checkpoint_filter_fn(vision, trunk, antialias=False).items()}
    for key, value in state.items():
        if key.startswith("visual."):
            continue
        if key.startswith(TEXT_KEYS_AT_TOP):  # older EVA / OpenCLIP files keep the text tower at the top level
            key = f"text.{key}"
        out[key] = value
    return out


@register_model
def fineclip_eva02_tiny_clip(pretrained: bool = False, **kwargs) -> Eva:
    """``eva02_base_patch16_clip_224``'s structure at width 64, 2 heads, 2 blocks, 64 px."""
    if pretrained:
        raise ValueError("fineclip_eva02_tiny_clip has no pretrained weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's loading options: no weights
        kwargs.pop(key, None)
    args = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, qkv_fused=False,
                mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                ref_feat_shape=(16, 16), global_pool="token")
    return Eva(**(args | kwargs))
