"""Plots and Markdown helpers for fine-tuning runs and transfer studies.

Figures use Matplotlib's object-oriented API (``matplotlib.figure.Figure``, no ``pyplot`` global
state, no display backend) and are written atomically as PNG. Curves and matrices come from
scikit-learn's display helpers where one exists (``ConfusionMatrixDisplay``, ``RocCurveDisplay``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from openmednet.utils import atomic_write_bytes

__all__ = [
    "format_ci",
    "metrics_table_md",
    "plot_confusion_matrix",
    "plot_label_efficiency",
    "plot_learning_curves",
    "plot_reliability",
    "plot_roc",
    "plot_study_learning_curves",
    "save_figure",
]


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render ``fig`` to PNG and write it atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_learning_curves(history: Sequence[Mapping[str, Any]], path: str | Path, best_epoch: int | None = None,
                         score: str = "val_auroc", score_label: str = "macro AUROC", loss_label: str = "cross-entropy") -> Path:
    """Training/validation loss and the validation score per epoch.

    Args:
        history: one mapping per epoch with ``epoch``, ``train_loss``, ``val_loss`` and ``score``.
        path: PNG to write.
        best_epoch: marked with a vertical line (the checkpoint kept).
        score, score_label: the model-choice score's history key and axis name (segmentation:
            ``val_dice``, "foreground Dice").
        loss_label: what the loss is.
    """
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_auc = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel=loss_label, title="Loss")
    ax_loss.legend()
    ax_auc.plot(epochs, [h[score] for h in history], marker="o", color="C2")
    ax_auc.set(xlabel="epoch", ylabel=score_label, title=f"Validation {score_label}", ylim=(0, 1.02))
    if best_epoch is not None:
        for ax in (ax_loss, ax_auc):
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1)
    return save_figure(fig, path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: str | Path) -> Path:
    """Confusion matrix (rows: true class, columns: predicted), counts annotated."""
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(1.2 * len(label_names) + 2.5, 1.2 * len(label_names) + 2))
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(label_names)).plot(ax=ax, colorbar=False)
    ax.set_title("Test confusion matrix")
    return save_figure(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, label_names: Sequence[str], path: str | Path) -> Path:
    """One-vs-rest ROC curve of each class (one curve for a binary task), with its AUC."""
    from sklearn.metrics import RocCurveDisplay

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    classes = [1] if len(label_names) == 2 else range(len(label_names))
    for k in classes:
        positives = np.asarray(y_true) == k
        if positives.all() or not positives.any():
            continue  # no curve for a class absent from (or alone in) the test set
        RocCurveDisplay.from_predictions(positives, probs[:, k], name=str(label_names[k]), ax=ax)
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_title("Test ROC (one-vs-rest)")
    return save_figure(fig, path)


def plot_reliability(calibration: Mapping[str, Sequence[float]], path: str | Path, ece: float | None = None) -> Path:
    """Reliability diagram from ``metrics.calibration_bins`` output: accuracy vs confidence per bin."""
    edges = np.asarray(calibration["edges"])
    acc = np.asarray(calibration["accuracy"], dtype=float)
    count = np.asarray(calibration["count"], dtype=float)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    centers = (edges[:-1] + edges[1:]) / 2
    filled = count > 0
    ax.bar(centers[filled], acc[filled], width=np.diff(edges)[filled], edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfect calibration")
    title = "Reliability (top label)" + ("" if ece is None else f", ECE {ece:.3f}")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def format_ci(value: float, ci: Mapping[str, float] | None = None, digits: int = 3) -> str:
    """``"0.912 [0.871, 0.950]"``; ``"n/a"`` for NaN; no interval part when ``ci`` is missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci:
        text += f" [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"
    return text


def metrics_table_md(metrics: Mapping[str, Any], names: Sequence[str] = ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "ece")) -> str:
    """A two-column Markdown table of headline test metrics with their bootstrap intervals."""
    ci = metrics.get("ci", {})
    rows = ["| metric | value [95% CI] |", "|---|---|"]
    rows += [f"| {name} | {format_ci(metrics[name], ci.get(name))} |" for name in names if name in metrics]
    return "\n".join(rows) + "\n"


def plot_label_efficiency(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "auroc_macro", title: str = "") -> Path:
    """Test metric against the number of training images, one curve per init x strategy.

    Args:
        rows: ``study.summarize`` rows of one target (``init``, ``strategy``, ``n_train`` and
            ``{metric: {"mean", "sd", "ci_low", "ci_high"}}``).
        path: PNG to write.
        metric: headline metric to plot.
        title: figure title (the target's name).

    Error bars are the standard deviation over seeds; the shaded band is the mean of the seeds'
    bootstrap 95% intervals (the uncertainty from the finite test set).
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        curves.setdefault(f"{r['init']} / {r['strategy']}", []).append(r)
    for i, (name, members) in enumerate(sorted(curves.items())):
        members = sorted(members, key=lambda r: r["n_train"])
        x = np.array([r["n_train"] for r in members])
        stat = [r[metric] for r in members]
        mean = np.array([s["mean"] for s in stat])
        sd = np.nan_to_num(np.array([s["sd"] for s in stat]))
        ax.errorbar(x, mean, yerr=sd, marker="o", capsize=3, label=name, color=f"C{i}")
        if all("ci_low" in s for s in stat):
            ax.fill_between(x, [s["ci_low"] for s in stat], [s["ci_high"] for s in stat], alpha=0.15, color=f"C{i}")
    ax.set_xscale("log")
    ticks = sorted({float(r["n_train"]) for r in rows})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="training images (log scale)", ylabel=f"test {metric}", title=f"Label efficiency {title}".strip())
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_study_learning_curves(arms: Sequence[Mapping[str, Any]], path: str | Path, budget: str = "frac1", title: str = "",
                               score: str = "val_auroc", score_label: str = "macro AUROC") -> Path:
    """The validation score (``score``: AUROC, or ``val_dice`` for segmentation) per epoch of every
    arm at one label budget (default: all labels), read from each arm's ``history.json``; one
    colour per init x strategy, one line per seed."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    colours: dict[str, str] = {}
    for a in arms:
        history_path = Path(a["run_dir"]) / "history.json"
        if a["budget"] != budget or not history_path.is_file():
            continue
        history = json.loads(history_path.read_text())
        name = f"{a['init']} / {a['strategy']}"
        first = name not in colours
        colours.setdefault(name, f"C{len(colours)}")
        ax.plot([h["epoch"] for h in history], [h[score] for h in history], color=colours[name],
                alpha=0.8, label=name if first else None)
    ax.set(xlabel="epoch", ylabel=f"validation {score_label}", title=f"Learning curves ({budget}) {title}".strip())
    if colours:
        ax.legend(fontsize="small")
    return save_figure(fig, path)
