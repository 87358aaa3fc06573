#!/usr/bin/env bash
# Pre-train one MedNet v2 weight set (issue 11; docs/pretraining.md, "v2"), exactly as shipped:
# - gray:  objective `distill` (chosen by scripts/pilot_v2.sh), progressive: 5 epochs at 64 px,
#          then 3 epochs at 128 px started from the 64 px backbone (model.init);
# - gray_long: the gray stages, then 4 more epochs at 128 px as a warm restart (a new cosine cycle
#          from the 3-epoch backbone), to test whether feature distillation keeps improving with a
#          longer schedule ("a good teacher is patient and consistent", Beyer et al. 2022). It did
#          not transfer better (docs/pretraining.md, "A longer schedule"), so it is not shipped;
# - gray_map: the gray stages, then 4 more epochs at 128 px from the 3-epoch backbone exactly as
#          gray_long, but distilling the teacher's last feature *map* (objective.distill_target=map,
#          one target per location as FD does per token) instead of its pooled vector: gray_long is
#          its control, so any difference is the target's (docs/pretraining.md, "Map distillation");
# - gray_lite2: the gray stages, then 4 more epochs at 128 px from the 3-epoch backbone exactly as
#          gray_long, but with EfficientNet-Lite2 as the teacher (ImageNet top-1 77.4 % vs Lite0's
#          74.9 %; better ImageNet models give better linear-probe features, Kornblith et al. 2019):
#          gray_long is its control, so any difference is the teacher's (needs openmednet[teachers]).
#          Stopped after 200 steps in session 7: probed at 128 px, Lite2's own features are worse than
#          Lite0's (docs/pretraining.md, "A stronger teacher?");
# - gray_w1: the gray recipe at width 1.0 (4x the parameters, 448 pooled features instead of 224),
#          5 epochs at 64 px then 2 (not 3) at 128 px to fit one session: does capacity, not schedule,
#          limit the distilled student (docs/pretraining.md, "Width 1.0")?
# - color: objective `supervised+distill`, 2 epochs at 128 px;
# - color_map: the color run, then 2 more epochs at 128 px from its backbone distilling the teacher's
#          map (as gray_map; no pooled-target control was run for colour).
# Width 0.5 unless named (width 1.0 costs about twice the time per image).
# Resumable: run the same command again after a kill and each stage continues from its
# checkpoint-last.pt; finished stages are skipped.
# Usage: scripts/pretrain_release_v2.sh gray|gray_long|gray_map|gray_lite2|gray_w1|color|color_map [CORPUS_ROOT=runs] [OUT_ROOT=runs]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$1; CORPUS_ROOT=${2:-runs}; OUT_ROOT=${3:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
stage() {  # stage OUT [--set k=v ...]
  local out=$1; shift
  [ -f "$out/backbone/model_card.json" ] && { echo "done already: $out"; return; }
  .venv/bin/openmednet pretrain --corpus "$CORPUS_ROOT/corpus_${VERSION}128_v2" --out "$out" \
    --config "configs/pretrain_${VERSION}128_v2.yaml" $( [ -f "$out/checkpoint-last.pt" ] && echo --resume ) "$@"
}
if [ "$VERSION" = gray_w1 ]; then
  VERSION=gray
  stage "$OUT_ROOT/pt_gray_w1_stage64" --set model.width_mult=1.0 --set data.image_size=64 --set train.epochs=5
  stage "$OUT_ROOT/pt_gray128_w1" --set model.width_mult=1.0 --set train.epochs=2 \
    --set model.init="$OUT_ROOT/pt_gray_w1_stage64/backbone"
elif [ "$VERSION" = gray ] || [ "$VERSION" = gray_long ] || [ "$VERSION" = gray_map ] || [ "$VERSION" = gray_lite2 ]; then
  VERSION=gray
  stage "$OUT_ROOT/pt_gray_v2_stage64" --set data.image_size=64 --set train.epochs=5
  stage "$OUT_ROOT/pt_gray128_v2" --set train.epochs=3 --set model.init="$OUT_ROOT/pt_gray_v2_stage64/backbone"
  if [ "$1" = gray_long ]; then
    stage "$OUT_ROOT/pt_gray128_v2_long" --set train.epochs=4 --set model.init="$OUT_ROOT/pt_gray128_v2/backbone"
  elif [ "$1" = gray_map ]; then
    stage "$OUT_ROOT/pt_gray128_v2_map" --set train.epochs=4 --set model.init="$OUT_ROOT/pt_gray128_v2/backbone" \
      --set objective.distill_target=map
  elif [ "$1" = gray_lite2 ]; then
    stage "$OUT_ROOT/pt_gray128_v2_lite2" --set train.epochs=4 --set model.init="$OUT_ROOT/pt_gray128_v2/backbone" \
      --set objective.teacher=efficientnet_lite2
  fi
elif [ "$VERSION" = color ] || [ "$VERSION" = color_map ]; then
  VERSION=color
  stage "$OUT_ROOT/pt_color128_v2" --set train.epochs=2
  if [ "$1" = color_map ]; then
    stage "$OUT_ROOT/pt_color128_v2_map" --set train.epochs=2 --set model.init="$OUT_ROOT/pt_color128_v2/backbone" \
      --set objective.distill_target=map
  fi
else
  echo "unknown weight set '$VERSION': use gray, gray_long, gray_map, gray_lite2, gray_w1, color or color_map" >&2; exit 2
fi
