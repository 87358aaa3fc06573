"""Train/val/test splits for transfer evaluation: given, or group-aware stratified; few-shot
subsampling; leakage checks (shared groups, exact and near-duplicate images, conflicting labels).

The rules (SPEC "Transfer and evaluation", STYLE anti-pattern 8):

- The test split is fixed first and never changes with the seed of a run, the label fraction or the
  strategy: only the training subset varies. Validation (for early stopping and model choice) is
  drawn from what is left.
- Splits go by group (patient, lesion, tile group): no group appears in two splits. Items without a
  group form a group of their own.
- Few-shot training sets are drawn from the train split only, per class, deterministically; smaller
  fractions are subsets of larger ones for the same seed (nested), so label-efficiency curves compare
  like with like.
- Test images that have an exact or near copy (perceptual hash) in the images used for fine-tuning
  are a leak: ``find_near_duplicates`` finds them and the caller drops the training copy or refuses.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from openmednet.data.dedupe import (
    DEFAULT_CONFIRM_THRESHOLD,
    DEFAULT_NEAR_THRESHOLD,
    components,
    confirm_pairs,
    hamming,
    near_pairs,
)

__all__ = [
    "SPLITS",
    "BudgetTooLargeError",
    "check_group_leakage",
    "find_label_conflicts",
    "find_near_duplicates",
    "make_splits",
    "subsample_train",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class BudgetTooLargeError(ValueError):
    """A per-class label budget asks for more training images than a class has."""


def _fill_groups(groups: Sequence[Any] | None, n: int) -> np.ndarray:
    """Group ids as strings; a missing/empty group becomes a unique ``"_item<i>"`` group."""
    if groups is None:
        groups = [None] * n
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries but there are {n} labels")
    out = []
    for i, g in enumerate(groups):
        empty = g is None or (isinstance(g, float) and math.isnan(g)) or str(g).strip() == ""
        out.append(f"_item{i}" if empty else str(g))
    return np.asarray(out, dtype=object)


def _group_fold(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out part of about ``fraction`` of the items, stratified by label and
    disjoint by group (one fold of ``StratifiedGroupKFold`` with ``round(1 / fraction)`` folds)."""
    n_splits = max(2, round(1 / fraction))
    counts = Counter(labels.tolist())
    single = sorted(str(k) for k, c in counts.items() if c < 2)
    if single:
        # Named, since a segmentation set's labels are mask strata ("lesion:large"), not its classes.
        raise ValueError(
            f"cannot split: {single} (classes, or mask strata of a segmentation set) have 1 image each, which "
            f"cannot be in both the training and held-out parts; add images of that kind or drop it"
        )
    n_splits = min(n_splits, len(set(groups.tolist())))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    # Silence sklearn's "least populated class has only m members" warning for small classes: the
    # fold is still stratified as well as the groups allow, and make_splits checks the result.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _, held = next(iter(sgkf.split(np.zeros(len(labels)), labels, groups)))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def make_splits(
    labels: Sequence[Any],
    groups: Sequence[Any] | None = None,
    given: Sequence[Any] | None = None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """Assign every item to ``"train"``, ``"val"`` or ``"test"``.

    Given splits are used as they are (``"TRAIN"``/``"validation"``/``"valid"`` are normalised). When
    no split is given, a test part of about ``test_fraction`` is drawn first, group-aware and
    stratified (``StratifiedGroupKFold``), then a validation part of about ``val_fraction`` of all
    items from the rest. When only train and test are given, validation is drawn from train; when
    only train and val are given, the given val becomes test and validation is drawn from train. The
    result depends only on ``seed`` (use one fixed split seed per target, not the run's seed).

    Args:
        labels: ``N`` class labels (any hashable values).
        groups: ``N`` group ids (patient/lesion); ``None`` or empty entries mean one group per item.
        given: ``N`` split names or empty values; either all items have one, or none.
        val_fraction: share of all items for validation when it has to be drawn.
        test_fraction: share of all items for test when it has to be drawn.
        seed: seed of the split (``random_state`` of the fold shuffling).

    Returns:
        ``(N,)`` array of ``"train"``/``"val"``/``"test"`` strings.

    Raises:
        ValueError: partially given splits, unknown split names, a class with a single image, bad
            fractions, or a result where a class is missing from the training split.
    """
    y = np.asarray([str(v) for v in labels], dtype=object)
    n = len(y)
    if n == 0:
        raise ValueError("no labelled items to split")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < frac < 0.5:
            raise ValueError(f"{name} must lie in (0, 0.5), got {frac}")
    g = _fill_groups(groups, n)
    out = np.full(n, "train", dtype=object)
    given_norm = _normalise_given(given, n)
    if given_norm is not None:
        out[:] = given_norm
        if not (out == "test").any() and (out == "val").any():
            # e.g. ISIC 2017 here: the official test images are unlabelled. The official validation
            # set, held out upstream, becomes the test split and validation is drawn from train.
            out[out == "val"] = "test"
            logger.warning("no labelled test split given: using the given validation split as test")
    if not (out == "test").any():
        test = _group_fold(y, g, test_fraction, seed)
        out[test] = "test"
        logger.info("drew a group-aware stratified test split: %d of %d items", test.sum(), n)
    if not (out == "val").any():
        rest = np.flatnonzero(out == "train")
        frac = min(0.49, val_fraction * n / max(1, rest.size))
        val = _group_fold(y[rest], g[rest], frac, seed + 1)
        out[rest[val]] = "val"
        logger.info("drew a group-aware stratified validation split: %d items", val.sum())
    missing = sorted(set(y.tolist()) - set(y[out == "train"].tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no training image after splitting; add images or drop them")
    return out


def _normalise_given(given: Sequence[Any] | None, n: int) -> np.ndarray | None:
    aliases = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}
    if given is None:
        return None
    if len(given) != n:
        raise ValueError(f"given splits have {len(given)} entries but there are {n} labels")
    names = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip().lower() for v in given]
    if not any(names):
        return None
    if not all(names):
        raise ValueError(
            f"{sum(not s for s in names)} of {n} labelled items have no split while others do: give a "
            f"split to every item or to none (then splits are drawn by group)"
        )
    unknown = sorted(set(names) - set(aliases))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; expected one of train/val/test")
    return np.asarray([aliases[s] for s in names], dtype=object)


