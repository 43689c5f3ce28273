#!/usr/bin/env bash
# The method family on the synthetic scenes, from the same synthetic pretrained tiny CLIP (the
# README's "Methods" table): every method= of configs/method/ fine-tuned for the same 300 steps,
# then FineCLIP's losses with CLIPSelf's frozen teacher and with DetailCLIP's EMA teacher.
#   1. pretrain once (experiment=synthetic_pretrain; skipped when already done),
#   2. fine-tune each row (experiment=synthetic_methods, multirun; the role mixes as a second sweep),
#   3. print the table (the pre-trained model first) and write results.csv next to the runs.
# Usage: bash scripts/methods_synthetic.sh [overrides applied to every row, e.g. seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
sweep_dir="runs/methods_synthetic/$(date +%Y-%m-%d_%H-%M-%S)"
pretrained=$(bash scripts/pretrain_synthetic.sh | tail -1)
python -m fineclip.train -m +experiment=synthetic_methods trainer.progress=false \
    hydra.sweep.dir="$sweep_dir/methods" "$@"
python -m fineclip.train -m +experiment=synthetic_methods method=fineclip teacher=frozen,ema trainer.progress=false \
    hydra.sweep.dir="$sweep_dir/mixes" "$@"
echo
python -m fineclip.results "$pretrained" "$sweep_dir/methods" "$sweep_dir/mixes" --csv "$sweep_dir/results.csv"
