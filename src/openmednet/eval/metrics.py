"""Classification metrics for transfer evaluation, with stratified bootstrap confidence intervals.

Everything takes integer labels ``y_true`` of shape ``(N,)`` in ``[0, K)`` and class probabilities
``probs`` of shape ``(N, K)`` (softmax outputs, rows summing to 1; ``K >= 2``, binary tasks included)
and returns plain ``dict``/``float``/``list`` values ready for ``json.dump``.

Definitions (all from scikit-learn, except the calibration error, which it does not provide):

- ``auroc_macro``: mean over classes of the one-vs-rest ROC AUC of ``probs[:, k]``. For ``K = 2`` both
  classes give the same AUC, so this is the usual binary AUROC. Classes absent from ``y_true`` have no
  AUC; they are skipped with a warning (the macro mean is over the classes present).
- ``balanced_accuracy``: mean per-class recall; ``accuracy``; ``f1_macro``: unweighted mean F1.
- ``ece``: top-label expected calibration error (Guo et al., 2017, "On Calibration of Modern Neural
  Networks"): equal-width confidence bins over ``[0, 1]``, ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``.
- Intervals: percentile bootstrap, resampling *within each class* (stratified) so that every
  resample keeps the class counts and every metric stays defined; a fixed ``seed`` makes them
  reproducible.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

__all__ = [
    "BOOTSTRAP_METRICS",
    "bootstrap_ci",
    "bootstrap_resamples",
    "calibration_bins",
    "classification_metrics",
    "evaluate_predictions",
    "expected_calibration_error",
    "per_class_auroc",
]


def _check_inputs(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``(N,)`` labels and ``(N, K)`` probabilities to NumPy arrays."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(
            f"probs must have shape (N, K) with K >= 2 classes, got {p.shape}: for a binary task pass "
            f"both columns, e.g. np.stack([1 - p, p], axis=1)"
        )
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true must have shape (N,) = ({p.shape[0]},), got {y.shape}")
    if y.size == 0:
        raise ValueError("no predictions to evaluate (N = 0)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true values must lie in [0, {p.shape[1]}), got [{y.min()}, {y.max()}]")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    return y.astype(np.int64), p


def per_class_auroc(y_true: Any, probs: Any) -> list[float]:
    """One-vs-rest ROC AUC of each class: ``K`` floats, ``nan`` for classes absent from ``y_true``.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, K)``.
        probs: ``(N, K)`` class probabilities (or any per-class scores).
    """
    y, p = _check_inputs(y_true, probs)
    out = []
    for k in range(p.shape[1]):
        positives = y == k
        if positives.all() or not positives.any():
            out.append(float("nan"))
        else:
            out.append(float(roc_auc_score(positives, p[:, k])))
    return out


def _auroc_macro(y: np.ndarray, p: np.ndarray) -> float:
    aucs = [a for a in per_class_auroc(y, p) if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def calibration_bins(y_true: Any, probs: Any, n_bins: int = 10) -> dict[str, list[float]]:
    """Top-label reliability bins: for each equal-width confidence bin, count, accuracy, confidence.

    Bin ``b`` holds confidences in ``(b/n_bins, (b+1)/n_bins]`` (the first bin also holds 0).

    Returns:
        ``{"edges": n_bins + 1 floats, "count": ..., "accuracy": ..., "confidence": ...}`` with
        ``nan`` accuracy/confidence for empty bins (the data of a reliability diagram).
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _check_inputs(y_true, probs)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "accuracy": acc.tolist(),
        "confidence": mean_conf.tolist(),
    }


def expected_calibration_error(y_true: Any, probs: Any, n_bins: int = 10) -> float:
    """Top-label ECE in ``[0, 1]`` over ``n_bins`` equal-width bins (see module docstring)."""
    bins = calibration_bins(y_true, probs, n_bins)
    count = np.asarray(bins["count"])
    gap = np.abs(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"]))
    filled = count > 0
    return float((count[filled] * gap[filled]).sum() / count.sum())


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _fast_auroc_macro(y: np.ndarray, p: np.ndarray) -> float:
    """Macro one-vs-rest AUROC via the Mann-Whitney U statistic (average ranks for ties), the same
    value as ``roc_auc_score`` without its per-call validation: bootstraps call this 1000s of times."""
    aucs = []
    for c in range(p.shape[1]):
        pos = y == c
        n_pos = int(pos.sum())
        n_neg = y.size - n_pos
        if n_pos and n_neg:
            ranks = rankdata(p[:, c])
            aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")


def _fast_counts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cm = _confusion(y, p.argmax(1), p.shape[1])
    return np.diag(cm).astype(np.float64), cm


def _fast_balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    # Mean recall over the classes present in y, as sklearn's balanced_accuracy_score.
    tp, cm = _fast_counts(y, p)
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(tp[present] / support[present]))


