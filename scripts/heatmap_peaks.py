"""How often a text heatmap peaks inside the pixels it names, on a checkpoint's val scenes
(fineclip/viz/peaks.py):

    --text class    (default) for each class in an image, the heatmap of "a {class}" against the pixels
                    of that class; chance is the class's share of the image
    --text caption  for each object, the heatmap of its own region caption ("a large striped red star")
                    against that object's mask; chance is the mask's share of the image

    python scripts/heatmap_peaks.py RUN/checkpoints/last.pt [--text caption] [--template "a {}"] [--ann-file F]
"""

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fineclip.engine.load import load_model
from fineclip.viz.peaks import heatmap_peak_rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--text", choices=("class", "caption"), default="class")
    parser.add_argument("--template", default="a {}", help="the class prompt (--text class)")
    parser.add_argument("--ann-file", help="default: val.json of the data the checkpoint was trained on")
    args = parser.parse_args()
    model, _ = load_model(OmegaConf.create({"checkpoint": args.checkpoint, "model": None}))
    model.eval()
    ann_file = args.ann_file
    if ann_file is None:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        ann_file = Path(state["config"]["data"]["root"]) / "val.json"
    peaks = heatmap_peak_rate(model, ann_file, text=args.text, template=args.template)
    what = "class's pixels" if args.text == "class" else "object's mask"
    print(f"{peaks.total} {args.text} texts in {ann_file}: the heatmap peaks inside the {what} for "
          f"{100 * peaks.rate:.1f} % (chance: {100 * peaks.chance_rate:.1f} %), on some object for "
          f"{100 * peaks.on_objects / max(peaks.total, 1):.1f} %")


if __name__ == "__main__":
    main()
