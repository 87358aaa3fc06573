"""A run directory's files: ``config.yaml`` first, the CSVs, ``history.json``, plots, ``metrics.json`` last.

``start_run`` and ``finish_run`` open and close every fine-tuning run, classification and
segmentation alike: ``metrics.json`` is the completion marker a study resumes by.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.config import save_config, to_dict
from openmednet.data.segmentation import MASKS_CSV
from openmednet.data.sources import LABELS_CSV
from openmednet.eval import report
from openmednet.eval.finetune._config import FinetuneResult
from openmednet.eval.finetune._resume import finished_metrics
from openmednet.eval.targets import TargetSet
from openmednet.utils import atomic_write_text, csv_text, seed_everything

__all__ = ["check_out_outside_data", "finish_run", "run_metrics", "start_run", "write_history"]

logger = logging.getLogger(__name__)


def start_run(cfg: Any) -> Path:
    """Seed everything with ``cfg.seed``, create ``cfg.out`` and write the resolved ``config.yaml``; returns ``cfg.out``.

    A finished run already in ``cfg.out`` (its ``metrics.json``) is refused unless it is this run
    (``_resume.finished_metrics``; ``rounds`` may grow, so a longer pseudo-labelling run continues a
    shorter one): another configuration would overwrite its files one by one and, should this run
    fail, leave a folder mixing two runs. The same run is redone: its ``metrics.json`` goes first
    (warned), so the folder reads as unfinished until this run finishes.

    Raises:
        ValueError: ``cfg.out`` holds a finished run of another configuration (the fields named),
            or lies inside the ``cfg.data`` folder (``check_out_outside_data``).
    """
    check_out_outside_data(cfg.out, cfg.data)
    if finished_metrics(cfg, ignore=("rounds",), fix="nothing was overwritten. Give a new --out, or delete that "
                                                     "folder to replace it") is not None:
        logger.warning("%s holds a finished run of this configuration: it is redone (its metrics.json is "
                       "removed now, written again when this run finishes)", cfg.out)
        (cfg.out / "metrics.json").unlink()
    seed_everything(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out / "config.yaml")
    return cfg.out


def check_out_outside_data(out: Path, data: Path, what: str = "--out") -> None:
    """Refuse a run (or study) folder that is the target folder or lies inside it, where the target
    is read by listing its folder: the run's PNGs (plots, masks, overlays) became images of the
    target, so the next run on a class-folder target had a class named after the run folder (found
    by the hostile-user probe). A target with a manifest (``labels.csv``, ``masks.csv``) reads only
    the files it lists, so runs kept inside it (``project/runs/...``) are allowed.

    Raises:
        ValueError: naming both folders and the fix.
    """
    dst, root = Path(out).resolve(), Path(data).resolve()
    if any((root / manifest).is_file() for manifest in (LABELS_CSV, MASKS_CSV)):
        return
    if root.is_dir() and (dst == root or root in dst.parents):
        raise ValueError(f"{what} {out} is {'inside ' if dst != root else ''}the target folder {data}: the run's "
                         f"images (plots, masks) would become images of the target; give a folder outside it")


def write_history(out: Path, history: list[dict[str, Any]]) -> None:
    """``history.json``: one record per epoch (train loss, validation scores, learning rate)."""
    atomic_write_text(out / "history.json", json.dumps(history, indent=1) + "\n")


def run_metrics(cfg: Any, target: Any, *, test: dict[str, Any], val_score: tuple[str, str], history: list[dict[str, Any]],
                best_epoch: int, names: dict[str, list[str]], counts: dict[str, Any], dropped: dict[str, list[str]],
                pretraining: dict[str, Any] | None, model: dict[str, Any]) -> dict[str, Any]:
    """The content of ``metrics.json`` every fine-tuning run writes (``eval.study`` reads its rows from it).

    Args:
        cfg, target: the run's configuration and its (cleaned) target.
        test: the test metrics.
        val_score: ``(name in metrics.json, history key)`` of the model-choice score, e.g.
            ``("auroc_macro", "val_auroc")``; its value and the loss are taken at ``best_epoch``.
        history, best_epoch: ``_train``'s history and chosen epoch.
        names: the target's class names under their keys (``label_names``, ``class_names``).
        counts, dropped, pretraining: per-split counts, the ids left out by the checks, and the
            pre-training leakage report (``None`` without a corpus fingerprint).
        model: what the run recorded about its model (init, strategy, precision...).
    """
    best = next(h for h in history if h["epoch"] == best_epoch)
    return {
        "test": test,
        "val": {val_score[0]: best[val_score[1]], "loss": best["val_loss"]},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "test_leaked_in_pretraining": bool(pretraining and pretraining["test_ids_in_corpus"]),
        "data": {
            "root": str(cfg.data), "n_images": len(target), "channels": target.channels, **names, "counts": counts,
            "dropped": dropped, "skipped": target.skipped, "pretraining_leakage": pretraining,
        },
        "model": model,
        "config": to_dict(cfg),
    }


def finish_run(out: Path, metrics: dict[str, Any]) -> FinetuneResult:
    """Write ``metrics.json`` and return the run's result.

    ``metrics.json`` is the completion marker a study resumes by (``eval.study``): call this last,
    after the model is saved, so a run killed earlier is run again rather than reused half-written.
    """
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=True) + "\n")
    return FinetuneResult(out=out, metrics=metrics)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    atomic_write_text(path, csv_text(header, rows)[0])


def _write_splits(out: Path, target: TargetSet, splits: np.ndarray, used: np.ndarray) -> None:
    used_set = set(used.tolist())
    rows = [[target.ids[i], target.labels[i], target.groups[i] or "", splits[i], int(i in used_set),
             f"{int(target.hashes[i]):016x}"] for i in range(len(target))]
    _write_csv(out / "splits.csv", ["id", "label", "group", "split", "used_for_training", "phash"], rows)


def _write_predictions(out: Path, ids: list[str], target: TargetSet, y: np.ndarray, probs: np.ndarray) -> None:
    # repr() of a float is its shortest round-trip form: the CSV reproduces the probabilities exactly.
    rows = [[ids[i], target.label_names[y[i]], int(y[i])] + [repr(float(p)) for p in probs[i]] for i in range(len(y))]
    _write_csv(out / "predictions.csv", ["id", "label", "y"] + [f"prob_{n}" for n in target.label_names], rows)


def _plots(out: Path, history: list[dict], best_epoch: int, test: dict, y: np.ndarray, probs: np.ndarray, names) -> None:
    plots = out / "plots"
    report.plot_learning_curves(history, plots / "learning_curves.png", best_epoch)
    report.plot_confusion_matrix(test["confusion_matrix"], names, plots / "confusion_matrix.png")
    report.plot_roc(y, probs, names, plots / "roc.png")
    report.plot_reliability(test["calibration"], plots / "reliability.png", test["ece"])


def _counts(target: TargetSet, splits: np.ndarray, used: np.ndarray) -> dict[str, dict[str, int]]:
    out = {s: dict(Counter(target.labels[splits == s].tolist())) for s in ("train", "val", "test")}
    out["train_used"] = dict(Counter(target.labels[used].tolist()))
    return out

