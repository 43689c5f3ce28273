#!/usr/bin/env bash
# The method family on the synthetic scenes, from the same synthetic pretrained tiny CLIP (the
# README's "Methods" table): every method= of configs/method/ fine-tuned for the same 300 steps,
# then FineCLIP's losses with CLIPSelf's frozen teacher and with DetailCLIP's EMA teacher, then CLIM, DeCLIP in
# each attention mode (its context teacher a tiny random ViT: real runs need DINOv2 weights), DenseVLM taught
# by the CLIPSelf row's released weights, and two composed rows no public code runs.
#   1. pretrain once (experiment=synthetic_pretrain; skipped when already done),
#   2. fine-tune each row (experiment=synthetic_methods), each in its own process so that its
#      peak memory is its own (a multirun shares one process: python -m fineclip.train -m
#      +experiment=synthetic_methods gives the same metrics),
#   3. print the table (the pre-trained model first) and write results.csv next to the runs.
# Usage: bash scripts/methods_synthetic.sh [overrides applied to every row, e.g. seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
out="runs/methods_synthetic/$(date +%Y-%m-%d_%H-%M-%S)"
pretrained=$(bash scripts/pretrain_synthetic.sh | tail -1)
rows=()
row() {  # row NAME OVERRIDES...
    local dir="$out/${#rows[@]}_$1"
    python -m fineclip.train +experiment=synthetic_methods name="$1" trainer.progress=false \
        hydra.run.dir="$dir" "${@:2}" "${extra[@]}"
    rows+=("$dir")
}
extra=("$@")
for method in clip clipself regionclip regionclip_sigmoid fineclip; do
    row "$method" method="$method"
done
for teacher in frozen ema; do
    row "fineclip+$teacher" method=fineclip teacher="$teacher"
done
row clim method=clim
for mode in qq kk vv csa; do
    row "declip_$mode" method=declip vfm=tiny model.dense_mode.mode="$mode"
done
row densevlm method=densevlm teacher.checkpoint="${rows[1]}/checkpoints/ensembled.pt"  # rows[1]: clipself
row "fineclip+csa" method=fineclip model.dense_mode._target_=fineclip.models.dense_modes.SelfSelfAttention \
    +model.dense_mode.mode=csa
row "declip+boxes" method=declip vfm=tiny regions=boxes
echo
python -m fineclip.results "$pretrained" "${rows[@]}" --csv "$out/results.csv"
