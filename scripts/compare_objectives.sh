#!/usr/bin/env bash
# Compare the pre-training objectives by linear-probe transfer on the public targets
# (configs/compare_objectives_*.yaml); reports land in runs/compare_<version>_<part>/report.md.
# Usage: scripts/compare_objectives.sh [gray|color ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
versions=("$@"); [ ${#versions[@]} -gt 0 ] || versions=(gray color)
for v in "${versions[@]}"; do
  for part in small large; do
    .venv/bin/openmednet study --config "configs/compare_objectives_${v}_${part}.yaml"
  done
done
