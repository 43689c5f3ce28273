#!/usr/bin/env bash
# The README's DetailCLIP table on the synthetic scenes, every row evaluated on box classification,
# retrieval and zero-shot / linear-probe segmentation:
#   1. CLIP from scratch and DetailCLIP from scratch: the tiny model, the same 300 steps and the
#      paper's optimizer (experiment=synthetic_detailclip, method=clip / detailclip),
#   2. FineCLIP and CLIPSelf fine-tuning the synthetic pretrained CLIP for 300 steps
#      (experiment=synthetic_methods; the pretraining runs first unless already done),
#   3. the table (results.csv next to the runs).
# Usage: bash scripts/detailclip_synthetic.sh [overrides applied to every row, e.g. seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
out="runs/detailclip_synthetic/$(date +%Y-%m-%d_%H-%M-%S)"
pretrained=$(bash scripts/pretrain_synthetic.sh | tail -1)
rows=()
row() {  # row NAME OVERRIDES...
    local dir="$out/${#rows[@]}_$1"
    python -m fineclip.train name="$1" trainer.progress=false eval.segmentation=true hydra.run.dir="$dir" \
        "${@:2}" "${extra[@]}"
    rows+=("$dir")
}
extra=("$@")
row clip_scratch +experiment=synthetic_detailclip method=clip
row detailclip_scratch +experiment=synthetic_detailclip method=detailclip
row fineclip_finetune +experiment=synthetic_methods method=fineclip
row clipself_finetune +experiment=synthetic_methods method=clipself
echo
python -m fineclip.results "$pretrained" "${rows[@]}" --csv "$out/results.csv"
