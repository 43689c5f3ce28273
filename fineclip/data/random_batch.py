"""Random batches in the collated layout, for the benchmark, start-up checks and tests."""

from __future__ import annotations

import torch


def random_batch(batch_size: int, regions_per_image: int, image_size: int, step: int = 0, device="cpu",
                 views=None) -> dict:
    """Random uint8 images, ``regions_per_image`` boxes of 10-60 % of the side per image, and
    captions that repeat every 4 steps (a frozen text tower's cache warms up after 4 steps); with a
    ``views`` recipe (``ViewRecipe``), random uint8 views as the data loader cuts them."""
    g = torch.Generator().manual_seed(step)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    m = batch_size * regions_per_image
    side = image_size * (0.1 + 0.5 * torch.rand(m, 2, generator=g))
    corner = (image_size - side) * torch.rand(m, 2, generator=g)
    index = torch.arange(batch_size).repeat_interleave(regions_per_image).float()[:, None]
    regions = torch.cat([index, corner, corner + side], dim=1)
    extra = {}
    if views is not None:
        shape = (batch_size, views.count, 3, views.size, views.size)
        extra["views"] = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)
    return extra | {
        "image_ids": torch.arange(batch_size) + step * batch_size,
        "images": images.to(device),
        "regions": regions.to(device),
        "captions": [f"caption {i} of step {step % 4}" for i in range(batch_size)],
        "region_captions": [f"region {j} of step {step % 4}" for j in range(m)],
    }
