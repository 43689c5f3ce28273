"""FineCLIPModel: an open_clip CLIP model plus what the method needs around it.

One trunk pass gives both the global image embedding and the dense feature map; regions are pooled
from the dense map with RoIAlign and cropped from the batch on the device; the (frozen by default)
text tower is cached. Every loss asks for the features it needs by name; ``provides`` is every name
the model can compute: ``FEATURES``, ``NO_GRAD_CROPS`` and those of its extra passes (a method's head
module with a pass of its own, e.g. DetailCLIP's ``DetailCLIPHeads``, declares its ``provides``).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fineclip.models.dense_modes import DenseMode, ValuePath
from fineclip.models.detail_heads import DetailCLIPHeads
from fineclip.models.regions import crop_regions, enlarge_boxes, pool_regions
from fineclip.models.text_cache import TextEmbeddingCache
from fineclip.models.towers import make_tower_adapter
from fineclip.timing import section

FEATURES = ("image_emb", "text_emb", "region_emb", "crop_emb", "region_text_emb", "dense", "logit_scale")
# the crop embeddings computed without autograd (a detached teacher): no activations are kept for the crop pass
NO_GRAD_CROPS = "crop_emb_nograd"


class FineCLIPModel(nn.Module):
    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        *,
        freeze_text: bool = True,
        crop_scale: float = 1.5,
        crop_chunk: int = 0,
        text_cache_dtype: torch.dtype | None = None,
        detailclip: dict | None = None,
        dense_mode: DenseMode | None = None,
        mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
    ) -> None:
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        self.tower = make_tower_adapter(clip.visual)
        size = clip.visual.image_size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.crop_scale = crop_scale
        self.crop_chunk = crop_chunk
        self.freeze_text = freeze_text
        self.text_cache = TextEmbeddingCache(text_cache_dtype)
        self.dense_mode = dense_mode or ValuePath()
        # DetailCLIP's head and decoder (``DetailCLIPHeads`` options), when that method trains the model
        self.detail = DetailCLIPHeads(self.tower.width, self.tower.heads, self.grid_size, self.tower.patch_size[0],
                                      **detailclip) if detailclip is not None else None
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if freeze_text:
            for name, param in self.clip.named_parameters():
                if not name.startswith("visual.") and not name.startswith("logit_"):
                    param.requires_grad_(False)

    # -- images -------------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.tower.patch_size[0], self.image_size[1] // self.tower.patch_size[1])

    def normalize_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) in [0, 255] or float in [0, 1] -> CLIP-normalised float."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        return (images - self.pixel_mean) / self.pixel_std

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Global embedding v of normalised pixels through the usual CLIP path, L2-normalised."""
        return F.normalize(self.clip.encode_image(pixels), dim=-1)

    def encode_image_dense(
        self, pixels: torch.Tensor, with_global: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One trunk pass -> (v (B, D) normalised, X (B, D, h, w) with each token normalised).

        The blocks before the last run once; then the normal last block gives v and the last block in
        the model's dense mode (``dense_modes.py``; the value path, out_proj(V(ln_1 x)), by default)
        gives the dense tokens. With ``with_global=False`` the normal last block is not run and v is None.
        """
        image_emb, dense, _ = self.dense_pass(pixels, with_global)
        return image_emb, dense

    def dense_pass(
        self, pixels: torch.Tensor, with_global: bool = True, with_context: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``encode_image_dense`` and, with ``with_context``, the dense mode's context features of the patch
        tokens (P, B, h·w, width) (DeCLIP: the last block's Q and/or K projections, heads concatenated)."""
        x, ctx = self.tower.trunk(pixels)
        image_emb = context = None
        if with_global:
            image_emb = F.normalize(self.tower.global_head(self.tower.last_block(x, ctx)), dim=-1)
        if with_context:
            block, use_checkpoint = self.tower.blocks()[-1], self.tower.grad_checkpointing()
            tokens, context = self.dense_mode.with_context(block, x, ctx, use_checkpoint)
            context = context[:, :, self.tower.prefix_tokens:]
        else:
            tokens = self.tower.last_block(x, ctx, self.dense_mode)
        tokens = F.normalize(self.tower.dense_head(tokens), dim=-1)
        h, w = pixels.shape[-2] // self.tower.patch_size[0], pixels.shape[-1] // self.tower.patch_size[1]
        dense = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
        return image_emb, dense, context

    def pool_regions(self, dense: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        return pool_regions(dense, regions, self.image_size)

    def crop_regions(self, pixels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """Crops of the regions enlarged by ``crop_scale``, resized to the model's image size."""
        boxes = enlarge_boxes(regions, self.crop_scale, self.image_size)
        return crop_regions(pixels, boxes, self.image_size[0])

    def encode_crops(self, pixels: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """Global embeddings v^r of the region crops (M, D). With ``crop_chunk`` = n > 0 and autograd
        on, the crops go through the tower n at a time, each chunk recomputed in backward
        (activation memory of one chunk instead of all M crops)."""
        crops = self.crop_regions(pixels, regions)
        if self.crop_chunk <= 0 or not torch.is_grad_enabled() or len(crops) <= self.crop_chunk:
            return self.encode_image(crops)
        chunks = crops.split(self.crop_chunk)
        return torch.cat([checkpoint(self.encode_image, c, use_reentrant=False) for c in chunks])

    # -- text ---------------------------------------------------------------------------------
    def _encode_tokens(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.pixel_mean.device)
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    @torch.no_grad()
    def encode_text_pool(self, texts: Sequence[str], chunk: int = 1024) -> torch.Tensor:
        """Normalised embeddings of a large text pool (nouns × templates), ``chunk`` at a time, in
        eval mode and without autograd, bypassing the caption cache."""
        was_training = self.training
        self.eval()
        emb = torch.cat([self._encode_tokens(list(texts[i : i + chunk])) for i in range(0, len(texts), chunk)])
        self.train(was_training)
        return emb

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings (N, D); cached when the text tower is frozen."""
        if len(texts) == 0:
            return self.pixel_mean.new_zeros((0, self.embed_dim))
        if self.freeze_text:
            return self.text_cache.lookup(texts, self._encode_tokens, self.pixel_mean.device)
        # a caption repeated in the batch is encoded once; indexing keeps every copy's gradient
        unique = list(dict.fromkeys(texts))
        if len(unique) == len(texts):
            return self._encode_tokens(list(texts))
        position = {text: i for i, text in enumerate(unique)}
        index = torch.tensor([position[t] for t in texts], device=self.pixel_mean.device)
        return self._encode_tokens(unique)[index]

    @property
    def embed_dim(self) -> int:
        if hasattr(self.clip, "text_projection"):
            return self.clip.text_projection.shape[1]
        return self.clip.text.output_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        """s = exp(θ), the learnable inverse temperature shared by the contrastive losses."""
        return self.clip.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self, max_value: float = math.log(100)) -> None:
        self.clip.logit_scale.clamp_(0, max_value)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.text_cache.clear()  # cached embeddings belong to the old weights
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_text and mode:
            for name, module in self.clip.named_children():
                if name not in ("visual",):
                    module.eval()
        return self

    # -- the training forward -------------------------------------------------------------------
    @property
    def extra_passes(self) -> list[nn.Module]:
        """Head modules with a student pass of their own (each with ``provides``, a timing ``section`` name
        and ``__call__(model, images, taught, need)`` returning those features)."""
        return [self.detail] if self.detail is not None else []

    @property
    def provides(self) -> frozenset[str]:
        """Every feature name ``forward`` can compute."""
        context = {"context"} if self.dense_mode.gives_context else set()
        return frozenset(FEATURES).union({NO_GRAD_CROPS}, context, *(p.provides for p in self.extra_passes))

    def forward(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        regions: torch.Tensor,
        region_captions: Sequence[str],
        need: Collection[str] = FEATURES,
        taught: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute only the features named in ``need`` (a subset of ``provides``): a parameter that no
        requested feature depends on takes no part in the step. ``taught``: what the teacher computed
        before the student (DetailCLIP's views and kept tokens), handed to the extra passes."""
        need = set(need)
        unknown = need - self.provides
        if unknown:
            raise ValueError(f"features {sorted(unknown)} are not computed by this model; it gives "
                             f"{sorted(self.provides)} (a method's head module adds its own, e.g. method=detailclip)")
        pixels = self.normalize_pixels(images)
        out: dict[str, torch.Tensor] = {}
        if "logit_scale" in need:
            out["logit_scale"] = self.logit_scale
        with section("trunk pass"):
            if {"region_emb", "dense", "context"} & need:
                image_emb, dense, context = self.dense_pass(pixels, "image_emb" in need, "context" in need)
                out["region_emb"] = self.pool_regions(dense, regions)
                if context is not None:
                    out["context"] = context
                if image_emb is not None:
                    out["image_emb"] = image_emb
                if "dense" in need:
                    out["dense"] = dense
            elif "image_emb" in need:
                out["image_emb"] = self.encode_image(pixels)
        if "crop_emb" in need or NO_GRAD_CROPS in need:
            with section("crop pass"):
                if not len(regions):
                    crops = pixels.new_zeros((0, self.embed_dim))
                elif "crop_emb" in need:
                    crops = self.encode_crops(pixels, regions)
                else:
                    with torch.no_grad():
                        crops = self.encode_crops(pixels, regions)
            if "crop_emb" in need:
                out["crop_emb"] = crops
            if NO_GRAD_CROPS in need:
                out[NO_GRAD_CROPS] = crops.detach()
        for extra in self.extra_passes:
            if need & extra.provides:
                with section(extra.section):
                    out.update(extra(self, images, taught or {}, need))
        texts: list[str] = []
        if "text_emb" in need:
            texts += list(captions)
        if "region_text_emb" in need:
            texts += list(region_captions)
        if texts:
            with section("text"):
                text_emb = self.encode_text(texts)
            if "text_emb" in need:
                out["text_emb"], text_emb = text_emb[: len(captions)], text_emb[len(captions) :]
            if "region_text_emb" in need:
                out["region_text_emb"] = text_emb
        return out
