"""An external teacher: a frozen vision foundation model (DINOv2, DINO, ...) with its own preprocessing.

DeCLIP's context target. The VFM sees a *proxy image*: the batch's images resized to (student grid side × the
VFM's patch) px — 35 × 14 = 490 px for a B/16 student at 560 px and DINOv2 — with bicubic interpolation and
the VFM's own mean and std (timm's ``pretrained_cfg``). Its patch features (the final norm's tokens, prefix
tokens dropped) are the feature ``vfm_context`` (B, C, H, W).

The network is a timm model: ``arch`` names it, ``checkpoint`` is a local weights file read by timm's own loader
(which converts the original DINOv2/DINO releases and resizes the position embedding to the proxy size). It is
outside DDP and the optimizer, runs without autograd in eval mode, and is never saved: checkpoints hold nothing
of it, a resumed run loads the file again. ``random_init=true`` builds it with random weights instead (the CPU
stand-in of the synthetic table; not a teacher worth distilling from).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fineclip.errors import CheckpointError, ConfigError
from fineclip.methods.teachers import Teacher


class VisionFoundationTeacher(Teacher):
    """Provides ``vfm_context``: the VFM's patch features of the proxy image (module docstring)."""

    provides = frozenset({"vfm_context"})

    def __init__(self, arch: str, checkpoint: str | None = None, random_init: bool = False,
                 model_kwargs: dict | None = None) -> None:
        if checkpoint is None and not random_init:
            raise ConfigError(f"vfm.checkpoint is not set: the external teacher {arch} needs its weights file (no "
                              "download happens here), or vfm.random_init=true for a random stand-in")
        self.arch, self.checkpoint, self.random_init = arch, checkpoint, random_init
        self.model_kwargs = dict(model_kwargs or {})
        self.network: torch.nn.Module | None = None

    def setup(self, model) -> None:
        import timm

        patch = self.model_kwargs.get("patch_size") or _arch_patch(self.arch)
        self.proxy_size = (model.grid_size[0] * patch, model.grid_size[1] * patch)
        kwargs = {"img_size": self.proxy_size, **self.model_kwargs}
        try:
            if self.random_init:
                network = timm.create_model(self.arch, pretrained=False, **kwargs)
            else:
                if not Path(self.checkpoint).is_file():
                    raise FileNotFoundError(f"vfm.checkpoint={self.checkpoint}: no such file")
                network = timm.create_model(self.arch, pretrained=True,
                                            pretrained_cfg_overlay={"file": str(self.checkpoint)}, **kwargs)
        except (RuntimeError, KeyError) as err:
            raise CheckpointError(f"vfm: cannot build {self.arch} from {self.checkpoint or 'random weights'}: {err}") \
                from err
        if tuple(network.patch_embed.patch_size) != (patch, patch):
            raise ConfigError(f"vfm.arch={self.arch} has patch {tuple(network.patch_embed.patch_size)}, not {patch}: "
                              "set vfm.model_kwargs.patch_size")
        self.network = network.to(model.pixel_mean.device).eval().requires_grad_(False)
        cfg, like = network.pretrained_cfg, model.pixel_mean
        self.mean = like.new_tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        self.std = like.new_tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)

    def proxy_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, h, w) or float in [0, 1] -> the VFM's normalised input (B, 3, proxy_size)."""
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if tuple(pixels.shape[-2:]) != self.proxy_size:
            pixels = F.interpolate(pixels, size=self.proxy_size, mode="bicubic", align_corners=False, antialias=True)
            pixels = pixels.clamp(0.0, 1.0)  # as an 8-bit image resized by PIL
        return (pixels - self.mean) / self.std

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) final-norm patch tokens (ViTs) or the network's own feature map (B, C, H, W)."""
        tokens = self.network.forward_features(pixels)
        if tokens.dim() == 4:
            return tokens
        h, w = (s // p for s, p in zip(pixels.shape[-2:], self.network.patch_embed.patch_size, strict=True))
        patches = tokens[:, self.network.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(len(tokens), -1, h, w)

    @torch.no_grad()
    def features(self, batch: dict, need: frozenset[str]) -> dict[str, torch.Tensor]:
        if "vfm_context" not in need:
            return {}
        return {"vfm_context": self.patch_features(self.proxy_images(batch["images"])).float()}


def _arch_patch(arch: str) -> int:
    """The patch size a timm architecture name states (``vit_base_patch14_reg4_dinov2`` -> 14)."""
    import re

    found = re.search(r"patch(\d+)", arch)
    if found is None:
        raise ConfigError(f"vfm.arch={arch}: cannot read its patch size from the name; set vfm.model_kwargs.patch_size")
    return int(found.group(1))
