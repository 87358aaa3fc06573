#!/usr/bin/env bash
# Issue 12's semi-supervised study (docs/results.md, "Semi-supervised fine-tuning"): the gray
# targets, ISIC 2017, then bccd_wbc, one arm after another on one thread. Resumable: finished arms
# are reused when run again. Tables: scripts/results_table.py runs/semi_<name>64/report.json
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for name in gray color bccd; do
  config="configs/semi/semi_${name}64.yaml"
  # none, pseudo_label and fixmatch, from both inits
  .venv/bin/openmednet study --config "$config" "$@"
  # FreeMatch (session 9), in its own folder so the grid above stays as it was measured
  .venv/bin/openmednet study --config "$config" --set "out=runs/semi_${name}64_freematch" --set "semi=[freematch]" "$@"
  # FixMatch's control: its schedule and batches with the unlabelled term off (lambda_u=0), MedNet init
  .venv/bin/openmednet study --config "$config" --set "out=runs/semi_${name}64_samesteps" --set "inits=[auto]" \
    --set "semi=[fixmatch]" --set finetune.lambda_u=0 "$@"
done
