#!/usr/bin/env bash
# Pre-train the three objectives for one MedNet version at CPU scale (64 px, width 0.5) and keep
# every run directory; scripts/compare_objectives.sh then compares their transfer on the public
# targets and docs/pretraining.md says which was shipped and why.
# Usage: scripts/pretrain_release.sh gray|color [CORPUS_ROOT=runs] [OUT_ROOT=runs] [SSL_EPOCHS=3]
# Budgets: supervised 6 epochs; SimCLR and
# combined SSL_EPOCHS=3 epochs: one SSL step processes two views, so 3 SSL epochs cost about the
# same forward/backward compute as 6 supervised epochs (an equal-compute comparison); the
# wall time of each run is in docs/pretraining.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$1; CORPUS_ROOT=${2:-runs}; OUT_ROOT=${3:-runs}; SSL_EPOCHS=${4:-3}
COMMON=(--corpus "$CORPUS_ROOT/corpus_${VERSION}64_v1" --config "configs/pretrain_${VERSION}64.yaml"
        --set model.width_mult=0.5 --set data.num_workers=1 --set train.progress=false)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {  # skip runs that already finished (their backbone export exists)
  local out="$OUT_ROOT/pt_${VERSION}_$1"; shift
  [ -f "$out/backbone/model_card.json" ] && { echo "done already: $out"; return; }
  .venv/bin/openmednet pretrain "${COMMON[@]}" --out "$out" "$@"
}
run supervised --objective supervised --set train.epochs=6
run simclr --objective simclr --set train.epochs="$SSL_EPOCHS"
run combined --objective combined --set train.epochs="$SSL_EPOCHS"
