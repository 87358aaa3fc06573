#!/usr/bin/env bash
# Issue 11's deciding study (docs/results.md, "v2"): linear probe (configs/v2/probe_*) and few-shot
# full fine-tuning at 64 and 128 px (configs/v2/fewshot_*) of v2 vs v1 vs scratch vs ImageNet Lite0.
# Finished arms are reused, so the script resumes after a kill. Tables: scripts/results_table.py.
# probe128: the gray probe at 128 px, the v2 weights' pre-training resolution (session 4).
# probe224: the gray probe at 224 px (Lite0's own resolution) on two targets (session 6).
# Usage: scripts/decide_v2.sh [probe|probe128|probe224|fewshot64|fewshot128|all=all]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WHAT=${1:-all}
study() { .venv/bin/openmednet study --config "configs/v2/$1.yaml"; }
if [ "$WHAT" = probe ] || [ "$WHAT" = all ]; then
  for c in probe_gray_small probe_gray_large probe_color_small probe_color_large; do study $c; done
fi
if [ "$WHAT" = probe128 ] || [ "$WHAT" = all ]; then
  for c in probe_gray_small128 probe_gray_large128; do study $c; done
fi
if [ "$WHAT" = probe224 ] || [ "$WHAT" = all ]; then
  study probe_gray_small224
fi
for size in 64 128; do
  if [ "$WHAT" = "fewshot$size" ] || [ "$WHAT" = all ]; then
    for c in brain_mri_yes_no busi openi_abd_vs_cxr pneumoniamnist color bccd; do study fewshot_$c$size; done
  fi
done
