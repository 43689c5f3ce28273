"""mmseg's ADE20K train pipeline of the ``seg_linear_ibot`` protocol, on uint8 RGB arrays:

    Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0))   keep the aspect ratio
    RandomCrop(512, cat_max_ratio=0.75)                      no class over 75 % of the crop, up to 10 tries
    RandomFlip(0.5)
    PhotoMetricDistortion                                    brightness ±32, contrast and saturation ×[0.5, 1.5],
                                                             hue ±18 (OpenCV's half-degree units), each p 0.5
    Normalize                                                the model's mean/std (CLIP's, not ImageNet's)
    Pad(512, pad_val=0, seg_pad_val=255)
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image

from fineclip.eval.segmentation import IGNORE


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` with keep_ratio: the largest size with long side ≤ max(scale) and short side
    ≤ min(scale); each side rounded half up. Returns (height, width)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_keep_ratio(image: np.ndarray, scale: tuple[int, int], label: bool = False) -> np.ndarray:
    """An (H, W[, 3]) uint8 array resized into ``scale``: bilinear for images, nearest for label maps."""
    height, width = rescale_size(*image.shape[:2], scale)
    resample = Image.NEAREST if label else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def crop_box(height: int, width: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """mmseg's ``RandomCrop.get_crop_bbox``: (y1, y2, x1, x2), offsets uniform over the margin."""
    y1 = int(rng.integers(max(height - crop, 0) + 1))
    x1 = int(rng.integers(max(width - crop, 0) + 1))
    return y1, y1 + crop, x1, x1 + crop


def random_crop(image: np.ndarray, label: np.ndarray, crop: int, cat_max_ratio: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A crop in which no class covers ``cat_max_ratio`` or more of the labelled pixels (up to 10 tries,
    then the last one), as mmseg's ``RandomCrop``."""
    y1, y2, x1, x2 = crop_box(*label.shape, crop, rng)
    if cat_max_ratio < 1:
        for _ in range(10):
            _, counts = np.unique(label[y1:y2, x1:x2][label[y1:y2, x1:x2] != IGNORE], return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y1, y2, x1, x2 = crop_box(*label.shape, crop, rng)
    return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion`` (each step with probability 0.5; contrast first or last)."""
    def clip(x):
        return np.clip(x, 0, 255).astype(np.uint8)

    def contrast(x):
        return clip(x.astype(np.float32) * rng.uniform(0.5, 1.5)) if rng.integers(2) else x

    image = clip(image.astype(np.float32) + rng.uniform(-32, 32)) if rng.integers(2) else image
    contrast_first = rng.integers(2) == 1
    image = contrast(image) if contrast_first else image
    hsv = rgb_to_hsv(image.astype(np.float32) / 255)
    if rng.integers(2):
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
    if rng.integers(2):
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 18) / 180) % 1.0
    image = clip(np.round(hsv_to_rgb(hsv) * 255))
    return image if contrast_first else contrast(image)


def augment(image: np.ndarray, label: np.ndarray, protocol, rng: np.random.Generator, mean: torch.Tensor,
            std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One training sample: normalised (3, crop, crop) pixels and the (crop, crop) int64 labels."""
    ratio = rng.uniform(0.5, 2.0)
    scale = (int(protocol.scale[0] * ratio), int(protocol.scale[1] * ratio))
    image, label = resize_keep_ratio(image, scale), resize_keep_ratio(label, scale, label=True)
    image, label = random_crop(image, label, protocol.crop, protocol.cat_max_ratio, rng)
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = photometric_distortion(np.ascontiguousarray(image), rng)
    pixels = (torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    pad_h, pad_w = protocol.crop - pixels.shape[1], protocol.crop - pixels.shape[2]
    pixels = torch.nn.functional.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)
    labels = torch.nn.functional.pad(torch.from_numpy(label.astype(np.int64)), (0, pad_w, 0, pad_h), value=IGNORE)
    return pixels, labels