def _fast_f1_macro(y: np.ndarray, p: np.ndarray) -> float:
    # F1 = 2 TP / (2 TP + FP + FN), 0 when undefined (sklearn's zero_division=0), mean over all K.
    tp, cm = _fast_counts(y, p)
    denom = cm.sum(0) + cm.sum(1)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)))


#: Metrics that get bootstrap intervals: name -> fn(y (N,), probs (N, K)) -> float. NumPy
#: re-implementations of the scikit-learn definitions (tests check they agree), for speed.
BOOTSTRAP_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc_macro": _fast_auroc_macro,
    "balanced_accuracy": _fast_balanced_accuracy,
    "accuracy": lambda y, p: float(np.mean(p.argmax(1) == y)),
    "f1_macro": _fast_f1_macro,
    "ece": expected_calibration_error,
}


def classification_metrics(
    y_true: Any, probs: Any, label_names: Sequence[str] | None = None, n_bins: int = 10
) -> dict[str, Any]:
    """Point estimates of all metrics, per-class metrics and the confusion matrix.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, K)``.
        probs: ``(N, K)`` class probabilities.
        label_names: ``K`` class names (default ``"0"``, ``"1"``...).
        n_bins: calibration bins.

    Returns:
        ``{"n", "auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "ece", "per_class":
        {name: {"precision", "recall", "f1", "support", "auroc"}}, "confusion_matrix": K x K list
        (rows = true class, columns = predicted), "label_names", "calibration"}``.
    """
    y, p = _check_inputs(y_true, probs)
    k = p.shape[1]
    names = [str(i) for i in range(k)] if label_names is None else [str(n) for n in label_names]
    if len(names) != k:
        raise ValueError(f"label_names has {len(names)} names but probs has {k} columns")
    absent = [names[i] for i in range(k) if not (y == i).any()]
    if absent:
        warnings.warn(
            f"classes {absent} have no example in y_true: their AUROC is undefined and left out of "
            f"auroc_macro, and balanced accuracy averages over the present classes only",
            stacklevel=2,
        )
    pred = p.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=np.arange(k), zero_division=0
    )
    aucs = per_class_auroc(y, p)
    out: dict[str, Any] = {"n": int(y.size)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # absent classes: warned above
        out["auroc_macro"] = _auroc_macro(y, p)
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
    out["accuracy"] = float(accuracy_score(y, pred))
    out["f1_macro"] = float(f1_score(y, pred, labels=np.arange(k), average="macro", zero_division=0))
    out["ece"] = expected_calibration_error(y, p, n_bins)
    out["per_class"] = {
        names[i]: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "auroc": aucs[i],
        }
        for i in range(k)
    }
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=np.arange(k)).tolist()
    out["label_names"] = names
    out["calibration"] = calibration_bins(y, p, n_bins)
    return out


