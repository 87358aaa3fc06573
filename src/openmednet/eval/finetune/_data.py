"""The data half of a fine-tuning run: clean splits, leakage checks, the few-shot subset and the loaders.

Shared by classification and segmentation (``eval.segmentation``): ``prepare_splits``,
``check_init_corpus``, ``_split_run`` and ``split_loader`` do not know the task.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import DataLoader

from openmednet.data.datasets import LabelledDataset
from openmednet.data.loader import build_loader
from openmednet.data.transforms import build_transform
from openmednet.engine.inputs import EvalInputs
from openmednet.eval.finetune._config import FinetuneConfig
from openmednet.eval.finetune._model import run_contract
from openmednet.eval.finetune._outputs import _write_splits
from openmednet.eval.leakage import (
    check_pretraining_leakage,
    shipped_corpus_fingerprint,
)
from openmednet.eval.splits import (
    check_group_leakage,
    find_label_conflicts,
    find_near_duplicates,
    make_splits,
    subsample_train,
)
from openmednet.eval.targets import TargetSet

__all__ = ["check_init_corpus", "prepare_splits", "split_loader"]


def prepare_splits(target: TargetSet, cfg: FinetuneConfig) -> tuple[TargetSet, np.ndarray, dict[str, list[str]]]:
    """Clean the target and split it: returns ``(target, splits, dropped)``.

    1. Images that are (perceptually) identical but carry different labels (masks, for a
       segmentation set) are dropped: their true label is unknown (BUSI's ``malignant (145)`` =
       ``benign (433)``).
    2. Splits: given, else drawn by group and class with ``cfg.split_seed``; no group in two splits.
    3. Train/val images that are near-copies of a test image are dropped (or refused), so the test
       split measures images the model has never seen in any form.

    Returns:
        The cleaned target, its ``(N,)`` split names, and ``{"label_conflicts": ids,
        "near_copies_of_test": ids}`` of the dropped items.
    """
    dropped: dict[str, list[str]] = {"label_conflicts": [], "near_copies_of_test": []}
    # A segmentation set compares masks (its labels are size strata); a classification set, labels.
    agree = getattr(target, "same_annotation", None)
    conflicts = [i for cluster in find_label_conflicts(target.hashes, target.labels, fine=target.fine_hashes,
                                                       agree=agree) for i in cluster]
    if conflicts:
        dropped["label_conflicts"] = [target.ids[i] for i in conflicts]
        what = "masks" if agree else "labels"
        warnings.warn(
            f"{len(conflicts)} identical images carry different {what} and are left out: "
            f"{dropped['label_conflicts'][:4]}", stacklevel=2,
        )
        target = target.subset(np.setdiff1d(np.arange(len(target)), conflicts))
    given = cfg.given_splits and target.given_splits is not None and any(s is not None for s in target.given_splits)
    splits = make_splits(
        target.labels, target.groups, target.given_splits if cfg.given_splits else None,
        val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
    )
    check_group_leakage(target.groups, splits)
    test = np.flatnonzero(splits == "test")
    seen = np.flatnonzero(splits != "test")
    pairs = find_near_duplicates(
        target.hashes[test], target.hashes[seen], cfg.near_threshold,
        query_fine=target.fine_hashes[test], reference_fine=target.fine_hashes[seen],
    )
    if pairs:
        copies = sorted({int(seen[j]) for _, j, _ in pairs})
        examples = [f"{target.ids[test[i]]} ~ {target.ids[seen[j]]} ({d} bits)" for i, j, d in pairs[:3]]
        if cfg.leakage == "error":
            raise ValueError(
                f"{len(copies)} training/validation images are near-copies of test images (e.g. {examples}): "
                f"the test score would be inflated. Fix the splits, or set leakage='drop' to leave them out"
            )
        warnings.warn(
            f"left out {len(copies)} training/validation images that are near-copies of test images "
            f"(within {cfg.near_threshold} of 64 pHash bits, confirmed by the 256-bit hash), e.g. {examples}",
            stacklevel=2,
        )
        dropped["near_copies_of_test"] = [target.ids[i] for i in copies]
        keep = np.setdiff1d(np.arange(len(target)), copies)
        target, splits = target.subset(keep), splits[keep]
    missing = sorted(set(target.label_names) - set(target.labels[splits == "train"].tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no training image after the leakage checks; add images")
    present = set(target.labels[splits == "val"].tolist())
    missing = sorted(set(target.label_names) - present)
    if len(present) < 2:
        fix = "draw splits (given_splits=false) or add images" if given else "add images"
        if hasattr(target, "masks"):  # strata of a segmentation set; model choice is on validation Dice
            warnings.warn(f"the validation split holds only masks of stratum {sorted(present)}: validation Dice "
                          f"scores few kinds of images, so model choice is weakly grounded; {fix}", stacklevel=2)
        else:
            warnings.warn(f"the validation split holds only {sorted(present)}: validation AUROC is undefined, so "
                          f"epochs are chosen on validation loss alone; {fix}", stacklevel=2)
    elif missing:
        # Validation AUROC then averages over the classes present; rare classes of tiny targets
        # (BCCD basophils) may simply not reach the validation split.
        warnings.warn(f"classes {missing} have no validation image: model choice ignores them", stacklevel=2)
    return target, splits, dropped


def check_init_corpus(cfg: FinetuneConfig, target: TargetSet, splits: np.ndarray) -> dict[str, Any] | None:
    """Test images found in the corpus fingerprint shipped with the init's weights.

    Returns:
        ``{"corpus", "n_test", "test_ids_in_corpus"}``, or ``None`` when the init ships no
        fingerprint (scratch, ImageNet, weights saved without one).

    Raises:
        ValueError: leaked test images and ``cfg.leakage == "error"`` (``drop`` only warns: the
            test split is never changed to suit an init; ``run_study`` refuses such arms).
    """
    fingerprint = shipped_corpus_fingerprint(cfg.init, target.channels)
    if fingerprint is None:
        return None
    test = np.flatnonzero(splits == "test")
    pairs = check_pretraining_leakage(target.hashes[test], fingerprint, cfg.near_threshold,
                                      test_fine=target.fine_hashes[test])
    ids = sorted({target.ids[test[i]] for i, _, _ in pairs})
    if ids:
        msg = (f"{len(ids)} of {len(test)} test images (e.g. {ids[:3]}) or near-copies are in the pre-training "
               f"corpus of init '{cfg.init}' ({fingerprint.name}): its test score is inflated")
        if cfg.leakage == "error":
            raise ValueError(f"{msg}; evaluate on other test images, or use another init")
        warnings.warn(msg, stacklevel=2)
    return {"corpus": fingerprint.name, "n_test": len(test), "test_ids_in_corpus": ids}


def _split_run(cfg: FinetuneConfig, target: Any, out: Path) -> tuple[Any, np.ndarray, dict[str, np.ndarray],
                                                                   dict[str, list[str]], dict[str, Any] | None]:
    """The data half of a run, for classification and segmentation (``eval.segmentation``) alike.

    Splits ``target`` (``prepare_splits``: group-aware, stratified by ``labels``, near copies
    dropped), checks the test split against the init's pre-training corpus, subsamples the
    training part (``label_fraction`` / ``per_class``) and writes ``splits.csv`` to ``out``.

    Returns:
        ``(target, splits, idx, dropped, pretraining)``: the target left after the checks, its
        ``(N,)`` split names, the item indices of each split (``idx["train"]`` the ones trained
        on), the ids dropped per reason, and the leakage report (``None`` without a corpus).
    """
    target, splits, dropped = prepare_splits(target, cfg)
    pretraining = check_init_corpus(cfg, target, splits)
    idx = {name: np.flatnonzero(splits == name) for name in ("train", "val", "test")}
    if cfg.label_fraction is not None or cfg.per_class is not None:
        idx["train"] = subsample_train(target.labels, idx["train"], fraction=cfg.label_fraction,
                                       per_class=cfg.per_class, seed=cfg.seed,
                                       unit="stratum" if cfg.task == "segmentation" else "class")
    _write_splits(out, target, splits, idx["train"])
    return target, splits, idx, dropped, pretraining


def split_loader(ds: Any, cfg: Any, train: bool, **kwargs: Any) -> Any:
    """The loader of one split, for classification and segmentation alike.

    ``build_loader`` draws the epoch order and every image's augmentation from (run seed, epoch,
    position), so a run is reproducible whatever ``num_workers`` is. Training drops a last batch
    of one image, which breaks BatchNorm in train mode. ``kwargs`` go to ``build_loader``.
    """
    return build_loader(
        ds, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=train, num_workers=cfg.num_workers,
        drop_last=train and len(ds) % cfg.batch_size == 1 and len(ds) > 1, **kwargs,
    )


def _make_loaders(cfg: FinetuneConfig, target: TargetSet, idx: dict[str, np.ndarray], model: nn.Module,
                  channels: int, size: int) -> dict[str, DataLoader]:
    """Train (augmented, shuffled with the run seed), val and test loaders over the decoded images.

    Every image is prepared once by ``EvalInputs.prepare`` (channels, shorter side to the model's
    size, centre square), as ``openmednet predict`` prepares a file; validation and test then get
    ``EvalInputs.normalize``, training the augmentation. Channel conversions were warned once by
    ``check_input_contract``.
    """
    contract = run_contract(model, channels, size)
    inputs = EvalInputs(contract)
    augment = "gray" if target.channels == 1 else "auto"  # no colour jitter for gray content
    transforms = {True: build_transform(contract, train=True, augment=augment, hflip=cfg.hflip),
                  False: inputs.normalize}
    loaders = {}
    for name, train in (("train", True), ("val", False), ("test", False)):
        # Already prepared: the dataset's own channel conversion and resize are identities here,
        # it only caches the (C, S, S) uint8 arrays.
        ds = LabelledDataset(
            [(inputs.prepare(target.images[i])[0], target.labels[i]) for i in idx[name]], channels=channels,
            image_size=size, transform=transforms[train], class_names=list(target.label_names), resize_mode="crop",
        )
        loaders[name] = split_loader(ds, cfg, train)
    return loaders

