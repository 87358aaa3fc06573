#!/usr/bin/env bash
# Issue 13's segmentation study (docs/results.md, "Segmentation transfer"): each set's 10% arms
# first (the issue's deciding budget), then the 100% arms; one arm after another on one thread.
# Resumable: finished arms are reused when run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for set in lgg_flair kvasir_seg; do
  .venv/bin/openmednet study --config "configs/seg/seg_${set}128.yaml" --set "label_fractions=[0.1]" "$@"
done
for set in lgg_flair kvasir_seg; do
  .venv/bin/openmednet study --config "configs/seg/seg_${set}128.yaml" "$@"
done
