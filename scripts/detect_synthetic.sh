#!/usr/bin/env bash
# Open-vocabulary detection (F-ViT, python -m fineclip.detect) on the synthetic split (8 base / 4 novel shapes),
# one detector per backbone: untrained, the synthetic pretrained CLIP, and that CLIP fine-tuned with method=fineclip,
# clip and clipself (experiment=synthetic_methods, 300 steps each); each detector is evaluated twice: with the
# frozen CLIP score fused (the default alpha 0.1, beta 0.8) and without it (alpha = beta = 0). Prints one table.
# Usage: bash scripts/detect_synthetic.sh [overrides applied to every detector, e.g. epochs=3]
set -euo pipefail
cd "$(dirname "$0")/.."
out="runs/detect_synthetic/$(date +%Y-%m-%d_%H-%M-%S)"
mkdir -p "$out"
detect() {  # detect NAME BACKBONE_CHECKPOINT|null: train + evaluate, then evaluate without the fusion
    python -m fineclip.detect progress=false backbone.checkpoint="$2" hydra.run.dir="$out/detect_$1" "${extra[@]}"
    python -m fineclip.detect progress=false evaluate_only=true detector.alpha=0 detector.beta=0 \
        backbone.checkpoint="$2" detector_checkpoint="$out/detect_$1/checkpoints/last.pt" \
        hydra.run.dir="$out/detect_$1_nofusion" "${extra[@]}"
}
extra=("$@")
detect untrained null
pretrained=$(bash scripts/pretrain_synthetic.sh | tail -1)
detect pretrained "$pretrained/checkpoints/last.pt"
for method in fineclip clip clipself; do
    python -m fineclip.train +experiment=synthetic_methods name="$method" method="$method" trainer.progress=false \
        hydra.run.dir="$out/backbone_$method" >&2
    detect "$method" "$out/backbone_$method/checkpoints/last.pt"
done
echo
printf '| backbone | AP50 novel | AP50 base | AP50 all | without fusion: novel | base | all |\n'
printf '|---|---|---|---|---|---|---|\n'
for run in untrained pretrained clip clipself fineclip; do
    python - "$out/detect_$run/detect.json" "$out/detect_${run}_nofusion/detect.json" "$run" <<'PY'
import json, sys
cells = []
for path in sys.argv[1:3]:
    m = json.load(open(path))
    cells += [f"{m[f'detect/{k}_ap50']:.1f}" for k in ("novel", "base", "all")]
print(f"| {sys.argv[3]} | " + " | ".join(cells) + " |")
PY
done
