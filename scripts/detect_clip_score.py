"""How well the detector's frozen CLIP score (the fusion's p_clip: a 1×1 RoIAlign of the dense map against the
class text embeddings, background included) classifies the ground-truth boxes of the validation file, novel
and base apart. The fusion can only raise novel AP50 where this score knows the novel classes.

    python scripts/detect_clip_score.py backbone.checkpoint=runs/.../checkpoints/last.pt [more detect overrides]
"""

from __future__ import annotations

import sys

import torch
from hydra import compose, initialize_config_dir

from fineclip.cli import CONFIG_DIR
from fineclip.detect.data import OVDetectionSet
from fineclip.detect.run import build


@torch.no_grad()
def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="detect", overrides=overrides)
    torch.manual_seed(cfg.seed)
    detector, split = build(cfg, torch.device("cpu"))
    detector.eval()
    val = OVDetectionSet(cfg.data.val_ann, cfg.data.image_root, split, cfg.data.image_size, train=False)
    counts = {part: [0, 0, 0] for part in ("novel", "base")}  # right class first, background first, boxes
    for index in range(len(val)):
        image, target = val[index]
        batch, _ = detector.transform([image.float() / 255])
        _, dense = detector.backbone(batch.tensors)
        logits = detector.roi_heads.clip_logits(dense, [target["boxes"]])
        for label, row in zip(target["labels"].tolist(), logits, strict=True):
            count = counts["novel" if split.names[label - 1] in split.novel else "base"]
            count[0] += int(row[1:].argmax().item() + 1 == label)
            count[1] += int(row.argmax().item() == 0)
            count[2] += 1
    for part, (right, background, boxes) in counts.items():
        print(f"{part}: {boxes} boxes, the right class ranked first among the {len(split.names)} classes "
              f"{100 * right / max(boxes, 1):.1f}%, background ranked first {100 * background / max(boxes, 1):.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
