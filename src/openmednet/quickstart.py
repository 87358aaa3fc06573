"""``openmednet quickstart``: the README's main job, on a fresh machine, in a few minutes on a CPU.

It fine-tunes three inits on the embedded demo sample (``assets/demo/pneumoniamnist_demo.npz``: 700
PneumoniaMNIST chest X-rays, CC BY 4.0, see its ``ATTRIBUTION.md``) and compares them on the
sample's untouched test split::

    mednet_gray.<tag>            the shipped Gray-MedNet weights (pre-trained on medical images)
    scratch:mednet_gray.<tag>    the same architecture and width, random weights
    efficientnet_lite0           ImageNet weights (shipped in a pip package: works offline)

with full fine-tuning, every training image (300) and 10 per class, 3 seeds, 64 px, training in
``precision="auto"`` (bf16 + channels_last where the CPU or GPU runs bf16 natively, else fp32).
Everything is one ``run_study`` (same splits, same training loop, bootstrap intervals): the study
directory holds ``report.md`` / ``report.json``, plots and every arm's run directory. ``jobs=N``
(``--jobs N``) trains N arms at once, as ``openmednet study --jobs N`` does (``openmednet.engine.jobs``).

Leakage is checked, not assumed: the demo's test images are compared with the fingerprint of the
shipped weights' pre-training corpus (``<weights>.corpus.npz``); a hit refuses the MedNet arm and
the refusal is part of the returned report (and printed by the CLI). Nothing outside the installed
package is read, so it runs without ``../shared/data`` and without internet.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from openmednet.engine.jobs import threads_per_job
from openmednet.eval.study import StudyConfig, run_study
from openmednet.models import InitSpec, get_pretrained_cfg
from openmednet.utils import atomic_write_text

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_PER_CLASS", "DEMO_NAME", "demo_path", "quickstart_config", "run_quickstart", "shipped_gray_weights"]

logger = logging.getLogger(__name__)

DEMO_NAME = "pneumoniamnist_demo"
#: Fine-tuning epochs per arm: measured to keep the whole command under 10 minutes on 2 CPU cores
#: (docs/benchmarks.md, "Quick start").
DEFAULT_EPOCHS = 10
#: Few-shot budget besides the full train split: 10 images per class.
DEFAULT_PER_CLASS = (10,)
DEFAULT_BATCH_SIZE = 32
IMAGE_SIZE = 64
#: Bootstrap resamples of each arm's test interval (300 test images: intervals stable to ~0.005).
N_BOOT = 500
IMAGENET_INIT = "efficientnet_lite0"
#: Readable names of the inits in the comparison table.
INIT_LABELS = {"pretrained": "Gray-MedNet, pre-trained ({tag})", "scratch": "Gray-MedNet, from scratch",
               "imagenet": "EfficientNet-Lite0, ImageNet"}


def demo_path() -> Path:
    """The embedded demo sample (MedMNIST ``.npz`` layout, labels 0 normal / 1 pneumonia).

    Raises:
        FileNotFoundError: the package was installed without its assets.
    """
    path = Path(str(importlib.resources.files("openmednet") / "assets" / "demo" / f"{DEMO_NAME}.npz"))
    if not path.is_file():
        raise FileNotFoundError(
            f"the demo sample {path} is missing: the package was installed without its assets; "
            f"reinstall it (pip install --force-reinstall openmednet, or pip install -e . from a checkout)"
        )
    return path


def shipped_gray_weights() -> str:
    """Name (``mednet_gray.<tag>``) of the default shipped Gray-MedNet weights.

    Raises:
        FileNotFoundError: no Gray-MedNet weights are installed.
    """
    from openmednet.models import package_weights_dir

    cfg = get_pretrained_cfg("mednet_gray", allow_missing=True)
    if cfg is None:
        raise FileNotFoundError(
            f"no Gray-MedNet weights are installed (nothing in {package_weights_dir()}): pip install the "
            f"release (it ships them), or pre-train them (scripts/build_release_corpora.sh, then "
            f"scripts/pretrain_release.sh gray) and put the backbone's .safetensors/.json/.corpus.npz there, "
            f"or point $OPENMEDNET_WEIGHTS_DIR at them"
        )
    return f"mednet_gray.{cfg.meta['tag']}"


def quickstart_config(
    out: str | Path,
    weights: str,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = DEFAULT_EPOCHS,
    per_class: Sequence[int] = DEFAULT_PER_CLASS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_size: int = IMAGE_SIZE,
    device: str | None = None,
    n_boot: int = N_BOOT,
    precision: str = "auto",
) -> StudyConfig:
    """The study the quick start runs (see the module docstring).

    Args:
        out: study directory.
        weights: the pre-trained init, ``mednet_gray.<tag>``.
        seeds: run seeds (3 for a seed spread).
        epochs: maximum fine-tuning epochs per arm (early stopping on validation AUROC).
        per_class: few-shot budgets (images per class) besides the full train split.
        batch_size: images per step.
        image_size: input side of every init (64: the shipped weights' contract; smaller only for
            smoke tests).
        device: ``cpu``, ``cuda`` or ``None`` (CUDA if available).
        n_boot: bootstrap resamples of the test intervals.
        precision: training precision of every arm (``auto``: bf16 where native, else fp32).
    """
    return StudyConfig(
        out=Path(out),
        targets=({"name": DEMO_NAME, "data": str(demo_path()), "label_map": {"0": "normal", "1": "pneumonia"}},),
        inits=(weights, f"scratch:{weights}", IMAGENET_INIT),
        strategies=("full",),
        label_fractions=(1.0,),
        per_class=tuple(per_class),
        seeds=tuple(seeds),
        finetune={"epochs": epochs, "batch_size": batch_size, "image_size": image_size,
                  "n_boot": n_boot, "device": device, "precision": precision},
    )


@contextmanager
def _quiet(enabled: bool):
    """Raise the eval loggers to WARNING while ``enabled`` (no per-arm / per-epoch INFO lines)."""
    loggers = [logging.getLogger(n) for n in ("openmednet.eval", "openmednet.engine")]
    levels = [lg.level for lg in loggers]
    if enabled:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _label(init: str, weights: str) -> str:
    tag = InitSpec.parse(weights).tag
    if init == weights:
        return INIT_LABELS["pretrained"].format(tag=tag)
    if init == f"scratch:{weights}":
        return INIT_LABELS["scratch"]
    return INIT_LABELS["imagenet"] if init == IMAGENET_INIT else init


def _rows(summary: list[dict[str, Any]], weights: str) -> list[dict[str, Any]]:
    """Comparison rows: one per init x budget, in the study's init order."""
    rows = []
    for r in summary:
        rows.append({
            "init": r["init"], "label": _label(r["init"], weights), "budget": r["budget"],
            "n_train": round(r["n_train"]), "seeds": r["seeds"],
            "auroc": r["auroc_macro"], "balanced_accuracy": r["balanced_accuracy"],
        })
    return rows


