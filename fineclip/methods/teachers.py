"""Teachers: where the distillation target (the embedding of each region's crop) comes from.

- ``SelfTeacher`` — the model itself, live, inside the student's own forward (FineCLIP: the crop
  side of L_SD carries gradient unless ``loss.detach_teacher``).
- ``FrozenTeacher`` — a copy of the initial model that never changes (CLIPSelf, RegionCLIP).
- ``EMATeacher`` — a copy updated after every optimizer step as θ_t ← m_k·θ_t + (1 − m_k)·θ_s,
  with m rising from ``momentum`` towards 1 on a cosine over the run (DetailCLIP, DINO): the update
  after optimizer step k = 1 … N uses m_{k−1}, m_i = 1 − (1 − momentum)·(cos(π·i/N) + 1)/2, so the
  first update uses ``momentum`` itself and the last one m_{N−1} < 1 (DINO's schedule, indexed 0 … N−1).

A copy is outside the optimizer and outside DDP (a separate module on the same device), runs
without autograd, and is saved with the checkpoint (so a resumed run continues with the same one).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from fineclip.models import FineCLIPModel

CROP_FEATURES = frozenset({"crop_emb", "crop_emb_nograd"})


class Teacher:
    """The role's hooks. ``provides``: the features the teacher computes instead of the student."""

    provides: frozenset[str] = frozenset()

    def setup(self, model: FineCLIPModel) -> None:
        """Called once with the initial model, before any step."""

    def features(self, batch: dict, need: frozenset[str]) -> dict[str, torch.Tensor]:
        """The features of ``need`` for a batch on the device; computed before the student's forward,
        which receives them as ``taught``."""
        return {}

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch's steps (and after a resume)."""

    def dataset_arguments(self) -> dict:
        """Arguments of the training set's constructor this teacher needs (after ``setup``)."""
        return {}

    def text_encoder(self):
        """The teacher's own text-pool encoder (``FineCLIPModel.encode_text_pool``), for the loss terms that embed a
        vocabulary with the teacher's tower (DenseVLM); None when the teacher has no text tower of its own."""
        return None

    def probe(self):
        """A context in which ``features`` leaves the teacher's state as it was (the start-up probe of
        which parameters the loss uses runs one forward)."""
        return contextlib.nullcontext()

    def begin_step(self) -> None:
        """Called before the first micro-batch of every optimizer step (what a skipped step gathered is dropped)."""

    def after_step(self, model: FineCLIPModel, step: int, total_steps: int) -> None:
        """Called once after optimizer step ``step`` (1-based) of ``total_steps``, when it was taken (finite loss)."""

    def final_weights(self, model: FineCLIPModel) -> dict[str, torch.Tensor] | None:
        """The weights to release at the end of training, when they are not the student's."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SelfTeacher(Teacher):
    """The model itself: the student's forward computes the crop embeddings (today's FineCLIP)."""


@torch.no_grad()
def weight_ensemble(student: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], alpha: float):
    """α·student + (1 − α)·initial for every floating-point tensor (the others: the student's)."""
    return {k: alpha * v + (1 - alpha) * initial[k].to(v.device) if v.is_floating_point() else v.clone()
            for k, v in student.items()}


class FrozenTeacher(Teacher):
    """A frozen copy of the initial model embeds the region crops.

    With ``ensemble_alpha`` = α the released weights are α·student + (1 − α)·initial (CLIPSelf:
    α = 0.7 for ViT-B/16, 0.95 for ViT-L/14); checkpoints keep the student, for resuming.
    With ``crop_size`` the copy is the initial model built for that input size (position embeddings resized),
    so that the crops go through it at, e.g., 224 px while the student trains at 560 (CLIPSelf, DeCLIP).
    """

    provides = CROP_FEATURES

    def __init__(self, ensemble_alpha: float | None = None, crop_size: int | None = None) -> None:
        self.model: FineCLIPModel | None = None
        self.ensemble_alpha = ensemble_alpha
        self.crop_size = crop_size
        self.initial: dict[str, torch.Tensor] | None = None  # the student's initial weights, when the copy differs

    def setup(self, model: FineCLIPModel) -> None:
        if self.crop_size and self.crop_size != model.image_size[0]:
            from fineclip.models.factory import at_size

            self.model = at_size(model, self.crop_size)
            if self.ensemble_alpha is not None:
                self.initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.model = copy.deepcopy(model).eval()
        self.model.text_cache.clear()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def features(self, batch, need) -> dict[str, torch.Tensor]:
        images, regions = batch["images"], batch["regions"]
        names = need & CROP_FEATURES
        if not names:
            return {}
        if not len(regions):
            crops = images.new_zeros((0, self.model.embed_dim), dtype=torch.float32)
        else:
            crops = self.model.encode_crops(self.model.normalize_pixels(images), regions)
        return dict.fromkeys(names, crops)

    def final_weights(self, model: FineCLIPModel) -> dict[str, torch.Tensor] | None:
        if self.ensemble_alpha is None:
            return None
        initial = self.initial if self.initial is not None else self.model.state_dict()
        return weight_ensemble(model.state_dict(), initial, self.ensemble_alpha)

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict()}
        if self.initial is not None:
            state["initial"] = self.initial
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.initial is not None:
            self.initial = {k: v.clone() for k, v in state["initial"].items()}


