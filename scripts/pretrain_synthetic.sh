#!/usr/bin/env bash
# Pretrain the synthetic "pretrained CLIP" once (experiment=synthetic_pretrain), unless a model
# trained on the current scenes is already there; prints its folder on the last line.
# Used by table1_synthetic.sh and methods_synthetic.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
data_root=$(python -m fineclip.train +experiment=synthetic_pretrain --cfg job --package data.root --resolve | tail -1)
pretrained="$data_root/pretrained_tiny"
if [[ -f "$pretrained/eval.json" && "$pretrained/eval.json" -nt "$data_root/DONE" ]]; then
    echo "pre-trained model: $pretrained (already trained)" >&2
else
    python -m fineclip.train +experiment=synthetic_pretrain trainer.progress=false >&2
fi
echo "$pretrained"
