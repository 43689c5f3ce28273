"""Augmented views cut in the data loader from the image at its own resolution (DetailCLIP's reference
pipeline, ``main.py::get_loader`` of its public code), one draw per (seed, epoch, image id):

    RandomResizedCrop(size, scale=(0.14, 1), ratio=(3/4, 4/3), bicubic)
    RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)     brightness, contrast, saturation, hue in random order
    RandomGrayscale(p=0.2)
    RandomApply([GaussianBlur(σ ~ U(0.1, 2))], p=0.1)          PIL's ImageFilter.GaussianBlur(radius=σ)
    RandomApply([Solarize()], p=0.2)                           PIL's ImageOps.solarize (threshold 128)

no flip. The draws follow torchvision's (the crop's rejection loop and its central fallback, ColorJitter's
order permutation) but come from a numpy generator seeded by the sample, so the views are the same on any
number of ranks and workers and after a resume. The result is uint8 (V, 3, size, size); the model normalises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import InterpolationMode


@dataclass(frozen=True)
class ViewRecipe:
    count: int = 2
    size: int = 224
    scale: tuple[float, float] = (0.14, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    flip_p: float = 0.0


def crop_params(height: int, width: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (top, left, h, w): 10 tries of area ~ U(scale)·A and
    log aspect ~ U(log ratio); else the whole image cut to the nearest allowed aspect, centred."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(image: Image.Image, strengths, rng: np.random.Generator) -> Image.Image:
    """torchvision's ``ColorJitter``: factors U(1 ± s) (hue U(±h)), applied in a random order."""
    b, c, s, h = strengths
    factors = [rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), rng.uniform(-h, h)]
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for index in rng.permutation(4):
        image = ops[index](image, float(factors[index]))
    return image


def cut_view(image: Image.Image, recipe: ViewRecipe, rng: np.random.Generator) -> Image.Image:
    top, left, h, w = crop_params(image.height, image.width, recipe.scale, recipe.ratio, rng)
    view = TF.resized_crop(image, top, left, h, w, [recipe.size, recipe.size], InterpolationMode.BICUBIC)
    if rng.random() < recipe.flip_p:
        view = TF.hflip(view)
    if rng.random() < recipe.jitter_p:
        view = color_jitter(view, recipe.jitter, rng)
    if rng.random() < recipe.grayscale_p:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if rng.random() < recipe.blur_p:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*recipe.blur_sigma)))
    if rng.random() < recipe.solarize_p:
        view = ImageOps.solarize(view)
    return view


def cut_views(image: Image.Image, recipe: ViewRecipe, rng: np.random.Generator) -> torch.Tensor:
    """``recipe.count`` views of an RGB image: uint8 (V, 3, size, size)."""
    views = [np.asarray(cut_view(image, recipe, rng)) for _ in range(recipe.count)]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()
