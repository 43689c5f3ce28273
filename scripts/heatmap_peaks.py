"""How often the text heatmap of an object's class ("a {class}") peaks inside that class's pixels, on
the synthetic val scenes, for a checkpoint; beside it, the chance rate (the class's share of the image).

    python scripts/heatmap_peaks.py RUN/checkpoints/last.pt [--template "a {}"]
"""

import argparse

import torch
from omegaconf import OmegaConf

from fineclip.eval.segmentation import IGNORE, SegmentationSet
from fineclip.evaluate import load_model
from fineclip.viz.maps import text_heatmap


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--template", default="a {}")
    args = parser.parse_args()
    model, _ = load_model(OmegaConf.create({"checkpoint": args.checkpoint, "model": None}))
    model.eval()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    root = state["config"]["data"]["root"]
    dataset = SegmentationSet.from_instances(f"{root}/val.json", size=model.image_size[0])
    texts = model.encode_text([args.template.format(n) for n in dataset.class_names]).float()
    inside = chance = total = 0
    for index in range(len(dataset)):
        image, label = dataset[index]
        _, dense = model.encode_image_dense(model.normalize_pixels(image[None]), with_global=False)
        for c in label.unique().tolist():
            if c == IGNORE:
                continue
            heat = text_heatmap(dense[0], texts[c], tuple(label.shape))
            peak = divmod(int(heat.argmax()), label.shape[1])
            inside += int(label[peak] == c)
            chance += float((label == c).float().mean())
            total += 1
    print(f"{total} objects of {len(dataset)} val images: the class heatmap peaks inside the class's pixels for "
          f"{100 * inside / total:.1f} % (chance: {100 * chance / total:.1f} %)")


if __name__ == "__main__":
    main()
