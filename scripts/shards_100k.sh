#!/usr/bin/env bash
# Web-scale data path end to end on the CPU (docs/data.md, "Tar shards"): generate N synthetic scenes, annotate
# them (their boxes, rule captions) straight into tar shards, train the tiny model for one epoch on the shards.
# Each stage is timed.  Usage: bash scripts/shards_100k.sh [N=100000] [OUT=runs/shards_100k] [train overrides...]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-100000}"
out="${2:-runs/shards_100k}"
mkdir -p "$out"
stage() {  # stage NAME COMMAND...
    local start=$SECONDS
    "${@:2}"
    echo "== $1: $((SECONDS - start)) s"
}
stage generate python -m fineclip.data.synthetic --out "$out/scenes" --train "$n" --val 256
stage annotate python -m fineclip.annotate images="$out/scenes/train.json" out="$out/shards" out_format=shards \
    progress=false
stage train python -m fineclip.train data=shards data.root="$out/shards" data.num_workers=1 trainer.epochs=1 \
    trainer.progress=false trainer.log_every=200 name=shards_100k hydra.run.dir="$out/train" "${@:3}"
du -sh "$out/shards"
