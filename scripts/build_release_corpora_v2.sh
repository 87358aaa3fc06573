#!/usr/bin/env bash
# Build the two 128 px v2 corpora that the v2 weights are pre-trained on (docs/pretraining.md,
# issue 11): every pre-training pool of ../shared/data, every target set excluded.
#
# Leakage policy beyond hash-based exclusion (exact + near pHash) of every target set, the
# segmentation targets included:
# - chest_xray_pneumonia is left out of the gray corpus: PneumoniaMNIST (a target) is derived from
#   the same patients (Kermany 2018) and has no patient ids, so no hash can prove independence.
# - bccd_smears is left out of the colour corpus: the bccd_wbc target cells are crops of those
#   smears, which whole-image hashes cannot detect.
# - The segmentation targets are excluded through their images/ folders (the masks are not images
#   of the target distribution and would only add false near-copy hits).
# Usage: scripts/build_release_corpora_v2.sh [OUT_ROOT=runs] [gray|color|both=both]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs}; WHICH=${2:-both}
DATA=${OPENMEDNET_SHARED_DATA:-../shared/data}
G=$DATA/gray/pretrain; C=$DATA/color/pretrain; GT=$DATA/gray/targets; CT=$DATA/color/targets
if [ "$WHICH" != color ]; then
.venv/bin/openmednet corpus build \
  $G/brain_tumor_mri $G/knee_oa $G/covid_cxr_figure1 $G/kidney_ct_kaggle_subset $G/iqothnccd_lung_ct \
  $G/head_ct_hemorrhage $G/hc18_fetal_head_us $G/ddti_thyroid_us $G/pocus_lung_us $G/nih_cxr8_talo_subset \
  $G/ieee8023_covid_cxr $G/hannover_covid_cxr $G/actualmed_cxr $G/dc1000_dental_pano \
  --out "$OUT/corpus_gray128_v2" --channels 1 --size 128 --workers 2 \
  --exclude $GT/openi_abd_vs_cxr --exclude $GT/brain_mri_yes_no --exclude $GT/busi \
  --exclude $GT/pneumoniamnist/pneumoniamnist.npz --exclude $DATA/seg/gray/lgg_flair/images \
  --modality brain_tumor_mri=MR --modality knee_oa=XR --modality covid_cxr_figure1=XR \
  --modality kidney_ct_kaggle_subset=CT --modality iqothnccd_lung_ct=CT --modality head_ct_hemorrhage=CT \
  --modality hc18_fetal_head_us=US --modality ddti_thyroid_us=US --modality pocus_lung_us=US \
  --modality nih_cxr8_talo_subset=XR --modality ieee8023_covid_cxr=XR --modality hannover_covid_cxr=XR \
  --modality actualmed_cxr=XR --modality dc1000_dental_pano=XR
fi
if [ "$WHICH" != gray ]; then
.venv/bin/openmednet corpus build \
  $C/pbc_blood_cells $C/ham10000 $C/lc25000_lung $C/isic_archive $C/chula_rbc12 $C/fundus_drive_chase \
  $C/medetec_wound $C/kather2016_crc $C/nih_malaria_cells $C/odir5k_fundus $C/heimed_fundus \
  $C/aptos2019_fundus $C/cvc_clinicdb $C/cvc_colondb \
  --out "$OUT/corpus_color128_v2" --channels 3 --size 128 --workers 2 \
  --exclude $CT/isic2017_melanoma --exclude $CT/bccd_wbc --exclude $DATA/seg/color/kvasir_seg/images \
  --modality pbc_blood_cells=blood_smear --modality ham10000=dermoscopy --modality lc25000_lung=histopathology \
  --modality isic_archive=dermoscopy --modality chula_rbc12=blood_smear --modality fundus_drive_chase=fundus \
  --modality medetec_wound=wound_photo --modality kather2016_crc=histopathology \
  --modality nih_malaria_cells=blood_smear --modality odir5k_fundus=fundus --modality heimed_fundus=fundus \
  --modality aptos2019_fundus=fundus --modality cvc_clinicdb=endoscopy --modality cvc_colondb=endoscopy
fi