def ema_momentum(index: int, total_steps: int, start: float) -> float:
    """m_i = 1 − (1 − start)·(cos(π·i/N) + 1)/2 for i = 0 … N−1: ``start`` at i = 0, rising towards 1."""
    return 1.0 - (1.0 - start) * (math.cos(math.pi * index / max(total_steps, 1)) + 1) / 2


class EMATeacher(FrozenTeacher):
    """An exponential moving average of the student, on a cosine momentum schedule."""

    # the parameters that follow the student (names in FineCLIPModel); None: all of them
    follows: tuple[str, ...] | None = None

    def __init__(self, momentum: float = 0.996) -> None:
        super().__init__()
        self.momentum = momentum

    def final_weights(self, model: FineCLIPModel) -> None:
        return None  # the student is released (the EMA copy is only a teacher)

    @torch.no_grad()
    def after_step(self, model: FineCLIPModel, step: int, total_steps: int) -> None:
        m = ema_momentum(step - 1, total_steps, self.momentum)  # step is 1-based, the schedule 0-based
        student = dict(model.named_parameters())
        for name, param in self.model.named_parameters():
            if self.follows is not None and not name.startswith(self.follows):
                continue
            param.lerp_(student[name].detach(), 1.0 - m)  # θ_t + (1 − m)(θ_s − θ_t) = m·θ_t + (1 − m)·θ_s


class TeacherSet(Teacher):
    """Several teachers in one role, each providing its own features (DeCLIP: the frozen copy embeds the crops,
    an external VFM gives the context target). Hooks run in order; the state is saved per member."""

    def __init__(self, teachers: list[Teacher]) -> None:
        self.teachers = list(teachers)
        for i, a in enumerate(self.teachers):
            for b in self.teachers[i + 1:]:
                if a.provides & b.provides:
                    raise ValueError(f"{type(a).__name__} and {type(b).__name__} both provide "
                                     f"{sorted(a.provides & b.provides)}")
        self.provides = frozenset().union(*(t.provides for t in self.teachers))

    def setup(self, model: FineCLIPModel) -> None:
        for t in self.teachers:
            t.setup(model)

    def features(self, batch: dict, need: frozenset[str]) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.teachers:
            if need & t.provides:
                out.update(t.features(batch, need & t.provides))
        return out

    def set_epoch(self, epoch: int) -> None:
        for t in self.teachers:
            t.set_epoch(epoch)

    def dataset_arguments(self) -> dict:
        return {k: v for t in self.teachers for k, v in t.dataset_arguments().items()}

    def probe(self):
        stack = contextlib.ExitStack()
        for t in self.teachers:
            stack.enter_context(t.probe())
        return stack

    def begin_step(self) -> None:
        for t in self.teachers:
            t.begin_step()

    def after_step(self, model: FineCLIPModel, step: int, total_steps: int) -> None:
        for t in self.teachers:
            t.after_step(model, step, total_steps)

    def text_encoder(self):
        return next((e for t in self.teachers if (e := t.text_encoder()) is not None), None)

    def final_weights(self, model: FineCLIPModel) -> dict[str, torch.Tensor] | None:
        return next((w for t in self.teachers if (w := t.final_weights(model)) is not None), None)

    def state_dict(self) -> dict:
        return {str(i): t.state_dict() for i, t in enumerate(self.teachers)}

    def load_state_dict(self, state: dict) -> None:
        for i, t in enumerate(self.teachers):
            t.load_state_dict(state[str(i)])


def teacher_module(teacher: Teacher) -> nn.Module | None:
    """The teacher's own copy of the model, if it has one."""
    return getattr(teacher, "model", None)
