"""Loss curve of a run, drawn from its ``metrics.jsonl`` (matplotlib, no display needed).

Drawn with ``matplotlib.figure.Figure`` on an Agg canvas, never through ``pyplot``: the caller's
backend and pyplot's figure registry are left alone.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

from openmednet.utils import atomic_write_bytes

__all__ = ["plot_loss_curve", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` file, in order.

    A line that is not a JSON object (typically the last one, half-written by a run killed in the
    middle of an append) is skipped with a warning.

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: is this a training run directory?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            warnings.warn(f"{path}, line {number}: not a complete JSON record (a run killed while writing it?); "
                          "skipped", stacklevel=2)
            continue
        records.append(record)
    return records


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Draw training loss against optimizer step, and k-NN accuracy when the run monitored it.

    Step records (``kind: "step"``) give the loss line; epoch records give markers at epoch ends and,
    on a second axis, ``knn/top1`` and ``knn/balanced_acc``. The PNG is written atomically.

    Args:
        metrics_path: the run's ``metrics.jsonl``.
        out_path: PNG to write (``run_dir/loss.png``).

    Returns:
        ``out_path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    steps = [r for r in records if r.get("kind") == "step" and "train/loss" in r]
    epochs = [r for r in records if r.get("kind") == "epoch" and "train/loss" in r]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)  # headless rendering, whatever the process' backend
    ax = fig.add_subplot()
    if steps:
        ax.plot([r["step"] for r in steps], [r["train/loss"] for r in steps], lw=1, label="train loss (steps)")
    if epochs:
        ax.plot([r["step"] for r in epochs], [r["train/loss"] for r in epochs], "o-", label="train loss (epoch mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    knn = [r for r in epochs if "knn/top1" in r]
    if knn:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in knn], [r["knn/top1"] for r in knn], "s--", color="tab:green", label="k-NN top-1")
        if "knn/balanced_acc" in knn[0]:
            ax2.plot([r["step"] for r in knn], [r["knn/balanced_acc"] for r in knn], "^--", color="tab:red",
                     label="k-NN balanced acc.")
        ax2.set_ylabel("k-NN accuracy (held-out)")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out_path = Path(out_path)
    atomic_write_bytes(out_path, buf.getvalue())
    return out_path