def bootstrap_ci(
    y_true: Any,
    probs: Any,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    metrics: Sequence[str] | None = None,
    groups: Sequence[Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Stratified percentile-bootstrap confidence intervals.

    Each resample draws, for every class, as many indices as that class has, with replacement from
    that class's examples; metrics are recomputed on the resample and the ``(1 - confidence) / 2``
    and ``(1 + confidence) / 2`` quantiles of the ``n_boot`` values form the interval.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, K)``.
        probs: ``(N, K)`` class probabilities.
        n_boot: number of resamples.
        seed: seed of the NumPy generator (same seed, same intervals).
        confidence: interval coverage, e.g. 0.95.
        metrics: names from ``BOOTSTRAP_METRICS`` (default: all).
        groups: ``(N,)`` patient/lesion ids (``None``/empty = the image alone). When some group
            holds several test images, whole groups are resampled instead (a cluster bootstrap,
            stratified by each group's most frequent class): images of one patient are not
            independent, and resampling them one by one gives intervals that are too narrow.

    Returns:
        ``{metric: {"low": float, "high": float}}`` plus ``"_meta": {"n_boot", "seed",
        "confidence", "method"}``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    y, p = _check_inputs(y_true, probs)
    names = list(BOOTSTRAP_METRICS) if metrics is None else list(metrics)
    for name in names:
        if name not in BOOTSTRAP_METRICS:
            raise KeyError(f"unknown bootstrap metric '{name}' (valid: {', '.join(BOOTSTRAP_METRICS)})")
    method, resamples = bootstrap_resamples(y, n_boot, seed, groups)
    values = np.empty((n_boot, len(names)))
    for b, idx in enumerate(resamples):
        values[b] = [BOOTSTRAP_METRICS[name](y[idx], p[idx]) for name in names]
    lo, hi = np.nanquantile(values, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    out: dict[str, Any] = {name: {"low": float(lo[i]), "high": float(hi[i])} for i, name in enumerate(names)}
    out["_meta"] = {"n_boot": n_boot, "seed": seed, "confidence": confidence, "method": method}
    return out


def bootstrap_resamples(
    strata: Any, n_boot: int, seed: int = 0, groups: Sequence[Any] | None = None
) -> tuple[str, Iterator[np.ndarray]]:
    """The resampled index sets of ``bootstrap_ci``, for any per-item statistic.

    Each of the ``n_boot`` resamples draws, within each stratum, as many items as it holds, with
    replacement; when some group holds several items, whole groups are drawn instead (stratified
    by each group's most frequent stratum; strata of a single group are drawn from together,
    ``_pool_single_group_strata``). Segmentation (``openmednet.eval.segmentation``)
    recomputes its Dice/IoU from per-image pixel counts over the same resamples.

    Args:
        strata: ``(N,)`` integer strata (class labels for classification).
        n_boot: number of resamples.
        seed: seed of the NumPy generator (same seed, same resamples).
        groups: ``(N,)`` patient ids (``None``/empty = the item alone).

    Returns:
        ``(method, iterator of index arrays)``; ``method`` names the scheme for the report.
    """
    y = np.asarray(strata)
    rng = np.random.default_rng(seed)
    clusters = _clusters(groups, y)

    def draw() -> Iterator[np.ndarray]:
        if clusters is None:
            by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
            for _ in range(n_boot):
                yield np.concatenate([rng.choice(members, size=members.size, replace=True) for members in by_class])
        else:
            members, groups_by_stratum = clusters
            for _ in range(n_boot):
                chosen = np.concatenate([rng.choice(s, size=s.size, replace=True) for s in groups_by_stratum])
                yield np.concatenate([members[g] for g in chosen])

    method = "stratified percentile" if clusters is None else "stratified cluster percentile (groups)"
    return method, draw()


def _clusters(groups: Sequence[Any] | None, y: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """``(members of each group, group ids per stratum)``, or ``None`` when every image is its own group."""
    if groups is None:
        return None
    if len(groups) != len(y):
        raise ValueError(f"got {len(groups)} groups for {len(y)} labels")
    # An empty id means "this image alone".
    keys = [f"\0image{i}" if g is None or str(g) == "" or (isinstance(g, float) and np.isnan(g)) else str(g)
            for i, g in enumerate(groups)]
    names, inverse = np.unique(keys, return_inverse=True)
    if len(names) == len(keys):
        return None  # all singletons: the image bootstrap, with the same draws as without groups
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    majority = np.array([np.bincount(y[m]).argmax() for m in members])
    strata = [np.flatnonzero(majority == c) for c in np.unique(majority)]
    return members, _pool_single_group_strata(strata)


def _pool_single_group_strata(strata: list[np.ndarray]) -> list[np.ndarray]:
    """Strata of one group pooled, so every stratum the resamples draw from varies.

    A stratum holding one group is drawn as that group in every resample: with one patient per
    stratum every resample was the test set itself, and the interval had zero width (a hostile-user
    probe: ``dice_mean 0.034 [0.034, 0.034]`` over two patients whose Dice differ 4-fold). Such
    strata are drawn from together; a pool still of one group joins the largest stratum. With a
    single group in all, no resample differs (an interval needs two patients).
    """
    single = [s for s in strata if s.size < 2]
    if not single:
        return strata
    rest = [s for s in strata if s.size >= 2]
    pool = np.concatenate(single)
    if pool.size >= 2 or not rest:
        return [*rest, pool]
    largest = int(np.argmax([s.size for s in rest]))
    return [np.concatenate([s, pool]) if k == largest else s for k, s in enumerate(rest)]


def evaluate_predictions(
    y_true: Any,
    probs: Any,
    label_names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    groups: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """``classification_metrics`` plus ``"ci"`` from ``bootstrap_ci`` (``n_boot=0`` skips intervals;
    ``groups`` resamples patients instead of images where they hold several images)."""
    out = classification_metrics(y_true, probs, label_names)
    if n_boot > 0:
        out["ci"] = bootstrap_ci(y_true, probs, n_boot=n_boot, seed=seed, confidence=confidence, groups=groups)
    return out
