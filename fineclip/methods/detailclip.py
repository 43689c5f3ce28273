"""DetailCLIP's teacher: an EMA copy of the image tower and the head, which makes the two views of
each image, chooses the tokens the student keeps from its own attention, and gives the centred
targets of the self-distillation terms.

Per step, for a batch of B images (``features``):

    views     V = 2 augmented views per image, one draw per (seed, epoch, image id), so the same on any
              number of ranks and on resume. ``view_source="image"`` (the reference, +experiment=detailclip_*):
              cut by the data loader from the image at its own resolution with the reference's pipeline
              (fineclip/data/image_views.py); ``"batch"``: cut on the device from the resized batch (random
              resized crop, flip, colour jitter; fineclip/data/views.py), cheaper, for the synthetic demos
    attention the teacher's CLS→patch attention on each view, averaged over layers and heads
    keep      the patch tokens of the top ⌊cells²·r⌋ + 1 cells of that map pooled to cells × cells
              (7 × 7 for a 14 × 14 grid: half the grid's side), r = 0.5
    targets   the teacher head on its CLS token and on the removed patch tokens of every view;
              the centres c_cls, c_patch as they were before this optimizer step; updated once after
              it (momentum 0.9) from the mean teacher outputs of all its micro-batches and ranks (DINO)
    τ_t       CLS 0.04; patch 0.04 in the first epoch, 0.07 after

After each optimizer step the image tower and the head follow the student with momentum
0.996 → 1 (cosine, ``EMATeacher``). The centres are saved with the checkpoint; the epoch (hence
τ_t) comes from the trainer's position.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from fineclip.data.image_views import ViewRecipe
from fineclip.data.views import VIEW_UNIFORMS, make_views, view_params
from fineclip.losses.detailclip import teacher_patch_temperature, update_center
from fineclip.methods.teachers import EMATeacher
from fineclip.models import FineCLIPModel
from fineclip.models.attention import kept_tokens

TEACHER_FEATURES = frozenset({"views", "keep", "teacher_cls", "teacher_patch", "centers", "teacher_temperature"})


def view_uniforms(image_ids: list[int], epoch: int, seed: int, view: int) -> torch.Tensor:
    """(B, 8) float64 uniforms of one view of each image, from (seed, epoch, image id, view) alone."""
    return torch.from_numpy(np.stack([np.random.default_rng((seed, epoch, int(i), view)).random(VIEW_UNIFORMS)
                                      for i in image_ids]))


class DetailCLIPTeacher(EMATeacher):
    provides = TEACHER_FEATURES
    follows = ("clip.visual.", "detail.head.")

    def __init__(self, momentum: float = 0.996, views: int = 2, keep_ratio: float = 0.5, cells: int | None = None,
                 center_momentum: float = 0.9, cls_temperature: float = 0.04, patch_temperature: float = 0.07,
                 first_epoch_patch_temperature: float = 0.04, view_scale: tuple[float, float] = (0.4, 1.0),
                 view_source: str = "batch", seed: int = 0) -> None:
        super().__init__(momentum)
        if views < 2:
            raise ValueError("DetailCLIP's CLS loss compares views: teacher.views must be at least 2")
        self.views, self.keep_ratio, self.cells = views, keep_ratio, cells
        self.center_momentum = center_momentum
        self.cls_temperature, self.patch_temperature = cls_temperature, patch_temperature
        self.first_epoch_patch_temperature = first_epoch_patch_temperature
        self.view_scale = tuple(view_scale)
        if view_source not in ("batch", "image"):
            raise ValueError(f"teacher.view_source={view_source!r}: use image (the reference) or batch")
        self.view_source = view_source
        self.seed = seed
        self.epoch = 0
        self.centers: torch.Tensor | None = None  # (2, K): c_cls, c_patch
        self.pending: list[torch.Tensor] = []  # this step's (2, K) means of the teacher outputs, per micro-batch

    def setup(self, model: FineCLIPModel) -> None:
        if model.detail is None:
            raise ValueError("teacher=detailclip needs the model's DetailCLIP head: use method=detailclip")
        super().setup(model)
        self.centers = torch.zeros(2, model.detail.head.out_dim, device=model.pixel_mean.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def temperatures(self) -> tuple[float, float]:
        """(τ_t CLS, τ_t patch) of the current epoch."""
        return self.cls_temperature, teacher_patch_temperature(self.epoch, self.first_epoch_patch_temperature,
                                                               self.patch_temperature)

    def dataset_arguments(self) -> dict:
        if self.view_source != "image":
            return {}
        return {"views": ViewRecipe(count=self.views, size=self.model.image_size[0], scale=self.view_scale)}

    def batch_views(self, batch: dict) -> torch.Tensor:
        """(V·B, 3, S, S) normalised views, view-major: the data loader's (``view_source="image"``) or cut here."""
        if self.view_source == "batch":
            return self.make_views(batch["images"], batch["image_ids"].tolist())
        if "views" not in batch:
            raise ValueError("teacher.view_source=image needs the training set to cut the views: build it with "
                             "the teacher's dataset_arguments()")
        views = batch["views"].transpose(0, 1).flatten(0, 1)  # (B, V, ...) -> (V·B, ...)
        return self.model.normalize_pixels(views)

    def make_views(self, images: torch.Tensor, image_ids: list[int]) -> torch.Tensor:
        """(V·B, 3, S, S) normalised views, view-major, at the model's image size."""
        height, width = images.shape[-2:]
        floats = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = self.model.image_size[0]
        views = [make_views(floats, view_params(view_uniforms(image_ids, self.epoch, self.seed, v), height, width,
                                                scale=self.view_scale), size) for v in range(self.views)]
        return self.model.normalize_pixels(torch.cat(views))

    @torch.no_grad()
    def features(self, batch, need) -> dict[str, torch.Tensor]:
        model = self.model
        images = batch["images"]
        views = self.batch_views(batch)
        tokens, attention = model.tower.tokens_and_cls_attention(views)
        cells = self.cells or attention.shape[-1] // 2
        keep = kept_tokens(attention, cells, self.keep_ratio)
        out = model.detail.head(model.tower.final_norm(tokens))  # (V·B, 1 + N, K)
        cls, patch = out[:, 0].view(self.views, len(images), -1), out[:, 1:]
        removed = ~keep
        centers = self.centers
        self.pending.append(torch.stack([cls.float().reshape(-1, cls.shape[-1]).mean(0),
                                         patch.float().reshape(-1, patch.shape[-1]).mean(0)]))
        return {
            "views": views, "keep": keep, "teacher_cls": cls,
            "teacher_patch": patch[removed].view(len(views), int(removed[0].sum()), -1),
            "centers": centers, "teacher_temperature": torch.tensor(self.temperatures(), device=views.device),
        }

    def begin_step(self) -> None:
        self.pending = []

    @torch.no_grad()
    def after_step(self, model: FineCLIPModel, step: int, total_steps: int) -> None:
        """The EMA update, then the centres' one update of the optimizer step: c ← m·c + (1 − m)·mean of
        the teacher outputs of the step's micro-batches (equal sizes), averaged over the ranks."""
        super().after_step(model, step, total_steps)
        if self.pending:
            step_mean = torch.stack(self.pending).mean(0)
            self.centers = torch.stack([update_center(self.centers[i], step_mean[i], self.center_momentum)
                                        for i in range(2)])
        self.pending = []

    @contextlib.contextmanager
    def probe(self):
        centers = self.centers.clone()
        try:
            yield
        finally:
            self.centers, self.pending = centers, []

    def state_dict(self) -> dict:
        return {**super().state_dict(), "centers": self.centers}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.centers = state["centers"].to(self.centers.device)
