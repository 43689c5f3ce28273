"""DetailCLIP's reference views (fineclip/data/image_views.py): cut from the image at its own resolution,
the crop's fallback as torchvision's, each step of the pipeline where it applies, one draw per
(seed, epoch, image id); the teacher takes them view-major from the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from fineclip.data import RegionCaptionDataset, collate_regions
from fineclip.data.image_views import ViewRecipe, crop_params, cut_views
from fineclip.methods import DetailCLIPTeacher
from fineclip.models import create_model

PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _stripes(height=128, width=256):
    """Fine detail: 1-px vertical stripes, which a 64-px squash destroys and a full-resolution crop keeps."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, ::2] = (250, 20, 120)
    array[:, :, 1] += np.arange(height, dtype=np.uint8)[:, None] % 64
    return Image.fromarray(array)


def test_a_view_is_cut_from_the_full_resolution_image():
    image = _stripes()  # 128 x 256
    recipe = ViewRecipe(count=1, size=64, scale=(0.125, 0.125), ratio=(1.0, 1.0), **PLAIN)  # a 64 x 64 square
    top, left, h, w = crop_params(128, 256, recipe.scale, recipe.ratio, np.random.default_rng(0))
    assert (h, w) == (64, 64)
    view = cut_views(image, recipe, np.random.default_rng(0))[0]
    expected = TF.resized_crop(image, top, left, 64, 64, [64, 64], InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(view.permute(1, 2, 0).numpy(), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(expected), np.asarray(image)[top:top + 64, left:left + 64])  # 1:1
    squashed = image.resize((32, 32), Image.BICUBIC)  # the same region cut from a 32-px batch image instead
    from_batch = squashed.crop((left / 8, top / 4, left / 8 + 8, top / 4 + 16)).resize((64, 64), Image.BICUBIC)
    assert np.abs(np.asarray(from_batch, dtype=float) - np.asarray(expected, dtype=float)).mean() > 20  # stripes lost


def test_the_crop_falls_back_to_a_centred_crop_of_the_nearest_allowed_aspect():
    # 10 x 1000: no crop of 90-100 % of the area with aspect <= 4/3 fits, so torchvision's fallback applies
    assert crop_params(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0)) == (0, 493, 10, 13)
    top, left, h, w = crop_params(300, 400, (0.14, 1.0), (3 / 4, 4 / 3), np.random.default_rng(1))
    assert 0.14 * 0.99 <= h * w / (300 * 400) <= 1 and 0 <= top <= 300 - h and 0 <= left <= 400 - w


def test_grayscale_and_solarize_where_they_apply():
    image = _stripes()
    recipe = ViewRecipe(count=2, size=32, **(PLAIN | {"grayscale_p": 1.0}))
    views = cut_views(image, recipe, np.random.default_rng(0))
    assert torch.equal(views[:, 0], views[:, 1]) and torch.equal(views[:, 1], views[:, 2])
    whole = dict(scale=(1.0, 1.0), ratio=(2.0, 2.0))
    solar = cut_views(image, ViewRecipe(count=1, size=32, **whole, **(PLAIN | {"solarize_p": 1.0})),
                      np.random.default_rng(0))[0]
    plain = TF.resized_crop(image, 0, 0, 128, 256, [32, 32], InterpolationMode.BICUBIC)
    np.testing.assert_array_equal(solar.permute(1, 2, 0).numpy(), np.asarray(ImageOps.solarize(plain)))


def test_the_data_set_draws_views_from_seed_epoch_and_image_id(synthetic_root):
    recipe = ViewRecipe(count=2, size=32)
    data = RegionCaptionDataset.from_file(str(synthetic_root / "train.json"), image_size=64, views=recipe, seed=5)
    item = data[3]
    assert item["views"].shape == (2, 3, 32, 32) and item["views"].dtype == torch.uint8
    assert not torch.equal(item["views"][0], item["views"][1])
    again = RegionCaptionDataset.from_file(str(synthetic_root / "train.json"), image_size=64, views=recipe, seed=5)
    assert torch.equal(again[3]["views"], item["views"])  # another process, the same draw
    data.set_epoch(1)
    assert not torch.equal(data[3]["views"], item["views"])
    batch = collate_regions([data[0], data[1]])
    assert batch["views"].shape == (2, 2, 3, 32, 32)


def test_the_teacher_takes_the_loaders_views_view_major():
    torch.manual_seed(0)
    model = create_model("fineclip-tiny", detailclip={})
    teacher = DetailCLIPTeacher(views=2, view_source="image", view_scale=(0.14, 1.0))
    teacher.setup(model)
    assert teacher.dataset_arguments()["views"] == ViewRecipe(count=2, size=64, scale=(0.14, 1.0))
    views = torch.stack([torch.full((2, 3, 64, 64), 10 * b + v, dtype=torch.uint8) for b in range(3)
                         for v in range(2)]).view(3, 2, 2, 3, 64, 64)[:, :, 0]  # (B=3, V=2, ...) value 10b + v
    out = teacher.batch_views({"views": views, "images": None})
    order = [10 * b + v for v in range(2) for b in range(3)]
    torch.testing.assert_close(out, model.normalize_pixels(torch.stack([torch.full((3, 64, 64), o, dtype=torch.uint8)
                                                                         for o in order])))
    with pytest.raises(ValueError, match="needs the training set to cut the views"):
        teacher.batch_views({"images": torch.zeros(1, 3, 64, 64, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="view_source='crop'"):
        DetailCLIPTeacher(view_source="crop")
