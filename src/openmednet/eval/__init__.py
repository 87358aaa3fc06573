"""Transfer evaluation: fine-tuning, metrics, splits, strategies and studies.

- ``metrics``: AUROC, balanced accuracy, macro-F1, per-class metrics, confusion matrix, ECE and
  stratified bootstrap intervals, as plain dicts.
- ``splits``: given or group-aware stratified splits, few-shot subsets, leakage checks.
- ``strategies``: full fine-tuning, linear probe, freezing the stem and k blocks, Mean-Var init.
- ``targets``: labelled targets decoded and checked once.
- ``finetune``: ``FinetuneConfig`` + ``run_finetune`` (``openmednet finetune``).
- ``study``: ``StudyConfig`` + ``run_study`` (``openmednet study``).
- ``report``: plots and Markdown helpers.

Submodules are imported explicitly (``from openmednet.eval.finetune import run_finetune``) so that
using the metrics does not import torch-heavy training code.
"""
