"""Region captioners: what each box is called.

- ``RuleCaptioner`` — "a {attributes} {class name}" from the proposal's class and attributes (the
  paper's weak, rule-based baseline; no model). The synthetic generator captions its regions with
  the same rule, so ``proposals=gt captioner=rule`` on its json gives back its own captions.
- ``NoCaptioner`` — boxes only.
- ``HFCaptioner`` — any ``transformers`` image-to-text model from a local folder (BLIP-2 by
  default), on crops of the boxes, batched, bf16 on a GPU, greedy or beam search.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from fineclip.annotate.proposers import Proposal
from fineclip.data.captions import rule_caption

DEFAULT_PROMPT = "Describe this image in one sentence."  # the paper's BLIP-2 prompt


def crop_box(bbox: list[float], scale: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) pixel box of ``bbox`` (x, y, w, h) enlarged ``scale`` times
    about its centre and clipped to the image (at least 1 px)."""
    x, y, w, h = bbox
    cx, cy, w, h = x + w / 2, y + h / 2, w * scale, h * scale
    left, top = max(0, int(round(cx - w / 2))), max(0, int(round(cy - h / 2)))
    right, bottom = min(width, int(round(cx + w / 2))), min(height, int(round(cy + h / 2)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


class RuleCaptioner:
    name = "rule"
    prompt = None

    def __init__(self, categories: dict[int, str] | None = None) -> None:
        self.categories = categories or {}

    def __call__(self, images: list[Image.Image], proposals: list[list[Proposal]]) -> list[list[str | None]]:
        """None where a box has no class (a detector's): the rule cannot name it."""
        return [[rule_caption(self.categories[p.category_id], p.attributes) if p.category_id in self.categories
                 else None for p in boxes] for boxes in proposals]


class NoCaptioner:
    name = "none"
    prompt = None

    def __call__(self, images, proposals) -> list[list[str | None]]:
        return [[None] * len(boxes) for boxes in proposals]


class HFCaptioner:
    """A ``transformers`` image-to-text model (BLIP-2, or any model ``AutoModelForImageTextToText``
    loads) and its processor from the local folder ``path``. Every box is cropped (``crop_scale``
    1.0: tight, 1.5: CLIPSelf's context), the crops go through in batches of ``batch_size`` with
    ``prompt``, ``max_new_tokens`` generated greedily (``num_beams`` 1) or by beam search; bf16 on a
    GPU, fp32 on a CPU."""

    name = "hf"

    def __init__(self, path: str, prompt: str = DEFAULT_PROMPT, crop_scale: float = 1.0, batch_size: int = 32,
                 max_new_tokens: int = 20, num_beams: int = 1, device: str = "cpu") -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"captioner.path={path}: no Hugging Face config.json there")
        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.setup(model, processor, f"hf:{Path(path).name}", prompt, crop_scale, batch_size, max_new_tokens,
                   num_beams, device)

    @classmethod
    def from_model(cls, model, processor, name: str = "hf", **options) -> HFCaptioner:
        """A captioner around a model and processor already in memory (``options`` as ``__init__``'s)."""
        captioner = cls.__new__(cls)
        defaults = {"prompt": DEFAULT_PROMPT, "crop_scale": 1.0, "batch_size": 32, "max_new_tokens": 20,
                    "num_beams": 1, "device": "cpu"} | options
        captioner.setup(model, processor, name, **{**defaults, "device": torch.device(defaults["device"])})
        return captioner

    def setup(self, model, processor, name: str, prompt: str, crop_scale: float, batch_size: int,
              max_new_tokens: int, num_beams: int, device: torch.device) -> None:
        self.device, self.processor, self.model = device, processor, model.eval().to(device)
        self.name = name
        self.prompt, self.crop_scale, self.batch_size = prompt, crop_scale, batch_size
        self.generate_options = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}

    @torch.no_grad()
    def caption_crops(self, crops: list[Image.Image]) -> list[str]:
        texts = []
        for start in range(0, len(crops), self.batch_size):
            batch = crops[start : start + self.batch_size]
            prompts = [self.prompt] * len(batch) if self.prompt else None
            inputs = self.processor(images=batch, text=prompts, return_tensors="pt").to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            out = self.model.generate(**inputs, **self.generate_options)
            if "input_ids" in inputs and out.shape[1] > inputs["input_ids"].shape[1] and bool(
                    (out[:, : inputs["input_ids"].shape[1]] == inputs["input_ids"]).all()):
                out = out[:, inputs["input_ids"].shape[1]:]  # decoder-only LMs echo the prompt
            texts += [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        return texts

    def __call__(self, images, proposals) -> list[list[str | None]]:
        crops = [image.crop(crop_box(p.bbox, self.crop_scale, image.width, image.height))
                 for image, boxes in zip(images, proposals, strict=True) for p in boxes]
        texts = iter(self.caption_crops(crops)) if crops else iter(())
        return [[next(texts) for _ in boxes] for boxes in proposals]