def check_group_leakage(groups: Sequence[Any] | None, splits: Sequence[str]) -> None:
    """Raise ``ValueError`` if any (non-empty) group id has items in two different splits."""
    if groups is None:
        return
    seen: dict[str, set[str]] = defaultdict(set)
    for i, (grp, split) in enumerate(zip(_fill_groups(groups, len(splits)), splits)):
        seen[grp].add(str(split))
    leaked = {grp: sorted(s) for grp, s in seen.items() if len(s) > 1}
    if leaked:
        examples = ", ".join(f"{grp!r} in {s}" for grp, s in list(leaked.items())[:5])
        raise ValueError(
            f"{len(leaked)} group(s) appear in more than one split ({examples}): a patient's images must "
            f"stay in one split; fix the given splits or let make_splits draw them"
        )


def subsample_train(
    labels: Sequence[Any],
    train_idx: Sequence[int],
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    seed: int = 0,
    unit: str = "class",
) -> np.ndarray:
    """Few-shot training subset: a fraction of each class, or exactly ``per_class`` images of each.

    Per class, the training items are shuffled once with ``seed`` and the first ``m`` are taken,
    with ``m = max(1, round(fraction * n_class))`` or ``m = per_class``. So for one seed, smaller
    subsets are contained in larger ones (nested). Where the fraction rounds to 0 images the class
    gets 1, and a warning gives the share actually used.

    Args:
        labels: labels of all ``N`` items.
        train_idx: indices (into ``labels``) of the train split.
        fraction: share of each class in ``(0, 1]``; exclusive with ``per_class``.
        per_class: images per class (e.g. 10 for 10-shot).
        seed: subsampling seed (the run's seed).
        unit: what a label value is, for the error message: ``"class"``, or ``"stratum"`` for
            segmentation (empty / small / large lesion, ``data.segmentation``).

    Returns:
        Sorted indices into ``labels``.

    Raises:
        ValueError: neither or both of ``fraction``/``per_class``; a class with fewer than
            ``per_class`` training images.
    """
    if (fraction is None) == (per_class is None):
        raise ValueError("give exactly one of fraction (e.g. 0.1) or per_class (e.g. 10)")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if per_class is not None and per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    y = np.asarray([str(v) for v in labels], dtype=object)
    train_idx = np.asarray(train_idx, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen, raised = [], []
    for cls in sorted(set(y[train_idx].tolist())):
        members = train_idx[y[train_idx] == cls]
        members = members[rng.permutation(members.size)]
        if per_class is not None:
            if members.size < per_class:
                raise BudgetTooLargeError(
                    f"{unit} '{cls}' has {members.size} training images, fewer than per_class={per_class}; "
                    f"use a smaller count or a fraction"
                )
            m = per_class
        else:
            m = max(1, round(fraction * members.size))
            if round(fraction * members.size) == 0:
                raised.append(str(cls))
        chosen.append(members[:m])
    out = np.sort(np.concatenate(chosen))
    if raised:  # the budget actually used can be far above the fraction asked for: say so
        warnings.warn(f"label fraction {fraction} rounds to 0 images for {unit} {raised}, which get 1 each: "
                      f"{out.size} of {train_idx.size} training images are used ({out.size / train_idx.size:.0%})",
                      stacklevel=2)
    return out


# ------------------------------------------------------------------------------ near duplicates
def find_near_duplicates(
    query: Sequence[int],
    reference: Sequence[int],
    max_distance: int = DEFAULT_NEAR_THRESHOLD,
    *,
    query_fine: np.ndarray | None = None,
    reference_fine: np.ndarray | None = None,
    confirm_threshold: int = DEFAULT_CONFIRM_THRESHOLD,
) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)`` where the 64-bit perceptual hashes ``query[i]`` and
    ``reference[j]`` (``openmednet.data.dedupe.phash64``) differ by at most ``max_distance`` bits
    (0 = identical hash).

    The default threshold is the corpus builder's (``dedupe``'s docstring gives the distances
    measured on our data: copies 0-2 bits, unrelated images 14 or more). When the 256-bit hashes
    (``dedupe.phash256``, ``(N, 4)`` uint64) of both sides are given, candidates are confirmed with
    them as the corpus builder does: images of one standardised view (28 px chest X-rays of
    PneumoniaMNIST) often share their coarse 64-bit structure without being copies.
    """
    q = np.asarray(query, np.uint64)
    r = np.asarray(reference, np.uint64)
    pairs = near_pairs(q, max_distance, others=r)
    if query_fine is not None and reference_fine is not None:
        pairs = confirm_pairs(pairs, np.asarray(query_fine), confirm_threshold, fine_others=np.asarray(reference_fine))
    return [(int(i), int(j), int(d)) for (i, j), d in zip(pairs, hamming(q[pairs[:, 0]], r[pairs[:, 1]]))]


def find_label_conflicts(
    hashes: Sequence[int],
    labels: Sequence[Any],
    max_distance: int = 0,
    *,
    fine: np.ndarray | None = None,
    confirm_threshold: int = DEFAULT_CONFIRM_THRESHOLD,
    agree: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Clusters of (near-)identical images carrying different labels (e.g. BUSI's
    ``malignant (145)`` = ``benign (433)``): each cluster is a sorted list of indices.

    Clusters are connected components of the pairs within ``max_distance`` bits of the 64-bit
    hash (0: the same hash), confirmed by the 256-bit hashes ``fine`` (``(N, 4)``) when given.
    Their true label is unknown, so callers drop every member (with a warning).

    ``agree(i, j)`` compares two annotations where equal labels are not the test, e.g. masks
    (``SegmentationSet.same_annotation``: a segmentation set's ``labels`` are size strata, and
    two different masks of one image often share a stratum); a cluster conflicts when a member
    disagrees with its first one. Default: the labels are equal.
    """
    y = np.asarray([str(v) for v in labels], dtype=object)
    agree = agree or (lambda i, j: y[i] == y[j])
    pairs = near_pairs(np.asarray(hashes, np.uint64), max_distance)
    if fine is not None:
        pairs = confirm_pairs(pairs, np.asarray(fine), confirm_threshold)
    comp = components(len(y), pairs)
    clusters = []
    for c in np.unique(comp):
        members = np.flatnonzero(comp == c)
        if members.size > 1 and not all(agree(int(members[0]), int(j)) for j in members[1:]):
            clusters.append(members.tolist())
    return clusters
