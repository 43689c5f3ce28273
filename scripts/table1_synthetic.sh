#!/usr/bin/env bash
# The paper's Table 1 (which loss terms) on the synthetic scenes with the tiny model, on a CPU:
#   1. pretrain a small CLIP once (experiment=synthetic_pretrain; skipped when already done),
#   2. fine-tune it with the text tower frozen, once per row (experiment=synthetic_table1, multirun),
#   3. print the table (the pre-trained model first) and write results.csv next to the runs.
# Usage: bash scripts/table1_synthetic.sh [overrides applied to every fine-tuning row, e.g. seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
sweep_dir="runs/table1_synthetic/$(date +%Y-%m-%d_%H-%M-%S)"
pretrained=$(bash scripts/pretrain_synthetic.sh | tail -1)
python -m fineclip.train -m +experiment=synthetic_table1 trainer.progress=false hydra.sweep.dir="$sweep_dir" "$@"
echo
python -m fineclip.results "$pretrained" "$sweep_dir" --csv "$sweep_dir/results.csv"
