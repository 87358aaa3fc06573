#!/usr/bin/env bash
# The survey's learning-rate / epochs experiment (configs/survey/*.yaml), two studies at a time
# (one per core); reports in runs/survey/<config>/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() { .venv/bin/openmednet study --config "configs/survey/$1.yaml" > "runs/survey_$1.log" 2>&1; }
mkdir -p runs
(run lr1e-4_ep20; run lr1e-4_ep40) &
(run lr1e-5_ep20; run lr1e-5_ep40) &
wait
