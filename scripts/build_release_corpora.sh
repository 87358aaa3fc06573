#!/usr/bin/env bash
# Build the two 64 px corpora that the shipped weights are pre-trained on (docs/pretraining.md).
#
# Leakage policy beyond hash-based exclusion of every target set:
# - chest_xray_pneumonia is left out of the gray corpus: PneumoniaMNIST (a target) is derived from
#   the same patients (Kermany 2018) and has no patient ids, so no hash can prove independence.
# - bccd_smears is left out of the colour corpus: the bccd_wbc target cells are crops of those
#   smears, which whole-image hashes cannot detect.
# Usage: scripts/build_release_corpora.sh [OUT_ROOT=runs]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}
DATA=${OPENMEDNET_SHARED_DATA:-../shared/data}
G=$DATA/gray; C=$DATA/color
.venv/bin/openmednet corpus build $G/pretrain/brain_tumor_mri $G/pretrain/knee_oa $G/pretrain/covid_cxr_figure1 \
  --out "$OUT/corpus_gray64_v1" --channels 1 --size 64 --workers 2 \
  --exclude $G/targets/openi_abd_vs_cxr --exclude $G/targets/brain_mri_yes_no --exclude $G/targets/busi \
  --exclude $G/targets/pneumoniamnist/pneumoniamnist.npz \
  --modality brain_tumor_mri=MR --modality knee_oa=XR --modality covid_cxr_figure1=XR
.venv/bin/openmednet corpus build $C/pretrain/pbc_blood_cells $C/pretrain/ham10000 $C/pretrain/lc25000_lung \
  $C/pretrain/isic_archive $C/pretrain/chula_rbc12 $C/pretrain/fundus_drive_chase $C/pretrain/medetec_wound \
  --out "$OUT/corpus_color64_v1" --channels 3 --size 64 --workers 2 \
  --exclude $C/targets/isic2017_melanoma --exclude $C/targets/bccd_wbc \
  --modality pbc_blood_cells=blood_smear --modality ham10000=dermoscopy --modality lc25000_lung=histopathology \
  --modality isic_archive=dermoscopy --modality chula_rbc12=blood_smear --modality fundus_drive_chase=fundus \
  --modality medetec_wound=wound_photo
