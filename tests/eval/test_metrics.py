"""Metrics against values computed by hand on tiny arrays, and bootstrap interval properties."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from openmednet.eval.metrics import (
    BOOTSTRAP_METRICS,
    bootstrap_ci,
    calibration_bins,
    classification_metrics,
    evaluate_predictions,
    expected_calibration_error,
)

# Binary: positives score 0.4 and 0.9, negatives 0.1 and 0.6 -> 3 of 4 pairs ordered: AUROC 0.75.
Y_BIN = np.array([0, 0, 1, 1])
P_BIN = np.stack([1 - np.array([0.1, 0.6, 0.4, 0.9]), np.array([0.1, 0.6, 0.4, 0.9])], axis=1)

# Three classes: predictions 0, 1, 2, 0 (the last one wrong).
Y_MC = np.array([0, 1, 2, 2])
P_MC = np.array([[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.2, 0.2, 0.6], [0.75, 0.1, 0.15]])


def test_binary_metrics_by_hand() -> None:
    m = classification_metrics(Y_BIN, P_BIN, ["neg", "pos"])
    assert m["auroc_macro"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["f1_macro"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1], [1, 1]]
    # Confidences 0.9 (both right) and 0.6 (both wrong): 0.5 * |1 - 0.9| + 0.5 * |0 - 0.6| = 0.35.
    assert m["ece"] == pytest.approx(0.35)
    assert m["per_class"]["pos"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "auroc": 0.75}
    )


def test_multiclass_metrics_by_hand() -> None:
    m = classification_metrics(Y_MC, P_MC)
    # One-vs-rest AUCs: class 0 2/3, class 1 1, class 2 3/4.
    assert [m["per_class"][c]["auroc"] for c in "012"] == pytest.approx([2 / 3, 1.0, 0.75])
    assert m["auroc_macro"] == pytest.approx(29 / 36)
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(Y_MC, P_MC, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]


def test_ece_bins_and_perfect_calibration() -> None:
    bins = calibration_bins(Y_BIN, P_BIN, n_bins=10)
    assert bins["count"][8] == 2 and bins["count"][5] == 2 and sum(bins["count"]) == 4
    # Confidence 1 and always right: calibrated.
    assert expected_calibration_error([0, 1], [[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(0.0)


def test_absent_class_warns_and_is_left_out() -> None:
    with pytest.warns(UserWarning, match="no example"):
        m = classification_metrics(np.array([0, 0, 1, 1]), np.c_[P_BIN, np.zeros(4)])
    assert np.isnan(m["per_class"]["2"]["auroc"])
    assert m["auroc_macro"] == pytest.approx(0.75)


@pytest.mark.parametrize(
    "y, p, match",
    [
        (Y_BIN, P_BIN[:, 1], "shape"),
        (Y_BIN[:3], P_BIN, "y_true must have shape"),
        (np.array([0, 0, 1, 2]), P_BIN, r"\[0, 2\)"),
        (Y_BIN.astype(float), P_BIN, "integer"),
    ],
)
def test_bad_inputs(y: np.ndarray, p: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, p)


def _random_predictions(n: int = 120, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]  # informative, not perfect
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_point_metrics_match_sklearn_on_random_data() -> None:
    y, p = _random_predictions()
    m = classification_metrics(y, p)
    assert m["f1_macro"] == pytest.approx(f1_score(y, p.argmax(1), average="macro"))
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))


def test_bootstrap_contains_point_and_is_deterministic() -> None:
    y, p = _random_predictions()
    point = classification_metrics(y, p)
    ci = bootstrap_ci(y, p, n_boot=200, seed=3)
    for name in ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "ece"):
        assert ci[name]["low"] <= point[name] <= ci[name]["high"], name
        assert ci[name]["low"] < ci[name]["high"], name
    assert bootstrap_ci(y, p, n_boot=200, seed=3) == ci
    assert bootstrap_ci(y, p, n_boot=200, seed=4)["auroc_macro"] != ci["auroc_macro"]


def test_evaluate_predictions_combines() -> None:
    y, p = _random_predictions(n=40)
    out = evaluate_predictions(y, p, ["a", "b", "c"], n_boot=20, seed=0)
    assert out["ci"]["_meta"] == {"n_boot": 20, "seed": 0, "confidence": 0.95, "method": "stratified percentile"}
    assert "ci" not in evaluate_predictions(y, p, n_boot=0)


@pytest.mark.parametrize("k", [2, 4])
def test_bootstrap_metric_functions_equal_sklearn_definitions(k: int) -> None:
    # The bootstrap uses NumPy re-implementations for speed; they must give the sklearn values,
    # ties in scores included (rounded probabilities create many).
    y, p = _random_predictions(n=90, k=k, seed=k)
    p = np.round(p, 1)
    point = classification_metrics(y, p)
    for name, fn in BOOTSTRAP_METRICS.items():
        assert fn(y, p) == pytest.approx(point[name], abs=1e-12), name


def test_singleton_groups_give_the_image_bootstrap_exactly() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    p = np.clip(y * 0.3 + rng.random(80) * 0.7, 0, 1)
    probs = np.stack([1 - p, p], axis=1)
    plain = bootstrap_ci(y, probs, n_boot=200, seed=3)
    assert bootstrap_ci(y, probs, n_boot=200, seed=3, groups=[""] * 80) == plain
    assert bootstrap_ci(y, probs, n_boot=200, seed=3, groups=[f"p{i}" for i in range(80)]) == plain


def test_patients_with_many_images_widen_the_interval() -> None:
    # 10 patients x 8 near-identical images: the image bootstrap believes in 80 independent cases,
    # the cluster bootstrap knows there are 10, so its AUROC interval must be wider.
    rng = np.random.default_rng(0)
    patient_y = np.array([0, 1] * 5)
    patient_score = np.clip(patient_y * 0.2 + rng.random(10) * 0.8, 0, 1)
    y = np.repeat(patient_y, 8)
    p = np.clip(np.repeat(patient_score, 8) + rng.normal(0, 0.01, 80), 0, 1)
    probs = np.stack([1 - p, p], axis=1)
    groups = np.repeat([f"patient{i}" for i in range(10)], 8)
    images = bootstrap_ci(y, probs, n_boot=300, seed=0, metrics=["auroc_macro"])
    patients = bootstrap_ci(y, probs, n_boot=300, seed=0, metrics=["auroc_macro"], groups=groups)
    width = lambda ci: ci["auroc_macro"]["high"] - ci["auroc_macro"]["low"]  # noqa: E731
    assert width(patients) > 1.5 * width(images)
    assert patients["_meta"]["method"] == "stratified cluster percentile (groups)"
    assert images["_meta"]["method"] == "stratified percentile"


def test_strata_of_one_patient_are_pooled_so_the_interval_is_not_zero_width():
    """Regression (hostile-user probe): with one patient per stratum every cluster resample was the
    test set itself (``dice_mean 0.034 [0.034, 0.034]``). Strata of one group are drawn together; a
    lone one joins the largest stratum; whole patients are still drawn, in the same total count."""
    from openmednet.eval.metrics import bootstrap_resamples

    y = np.array([0, 0, 0, 1, 1])  # patient a: stratum 0; patient b: stratum 1
    groups = ["a", "a", "a", "b", "b"]
    _, resamples = bootstrap_resamples(y, 200, seed=0, groups=groups)
    drawn = {tuple(sorted(r.tolist())) for r in resamples}
    assert drawn == {(0, 0, 1, 1, 2, 2), (0, 1, 2, 3, 4), (3, 3, 4, 4)}  # {a, a}, {a, b}, {b, b}: not just {a, b}

    y = np.array([0] * 6 + [1, 1])  # stratum 0: patients a, b, c; stratum 1: patient d alone
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    _, resamples = bootstrap_resamples(y, 300, seed=0, groups=groups)
    counts = [int(np.isin(r, [6, 7]).sum()) // 2 for r in resamples]  # times patient d was drawn
    assert set(counts) >= {0, 1, 2}  # d varies now; before, it was in every resample exactly once
    for r in bootstrap_resamples(y, 50, seed=1, groups=groups)[1]:
        ids = [groups[i] for i in r]
        assert all(ids.count(g) % 2 == 0 for g in set(ids)) and len(r) == 8  # whole patients, 4 drawn
