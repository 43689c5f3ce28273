"""Time two augmented views of a batch: batched (fineclip.data.views, one RoIAlign and a few
elementwise ops) against torchvision's per-image RandomResizedCrop + flip + ColorJitter loop, as a
data loader would run it.

    python scripts/views_speed.py [--batch 64] [--source 256] [--size 224] [--device cpu]
"""

import argparse
import time

import torch
from torchvision.transforms import v2

from fineclip.data.views import make_views, sample_view_params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--source", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    images = torch.rand(args.batch, 3, args.source, args.source, device=device)
    per_image = v2.Compose([v2.RandomResizedCrop(args.size, scale=(0.4, 1.0), antialias=True),
                            v2.RandomHorizontalFlip(), v2.ColorJitter(0.4, 0.4, 0.2)])

    def batched():
        for _ in range(2):
            make_views(images, sample_view_params(args.batch, args.source, args.source), args.size)

    def looped():
        for _ in range(2):
            torch.stack([per_image(im) for im in images])

    for name, fn in (("batched (fineclip.data.views)", batched), ("per image (torchvision v2)", looped)):
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / args.repeats
        print(f"{name:32s} two views of {args.batch} images {args.source}->{args.size} px on {device}: "
              f"{ms:.1f} ms ({2 * args.batch / ms * 1000:.0f} views/s)")


if __name__ == "__main__":
    main()
