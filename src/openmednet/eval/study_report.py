"""The report of a transfer study: ``report.json``, ``report.md`` and plots from ``run_study``'s result.

One writer for the three kinds of study report: a full run's (``out/report.*``), a part's
(``num_parts > 1``: its own arms, in ``out/parts/part<k>-of-<K>/``, titled with the part) and the
merged report of ``report_only`` (every finished arm in ``out``, with the ``missing`` ones listed).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.eval import report
from openmednet.eval.segmentation import SEGMENTATION_HEADLINE
from openmednet.utils import atomic_write_text

__all__ = ["HEADLINE", "TASK_REPORTS", "slug", "summarize", "write_report"]

HEADLINE = ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "ece")
#: Per task: headline metrics, report columns (title, metric), validation score in history.json.
TASK_REPORTS = {
    "classification": (HEADLINE, (("AUROC (macro)", "auroc_macro"), ("balanced accuracy", "balanced_accuracy"), ("ECE", "ece")),
                       ("val_auroc", "macro AUROC")),
    "segmentation": (SEGMENTATION_HEADLINE, (("Dice (foreground)", "dice_mean"), ("IoU (foreground)", "iou_mean"),
                                             ("Dice per image", "dice_image_mean")), ("val_dice", "foreground Dice")),
}


def slug(text: str) -> str:
    """``text`` (a target or init name, maybe a path) as a file or folder name."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def summarize(arms: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per target x init x strategy x budget: mean and sample standard deviation over seeds of each
    headline metric, and the mean of the seeds' bootstrap interval bounds."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for a in arms:
        groups[(a["target"], a["init"], a["strategy"], a["budget"])].append(a)
    rows = []
    for (target, init, strategy, budget), members in groups.items():
        row = {"target": target, "init": init, "strategy": strategy, "budget": budget, "seeds": len(members),
               "n_train": float(np.mean([m["n_train"] for m in members]))}
        if all("n_val" in m for m in members):
            row["n_val"] = float(np.mean([m["n_val"] for m in members]))
        for name in [m for m in HEADLINE + SEGMENTATION_HEADLINE if m in members[0]]:
            values = np.array([m[name] for m in members], dtype=float)
            row[name] = {"mean": float(np.nanmean(values)),
                         "sd": float(np.nanstd(values, ddof=1)) if len(values) > 1 else float("nan")}
            cis = [m["ci"][name] for m in members if name in m.get("ci", {})]
            if cis:
                row[name]["ci_low"] = float(np.mean([c["low"] for c in cis]))
                row[name]["ci_high"] = float(np.mean([c["high"] for c in cis]))
        rows.append(row)
    return rows


def _fmt(stat: Mapping[str, float]) -> str:
    sd = "" if math.isnan(stat["sd"]) else f" ± {stat['sd']:.3f}"
    ci = f" [{stat['ci_low']:.3f}, {stat['ci_high']:.3f}]" if "ci_low" in stat else ""
    return f"{stat['mean']:.3f}{sd}{ci}"


def write_report(out: Path, result: dict[str, Any]) -> None:
    """Write ``report.json``, ``report.md`` and ``plots/`` of a study result (``run_study``) into ``out``."""
    atomic_write_text(out / "report.json", json.dumps(result, indent=1, allow_nan=True) + "\n")
    lines = ["# Transfer study report", ""]
    if part := result.get("part"):
        lines = [f"# Transfer study report: part {part['part']} of {part['num_parts']} (0-based)", "",
                 ("Only the arms of this part. Once every part has finished, `openmednet study --report-only` "
                  "reports them all in the study directory."), ""]
    lines += ["Test metrics: mean ± standard deviation over seeds, [mean of the seeds' bootstrap 95% intervals].",
              "Each arm's test split is the same for all inits and budgets of its target.", ""]
    _, columns, (score, score_label) = TASK_REPORTS[result["config"].get("task", "classification")]
    for target in dict.fromkeys(r["target"] for r in result["summary"]):
        rows = [r for r in result["summary"] if r["target"] == target]
        dropped = next(a["dropped"] for a in result["arms"] if a["target"] == target)
        left_out = (f"Left out of every arm: {dropped['label_conflicts']} images with conflicting labels, "
                    f"{dropped['near_copies_of_test']} training/validation near-copies of test images.")
        lines += [f"## {target}", "", left_out, "",
                  "| init | strategy | budget | train images | validation images | seeds | "
                  + " | ".join(title for title, _ in columns) + " |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['init']} | {r['strategy']} | {r['budget']} | {r['n_train']:.0f} | {r.get('n_val', float('nan')):.0f} | {r['seeds']} | "
                  + " | ".join(_fmt(r[m]) for _, m in columns) + " |" for r in rows]
        eff = report.plot_label_efficiency(rows, out / "plots" / f"label_efficiency_{slug(target)}.png",
                                           metric=columns[0][1], title=target)
        target_arms = [a for a in result["arms"] if a["target"] == target]
        largest = max(target_arms, key=lambda a: a["n_train"])["budget"]  # the curves of the most labels
        curves = report.plot_study_learning_curves(
            target_arms, out / "plots" / f"learning_curves_{slug(target)}.png", budget=largest, title=target,
            score=score, score_label=score_label)
        lines += ["", f"![label efficiency]({eff.relative_to(out)})", f"![learning curves]({curves.relative_to(out)})", ""]
    if result["refused"]:
        lines += ["## Refused arms", "", "| target | init | reason |", "|---|---|---|"]
        lines += [f"| {r['target']} | {r['init']} | {r['reason']} |" for r in result["refused"]]
        lines.append("")
    if result.get("failed"):
        lines += ["## Failed arms (not in the tables; a resume retries them)", "",
                  "| target | init | strategy | budget | seed | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {a['target']} | {a['init']} | {a['strategy']} | {a['budget']} | {a['seed']} | {a['error']} |"
                  for a in result["failed"]]
        lines.append("")
    if result.get("missing"):
        lines += ["## Missing arms (no metrics.json: not run yet, or failed; run their part or resume the study)", "",
                  "| target | init | strategy | budget | seed |", "|---|---|---|---|---|"]
        lines += [f"| {a['target']} | {a['init']} | {a['strategy']} | {a['budget']} | {a['seed']} |" for a in result["missing"]]
        lines.append("")
    if result.get("leakage_checks"):
        lines += ["## Pre-training leakage checks", "",
                  "Test images (or near-copies) found in the pre-training corpus of each medical init.", "",
                  "| target | init | corpus | test images | in corpus |", "|---|---|---|---|---|"]
        lines += [f"| {c['target']} | {c['init']} | `{Path(c['corpus']).name}` | {c['n_test']} | {c['n_leaked']} |"
                  for c in result["leakage_checks"]]
        lines.append("")
    lines += ["Per-arm confusion matrices, ROC curves and reliability diagrams: `runs/<target>/<init>/<strategy>/<budget>/seed<k>/plots/`.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
