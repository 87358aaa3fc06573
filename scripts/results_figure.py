"""Draw docs/figures/transfer_auroc.png: every target x budget of some studies, one row each, with
each init's test AUROC (mean over seeds as a dot, mean bootstrap 95% interval as a bar).

Usage::

    python scripts/results_figure.py runs/study_*/report.json --out docs/figures/transfer_auroc.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from results_table import init_role  # same directory

ORDER = ("MedNet pre-trained", "MedNet from scratch", "ImageNet Lite0", "Lite0 from scratch")


def _budget(row: dict) -> str:
    return "all labels" if row["budget"] == "frac1" else row["budget"].replace("shot", " per class")


def draw(reports: list[dict], out: Path, metric: str = "auroc_macro") -> Path:
    rows: dict[str, dict[str, dict]] = {}
    for report in reports:
        for s in report["summary"]:
            if s["strategy"] != "full":
                continue
            key = f"{s['target']}\n{_budget(s)} ({s['n_train']:.0f} images)"
            rows.setdefault(key, {})[init_role(s["init"])] = s[metric]
    inits = [i for i in ORDER if any(i in r for r in rows.values())]
    fig = Figure(figsize=(7.5, 0.55 * len(rows) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    offsets = {name: (j - (len(inits) - 1) / 2) * 0.18 for j, name in enumerate(inits)}
    labels = list(rows)
    for j, name in enumerate(inits):
        ys, xs, lo, hi = [], [], [], []
        for i, key in enumerate(labels):
            stat = rows[key].get(name)
            if stat is None:
                continue
            ys.append(len(labels) - 1 - i + offsets[name])
            xs.append(stat["mean"])
            lo.append(stat["mean"] - stat.get("ci_low", stat["mean"]))
            hi.append(stat.get("ci_high", stat["mean"]) - stat["mean"])
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2, color=f"C{j}", label=name)
    ax.set_yticks(range(len(labels)), labels[::-1], fontsize=7)
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("test AUROC (macro): mean of 3 seeds, bar = mean bootstrap 95% interval")
    ax.set_title("Full fine-tuning at 64 px (PneumoniaMNIST rows upsampled from 28 px)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/transfer_auroc.png"))
    args = parser.parse_args()
    print(draw([json.loads(p.read_text()) for p in args.reports], args.out))


if __name__ == "__main__":
    main()
