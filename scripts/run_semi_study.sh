#!/usr/bin/env bash
# Issue 12's semi-supervised study (docs/results.md, "Semi-supervised fine-tuning"): the gray
# targets, ISIC 2017, then bccd_wbc, one arm after another on one thread. Resumable: finished arms
# are reused when run again. Tables: scripts/results_table.py runs/semi_<name>64/report.json
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for name in gray color bccd; do
  .venv/bin/openmednet study --config "configs/semi/semi_${name}64.yaml" "$@"
done
