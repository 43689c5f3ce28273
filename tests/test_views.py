"""Batched device views against torchvision's per-image functional ops with the same draws."""

import torch
from torchvision.transforms.v2 import functional as TF

from fineclip.data.views import ViewParams, make_views, sample_view_params


def test_views_equal_torchvision_per_image_with_the_same_parameters():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 40, generator=g)
    params = ViewParams(
        # a 2x downscale, another, and a crop at its own size (RoIAlign then equals bilinear resizing)
        boxes=torch.tensor([[0.0, 0.0, 32.0, 32.0], [4.0, 0.0, 36.0, 32.0], [8.0, 8.0, 24.0, 24.0]]),
        flip=torch.tensor([False, True, True]),
        brightness=torch.tensor([1.0, 1.3, 0.7]), contrast=torch.tensor([1.0, 0.8, 1.4]),
        saturation=torch.tensor([1.0, 1.2, 0.9]),
    )
    views = make_views(images, params, size=16)
    for b in range(3):
        x1, y1, x2, y2 = (int(v) for v in params.boxes[b])
        expected = TF.resized_crop(images[b], y1, x1, y2 - y1, x2 - x1, [16, 16],
                                   interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        if params.flip[b]:
            expected = TF.horizontal_flip(expected)
        expected = TF.adjust_brightness(expected, float(params.brightness[b]))
        expected = TF.adjust_contrast(expected, float(params.contrast[b]))
        expected = TF.adjust_saturation(expected, float(params.saturation[b]))
        torch.testing.assert_close(views[b], expected, rtol=1e-5, atol=1e-5)


def test_sampled_boxes_stay_inside_and_follow_the_scale_and_ratio_ranges():
    params = sample_view_params(2000, 48, 64, torch.Generator().manual_seed(1))
    x1, y1, x2, y2 = params.boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 64 + 1e-4).all() and (y2 <= 48 + 1e-4).all()
    area = (x2 - x1) * (y2 - y1) / (48 * 64)
    assert area.max() <= 1.0 + 1e-5 and area.min() >= 0.4 * 0.74  # clipping can only shrink an area
    assert 0.4 < params.flip.float().mean() < 0.6
    assert params.brightness.min() >= 0.6 and params.brightness.max() <= 1.4
