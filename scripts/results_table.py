"""Print the markdown tables of docs/results.md from study reports, so no number is typed by hand.

Each cell is ``mean ± sd over seeds [mean bootstrap 95% interval]`` of one target x init x
strategy x budget summary of ``report.json`` (written by ``openmednet study``); the best mean of a
row is in bold.

Usage::

    python scripts/results_table.py runs/study_pneumoniamnist64/report.json             # inits as columns
    python scripts/results_table.py runs/study_strategies64/report.json --columns strategy
    python scripts/results_table.py runs/semi_gray64/report.json runs/semi_gray64_samesteps/report.json \
        --columns strategy --study-label semi_gray64_samesteps="lambda_u 0"
    python scripts/results_table.py runs/study_*/report.json --metric balanced_accuracy --no-ci
    python scripts/results_table.py runs/survey/*/report.json --columns study          # one column per study
    python scripts/results_table.py runs/probe_v2_gray_*/report.json --mean-row \
        --label runs/pt_gray128_v2/backbone="MedNet v2" --label mednet_gray.sup_cpu64_v1="MedNet v1"
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from openmednet.eval.segmentation import SEGMENTATION_HEADLINE

#: Classification's headline metrics, then segmentation's (a segmentation study: --metric dice_mean).
METRICS = ("auroc_macro", "balanced_accuracy", "accuracy", "f1_macro", "ece", *SEGMENTATION_HEADLINE)


#: ``--label INIT=NAME`` column names, which win over ``init_role``'s defaults.
LABELS: dict[str, str] = {}
#: ``--study-label OUT=NAME``: with strategies as columns, the arms of the study whose ``out`` folder
#: is named OUT get a column of their own, ``"<strategy> (NAME)"`` (e.g. a control run of the same
#: strategy with one setting changed, in its own folder).
STUDY_LABELS: dict[str, str] = {}


def init_role(init: str) -> str:
    """A column name that is the same for the gray and colour studies (``auto`` -> "MedNet pre-trained")."""
    if init in LABELS:
        return LABELS[init]
    if init == "auto" or init.startswith("mednet_"):
        return "MedNet pre-trained"
    if init.startswith("scratch:mednet_"):
        return "MedNet from scratch"
    if init == "efficientnet_lite0":
        return "ImageNet Lite0"
    if init == "scratch:efficientnet_lite0":
        return "Lite0 from scratch"
    return init


def _budget_label(budget: str, n_train: float) -> str:
    if budget == "frac1":
        return f"all ({n_train:.0f})"
    if budget.endswith("shot"):
        return f"{budget[:-4]} per class ({n_train:.0f})"
    return f"{budget} ({n_train:.0f})"


def _cell(stats: dict, ci: bool) -> str:
    # one seed has no spread (sd is NaN): the mean alone
    text = f"{stats['mean']:.3f}" + ("" if math.isnan(stats["sd"]) else f" ± {stats['sd']:.3f}")
    return text + (f" [{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]" if ci else "")


def _mean_row(rows: dict[tuple[str, str], dict[str, dict]], headers: list[str], metric: str, init: str = "") -> str:
    """Mean over rows (target x budget) of each column's mean, over the rows that have every
    column (a column missing in a row would make the means incomparable); ``init``: only the rows
    of that init (rows target x budget x init), named in the row."""
    full = [cells for (_, budget), cells in rows.items()
            if all(h in cells for h in headers) and (not init or budget.endswith(f", {init}"))]
    means = [sum(c[h][metric]["mean"] for c in full) / len(full) for h in headers] if full else []
    best = (min if metric == "ece" else max)(round(m, 3) for m in means) if means else None
    text = [f"**{m:.3f}**" if round(m, 3) == best else f"{m:.3f}" for m in means]
    return f"| mean of {len(full)} rows |{' ' + init if init else ''} | {' | '.join(text)} |"


def table(reports: list[dict], metric: str, columns: str, ci: bool, mean_row: bool = False) -> str:
    """One markdown table: rows target x budget, one column per ``columns`` value (init or strategy;
    with strategies as columns and several inits, rows target x budget x init); or, for
    ``columns="study"``, rows target x init and one column per report.

    Raises:
        ValueError: two summaries fall in one cell (a setting the table does not show differs), or
            a summary without ``metric``.
    """
    if not any(report["summary"] for report in reports):  # the table was a header over nothing
        missing = sum(len(report.get("missing", [])) for report in reports)
        raise ValueError("no finished arm in these reports" + (f" ({missing} missing: run the studies, or "
                                                                 f"--report-only once their parts finish)" if missing else ""))
    rows: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
    n_test: dict[str, int] = {}
    headers: list[str] = []
    # With strategies as columns, several inits get a row each (target x budget x init).
    several_inits = len({s["init"] for report in reports for s in report["summary"]}) > 1
    for report in reports:
        for arm in report["arms"]:
            n_test[arm["target"]] = arm["n_test"]
        for s in report["summary"]:
            if metric not in s:  # a segmentation study (Dice/IoU), or an older report: a KeyError traceback
                has = [k for k in s if isinstance(s[k], dict) and "mean" in s[k]]
                raise ValueError(f"the study {report['config']['out']} has no {metric} (its metrics: {', '.join(has)}): "
                                 f"give --metric {has[0] if has else 'auroc_macro'}")
            if columns == "study":  # one column per study (e.g. one per learning rate), rows target x init
                key, row = Path(report["config"]["out"]).name, (s["target"], init_role(s["init"]))
            else:
                key = init_role(s["init"]) if columns == "init" else s[columns]
                tag = STUDY_LABELS.get(Path(report["config"]["out"]).name)
                key = f"{key} ({tag})" if tag and columns == "strategy" else key
                budget = _budget_label(s["budget"], s["n_train"])
                row = (s["target"], f"{budget}, {init_role(s['init'])}" if columns == "strategy" and several_inits else budget)
            if key not in headers:
                headers.append(key)
            if key in rows[row]:  # two summaries for one cell: printing either would hide the other
                raise ValueError(f"two results for the cell ({', '.join(row)}; {key}): the reports differ in a "
                                 f"setting the table does not show (e.g. strategy with --columns init); pass "
                                 f"fewer reports or choose --columns")
            rows[row][key] = s
    lower_is_better = metric == "ece"
    second = "init" if columns == "study" else "training images"
    lines = [f"| target (test images) | {second} | {' | '.join(headers)} |",
             "|" + "---|" * (len(headers) + 2)]
    for (target, budget), cells in rows.items():
        # Compare at the printed precision, so ties (two 1.000) are all bold.
        means = {k: round(c[metric]["mean"], 3) for k, c in cells.items()}
        best_value = (min if lower_is_better else max)(means.values())
        out = []
        for h in headers:
            if h not in cells:
                out.append("–")  # not in these studies (refused arms are listed below the table)
                continue
            text = _cell(cells[h][metric], ci)
            out.append(f"**{text}**" if means[h] == best_value and len(cells) > 1 else text)
        lines.append(f"| {target} ({n_test[target]}) | {budget} | {' | '.join(out)} |")
    if mean_row:
        inits = list(dict.fromkeys(init_role(s["init"]) for report in reports for s in report["summary"]))
        for init in inits if columns == "strategy" and several_inits else [""]:
            lines.append(_mean_row(rows, headers, metric, init))
    refused = [r for report in reports for r in report.get("refused", [])]
    for r in refused:
        lines.append(f"\nRefused: {r}")
    return "\n".join(lines)


def load_report(path: Path) -> dict:
    """A study's ``report.json``.

    Raises:
        ValueError: the file is missing, not JSON, or not a study report (no ``arms``, ``summary``
            or ``config``), named with the file; they were tracebacks.
    """
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as a report.json ({e})") from None
    missing = [k for k in ("arms", "summary", "config") if not isinstance(report, dict) or k not in report]
    if missing:
        raise ValueError(f"{path}: not a report.json of openmednet study (no {', '.join(missing)})")
    return report


def check_study_labels(reports: list[dict], columns: str) -> None:
    """``--study-label`` must name the folder of a given report, and columns must be strategies:
    otherwise it was ignored without a word (a typo left the control's arms in the plain columns,
    or refused as two results for one cell).

    Raises:
        ValueError: naming the labels that match nothing and the reports' folders.
    """
    if STUDY_LABELS and columns != "strategy":
        raise ValueError(f"--study-label gives a study's strategies their own columns: add --columns strategy "
                         f"(got --columns {columns})")
    names = {Path(r["config"]["out"]).name for r in reports}
    unknown = sorted(set(STUDY_LABELS) - names)
    if unknown:
        raise ValueError(f"--study-label {', '.join(unknown)} names no given report's study folder (theirs: "
                         f"{', '.join(sorted(names))})")


def _label(text: str) -> tuple[str, str]:
    init, sep, name = text.partition("=")
    if not sep or not init or not name:
        raise argparse.ArgumentTypeError(f"expected KEY=NAME, got {text!r}")
    return init, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json files of openmednet study")
    parser.add_argument("--metric", default="auroc_macro", choices=METRICS)
    parser.add_argument("--columns", default="init", choices=("init", "strategy", "study"),
                        help="what the columns are; 'study': one per report (rows target x init)")
    parser.add_argument("--no-ci", dest="ci", action="store_false", help="leave out the bootstrap intervals")
    parser.add_argument("--mean-row", action="store_true", help="add the mean over rows of each column")
    parser.add_argument("--label", action="append", default=[], type=_label, metavar="INIT=NAME",
                        help="column name of an init")
    parser.add_argument("--study-label", action="append", default=[], type=_label, metavar="OUT=NAME",
                        help="with --columns strategy: the study in folder OUT gets its own columns, '<strategy> (NAME)'")
    args = parser.parse_args()
    LABELS.update(args.label)
    STUDY_LABELS.update(args.study_label)
    try:
        reports = [load_report(p) for p in args.reports]
        check_study_labels(reports, args.columns)
        print(table(reports, args.metric, args.columns, args.ci, args.mean_row))
    except ValueError as e:  # one line and exit 2, as the openmednet command does
        parser.error(str(e))


if __name__ == "__main__":
    main()
