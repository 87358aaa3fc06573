#!/usr/bin/env bash
# The short pilot that picked the v2 gray objective (docs/pretraining.md, "v2 pilot"): two
# equal-step arms on the v2 gray corpus at 64 px, width 0.5, objective distill vs supervised+distill,
# then a linear probe of each on brain MRI and BUSI (configs/pilot_v2_probe.yaml), the two gray
# targets where v1 lost to ImageNet features. Width is not piloted here: width 1.0 costs about twice
# the time per image (docs/pretraining.md), so in a fixed budget it sees half the images.
# Usage: scripts/pilot_v2.sh [CORPUS_ROOT=runs] [OUT_ROOT=runs] [STEPS=150]
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS_ROOT=${1:-runs}; OUT_ROOT=${2:-runs}; STEPS=${3:-150}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
for width in 0.5; do
  for objective in distill supervised+distill; do
    out="$OUT_ROOT/pilot_v2_w${width}_${objective/+/_}"
    [ -f "$out/backbone/model_card.json" ] && { echo "done already: $out"; continue; }
    .venv/bin/openmednet pretrain --corpus "$CORPUS_ROOT/corpus_gray128_v2" --out "$out" \
      --config configs/pretrain_gray128_v2.yaml --objective "$objective" \
      --set model.width_mult=$width --set data.image_size=64 --set train.epochs=1 \
      --set train.max_steps_per_epoch=$STEPS --set optim.warmup_epochs=0.1 --set monitor.enabled=false \
      $( [ -d "$out" ] && echo --resume )
  done
done
.venv/bin/openmednet study --config configs/pilot_v2_probe.yaml
