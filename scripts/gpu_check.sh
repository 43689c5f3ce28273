#!/usr/bin/env bash
# What only a GPU can show, on one GPU in under 8 minutes, printed as one table (scripts/gpu_check.py):
# every method= at full model size (EVA02-B-16, ViT-B-16; 224 px, batch 32, 8 regions, bf16, torch.compile),
# a 1-process NCCL torchrun of the tiny experiment, fineclip.benchmark of EVA02-B-16 (img/s, peak GB, MFU),
# a BLIP-2-sized captioner with random weights (regions/s) and an EVA-CLIP-layout EVA02-B-16 file evaluated
# with box_fc on generated COCO-panoptic-shaped data (boxes/s).
# Needs torch with CUDA and the project's dependencies (on a machine without a package index: the wheels
# installed as docs/speed.md says). Extra arguments go to gpu_check.py, e.g. --out DIR or --budget-s 400.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FINECLIP_CACHE="${FINECLIP_CACHE:-$(mktemp -d)}"
exec python3 scripts/gpu_check.py "$@"
