#!/usr/bin/env bash
# Open-vocabulary detection (F-ViT, python -m fineclip.detect) on the synthetic split (8 base / 4 novel shapes),
# one detector per backbone: untrained, the synthetic pretrained CLIP, and that CLIP fine-tuned with method=fineclip,
# clip and clipself (experiment=synthetic_methods, 300 steps each); then the fineclip backbone's detector
# evaluated again without the frozen CLIP score (detector.beta=0). Prints one table of AP50 novel / base / all.
# Usage: bash scripts/detect_synthetic.sh [overrides applied to every detector, e.g. epochs=3]
set -euo pipefail
cd "$(dirname "$0")/.."
out="runs/detect_synthetic/$(date +%Y-%m-%d_%H-%M-%S)"
mkdir -p "$out"
detect() {  # detect NAME BACKBONE_CHECKPOINT|null
    python -m fineclip.detect progress=false backbone.checkpoint="$2" hydra.run.dir="$out/detect_$1" "${extra[@]}"
}
extra=("$@")
detect untrained null
pretrained=$(bash scripts/pretrain_synthetic.sh | tail -1)
detect pretrained "$pretrained/checkpoints/last.pt"
for method in fineclip clip clipself; do
    python -m fineclip.train +experiment=synthetic_methods name="$method" method="$method" trainer.progress=false \
        hydra.run.dir="$out/backbone_$method" >&2
    detect "$method" "$out/backbone_$method/checkpoints/last.pt"
    if [[ $method == fineclip ]]; then
        python -m fineclip.detect progress=false evaluate_only=true detector.beta=0 \
            backbone.checkpoint="$out/backbone_fineclip/checkpoints/last.pt" \
            detector_checkpoint="$out/detect_fineclip/checkpoints/last.pt" hydra.run.dir="$out/detect_fineclip_beta0" \
            "${extra[@]}"
    fi
done
echo
printf '| backbone | AP50 novel | AP50 base | AP50 all |\n|---|---|---|---|\n'
for run in untrained pretrained clip clipself fineclip fineclip_beta0; do
    python - "$out/detect_$run/detect.json" "$run" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {m['detect/novel_ap50']:.1f} | {m['detect/base_ap50']:.1f} | {m['detect/all_ap50']:.1f} |")
PY
done
