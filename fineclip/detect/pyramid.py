"""F-ViT's backbone: the frozen CLIP ViT tapped after four blocks, a simple up/down-sampling pyramid and an FPN.

Taps (0-based blocks) B/16 ``[3, 5, 7, 11]``, L/14 ``[6, 10, 14, 23]``; the last tap is the last block, run in
the model's dense mode (the value path: our dense features). The four maps (width w, stride p) become
strides p/4, p/2, p, 2p by ConvT-BN-GELU-ConvT, ConvT, identity and a 2×2 max-pool; torchvision's
``FeaturePyramidNetwork`` (256 channels, a norm on its convolutions) adds P6 by a stride-2 subsample
(``LastLevelMaxPool``), as mmdet's FPN without extra convs. At test time the frozen dense CLIP map
(normalised tokens after the final norm and projection, stride p) comes along for the fused score.
The tower is frozen, kept in eval mode and run without autograd.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fineclip.models import FineCLIPModel


class FrozenViTPyramid(nn.Module):
    def __init__(self, model: FineCLIPModel, taps: Sequence[int], fpn_channels: int = 256,
                 norm: bool = True) -> None:
        super().__init__()
        depth = len(model.tower.blocks())
        taps = [int(t) for t in taps]
        if len(taps) != 4 or taps[-1] != depth - 1 or sorted(set(taps)) != taps:
            raise ValueError(f"backbone.taps={taps}: four increasing 0-based blocks ending at the last ({depth - 1})")
        self.vit = model.requires_grad_(False).eval()
        self.taps = taps
        width, patch = model.tower.width, model.tower.patch_size[0]
        self.branches = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(width, width, 2, 2), nn.BatchNorm2d(width), nn.GELU(),
                          nn.ConvTranspose2d(width, width, 2, 2)),
            nn.ConvTranspose2d(width, width, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, 2),
        ])
        self.fpn = FeaturePyramidNetwork([width] * 4, fpn_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=nn.BatchNorm2d if norm else None)
        self.out_channels = fpn_channels
        self.strides = (patch / 4, patch / 2, patch, 2 * patch, 4 * patch)  # P2 … P6
        self.patch = patch

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()  # frozen: batch statistics and dropout never change
        return self

    @torch.no_grad()
    def vit_maps(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The four tapped maps (B, w, H/p, W/p) and the dense CLIP map (B, D, H/p, W/p), normalised per token."""
        tower = self.vit.tower
        x, ctx, tapped = tower.trunk_taps(pixels, set(self.taps[:-1]))
        last = tower.last_block(x, ctx, self.vit.dense_mode)
        h, w = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
        maps = [t[:, tower.prefix_tokens:].transpose(1, 2).reshape(len(t), -1, h, w) for t in [*tapped, last]]
        dense = F.normalize(tower.dense_head(last), dim=-1)
        return maps, dense.transpose(1, 2).reshape(len(dense), -1, h, w)

    def forward(self, pixels: torch.Tensor) -> tuple[OrderedDict[str, torch.Tensor], torch.Tensor]:
        """(FPN levels '0'…'3' and 'pool' = P2…P6, the dense CLIP map)."""
        maps, dense = self.vit_maps(pixels)
        levels = OrderedDict((str(i), branch(m)) for i, (branch, m) in enumerate(zip(self.branches, maps, strict=True)))
        return self.fpn(levels), dense