def _precision_note(precision: str, device: str | None) -> str:
    """``"auto -> fp32 (CPU AVX2, no AVX512-BF16/AMX)"``: what the arms trained in, and why."""
    from openmednet.engine.precision import bf16_support, resolve_precision

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    resolved, _ = resolve_precision(precision, device)
    return f"{precision} -> {resolved} ({bf16_support(device)[1]})"


def _threads_note(threads: int, jobs: int) -> str:
    """``"2 CPU thread(s)"``, or ``"2 arms at once on 1 CPU thread(s) each"``."""
    return f"{threads} CPU thread(s)" if jobs == 1 else f"{jobs} arms at once on {threads} CPU thread(s) each"


def _append_to_report(path: Path, weights: str, elapsed: float, threads: int, jobs: int, precision: str) -> None:
    """Say in ``report.md`` what produced it: the weights, the sample, the time and precision."""
    text = path.read_text()
    text += (
        "\n## Quick start\n\n"
        f"`openmednet quickstart`: the shipped weights `{weights}` vs the same architecture from scratch vs "
        f"ImageNet EfficientNet-Lite0, fine-tuned on the embedded PneumoniaMNIST demo sample (MedMNIST v2, "
        f"CC BY 4.0; see `openmednet/assets/demo/ATTRIBUTION.md`). Wall time of this invocation "
        f"(finished arms of an earlier one are reused): {elapsed:.0f} s, {_threads_note(threads, jobs)}, "
        f"training precision {precision}.\n"
    )
    atomic_write_text(path, text)


def run_quickstart(out: str | Path, *, progress: bool = True, jobs: int = 1, **settings: Any) -> dict[str, Any]:
    """Run the quick-start comparison into ``out`` (resumable: finished arms are reused).

    Args:
        out: study directory (``report.md``, ``report.json``, ``plots/``, ``runs/``).
        progress: log each arm and epoch (INFO); ``False`` keeps only warnings.
        jobs: arms trained at once, each in its own process with ``1/jobs`` of the threads
            (``run_study(jobs=...)``: the metrics of a sequential run with as many threads per arm).
        settings: ``seeds``, ``epochs``, ``per_class``, ``batch_size``, ``image_size``, ``device``, ``n_boot``,
            ``precision``: the study's settings, with their defaults, as :func:`quickstart_config`
            takes them (the one place they are defined).

    Returns:
        ``{"weights", "rows", "refused", "leakage_checks", "elapsed_s", "threads", "jobs", "cpu_count",
        "report_md", "report_json", "study"}``: ``rows`` are the comparison (per init and budget: ``label``,
        ``n_train``, ``seeds``, ``auroc`` and ``balanced_accuracy`` as ``{"mean", "sd", "ci_low",
        "ci_high"}``), ``threads`` the intra-op threads of each arm (``jobs`` arms ran at once),
        ``refused`` the arms refused for leakage with their reason (the study logs them too),
        ``leakage_checks`` every corpus check made, ``study`` the full ``report.json``.

    Raises:
        FileNotFoundError: no shipped Gray-MedNet weights, or the demo sample is missing.
    """
    start = time.perf_counter()
    weights = shipped_gray_weights()
    cfg = quickstart_config(out, weights, **settings)
    logger.info("quick start: %s vs scratch vs ImageNet on %s, %d seed(s), up to %d epochs",
                weights, DEMO_NAME, len(cfg.seeds), cfg.finetune.epochs)
    with _quiet(not progress):
        study = run_study(cfg, jobs=jobs)
    elapsed = time.perf_counter() - start
    out = Path(out)
    threads = threads_per_job(jobs)
    precision_note = _precision_note(cfg.finetune.precision, cfg.finetune.device)
    _append_to_report(out / "report.md", weights, elapsed, threads, jobs, precision_note)
    return {
        "weights": weights, "rows": _rows(study["summary"], weights), "refused": study["refused"],
        "leakage_checks": study.get("leakage_checks", []), "elapsed_s": elapsed, "threads": threads,
        "jobs": jobs, "cpu_count": os.cpu_count(), "report_md": out / "report.md", "report_json": out / "report.json",
        "study": study,
    }
