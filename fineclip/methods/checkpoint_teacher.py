"""A teacher that is another checkpoint: a stronger, already region-tuned CLIP (DenseVLM's P-VLM, e.g. a
CLIPSelf-tuned L/14 for a B/16 student).

It computes ``teacher_region_emb``: its own dense RoI features of the batch's boxes, L2-normalised, from the same
images at the student's size, without autograd. Its text tower embeds vocabularies for the loss terms that ask
(``text_encoder``). It is built from the student's model config with ``checkpoint`` (and ``name``, for another
architecture), outside DDP and the optimizer, and never saved: a resumed run reads the file again.

``ensemble_alpha`` = α releases α·student + (1 − α)·initial student at the end (DenseVLM: 0.9); the initial
weights are then kept in the checkpoints, so that a resumed run releases the same.
"""

from __future__ import annotations

import copy

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from fineclip.errors import ConfigError
from fineclip.methods.teachers import Teacher, weight_ensemble
from fineclip.models import FineCLIPModel


class CheckpointTeacher(Teacher):
    provides = frozenset({"teacher_region_emb"})

    def __init__(self, model: DictConfig, checkpoint: str | None, name: str | None = None,
                 ensemble_alpha: float | None = None) -> None:
        if not checkpoint:
            raise ConfigError("teacher.checkpoint is not set: the teacher checkpoint (e.g. a CLIPSelf fine-tune) "
                              "that labels the regions")
        self.model_cfg, self.checkpoint, self.name = model, checkpoint, name
        self.ensemble_alpha = ensemble_alpha
        self.model: FineCLIPModel | None = None
        self.initial: dict[str, torch.Tensor] | None = None

    def setup(self, model: FineCLIPModel) -> None:
        overrides = {"checkpoint": self.checkpoint, "image_size": model.image_size[0], "freeze_text": True}
        if self.name:
            overrides["name"] = self.name
        teacher = instantiate(self.model_cfg, **overrides)
        self.model = teacher.to(model.pixel_mean.device).eval().requires_grad_(False)
        if self.ensemble_alpha is not None:
            self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def features(self, batch: dict, need: frozenset[str]) -> dict[str, torch.Tensor]:
        if "teacher_region_emb" not in need:
            return {}
        regions = batch["regions"]
        if not len(regions):
            return {"teacher_region_emb": batch["images"].new_zeros((0, self.model.embed_dim), dtype=torch.float32)}
        _, dense = self.model.encode_image_dense(self.model.normalize_pixels(batch["images"]), with_global=False)
        return {"teacher_region_emb": self.model.pool_regions(dense, regions)}

    def text_encoder(self):
        return self.model.encode_text_pool

    def final_weights(self, model: FineCLIPModel) -> dict[str, torch.Tensor] | None:
        if self.ensemble_alpha is None:
            return None
        return weight_ensemble(model.state_dict(), self.initial, self.ensemble_alpha)

    def state_dict(self) -> dict:
        return {"initial": self.initial} if self.initial is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.initial is not None:
            self.initial = copy.deepcopy(state["initial"])
