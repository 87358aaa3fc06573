"""Transfer study: targets x inits x strategies x label budgets x seeds, resumable, with a report.

``run_study(StudyConfig)`` runs one ``run_finetune`` per arm into
``out/runs/<target>/<init>/<strategy>/<budget>/seed<k>/`` and skips arms whose ``metrics.json``
already exists with the same configuration (so a killed study resumes where it stopped, and a
changed configuration is refused instead of silently mixed). It then writes:

- ``report.json``: every arm's headline test metrics with bootstrap intervals, a summary over
  seeds (mean, standard deviation, mean interval) per target x init x strategy x budget, and the
  refused arms with their reason;
- ``report.md``: the same as tables, with the plots;
- ``plots/label_efficiency_<target>.png`` (test AUROC against training images, one curve per
  init x strategy, seed spread as error bars and the mean bootstrap interval as a band) and
  ``plots/learning_curves_<target>.png`` (validation AUROC per epoch of every arm at the full label
  budget). Each arm's own confusion matrix, ROC and reliability diagram are in its run directory.

Leakage, refused rather than reported:

- Fine-tuning: every arm of a target shares one split (``split_seed``) and each run drops (or, with
  ``leakage: error``, refuses) training images that are near-copies of test images.
- Pre-training: for an init pre-trained on medical images (MedNet weights or a weights file), the
  pre-training corpus is named in ``pretraining_corpora`` (init -> corpus directory built by
  ``openmednet corpus build``, or its ``.corpus.npz`` fingerprint); when it is not, the
  fingerprint that ships with the init's weights is used (``openmednet.models.corpus_fingerprint_file``:
  registered weight sets such as ``auto``, ``mednet_gray``, ``mednet_gray.<tag>``, and
  ``save_pretrained`` directories whose card names one). If any test image of a target, or a
  near-copy of it (perceptual hash within ``near_threshold`` bits), is in that corpus, the init's
  arms on that target are refused and listed in the report. An init with neither a declared corpus
  nor a fingerprint is refused too: its test scores could not be trusted. ImageNet inits (natural
  photos) and inits from scratch need none. ``report.json["leakage_checks"]`` lists every check.

Faster, or on several machines (each arm seeds itself: the metrics do not change, given the same
threads per arm, see ``openmednet.engine.jobs``):

- ``jobs=N`` (``--jobs N``) trains N arms at once, each in its own process with 1/N of the threads
  (``openmednet.engine.jobs``);
- ``num_parts=K, part=k`` (``--num-parts K --part k``, 0-based) trains every K-th arm of the ordered
  grid starting at arm k, so K machines with the same config and ``out`` cover the grid once; each
  part reports its own arms in ``out/parts/part<k>-of-<K>/``. ``report_only=True``
  (``--report-only``), once the parts' run directories are in one ``out``, reports every finished
  arm there without training; arms not finished are listed as missing.

Modules, one concern each: ``_config`` (``StudyConfig``, ``TargetSpec``, ``FinetuneOverlay``, grid
checks), ``_plan`` (the ordered arms, leakage and budget refusals), ``_resume`` (reusing finished
arms); ``run_study`` runs the plan here, and ``eval.study_report`` writes the report.

Example ``study.yaml``::

    out: runs/study-gray
    targets:
      - {name: openi, data: ../shared/data/gray/targets/openi_abd_vs_cxr, given_splits: false}
      - {name: brain_mri, data: ../shared/data/gray/targets/brain_mri_yes_no}
    inits: [auto, scratch:mednet_gray, efficientnet_lite0, scratch:efficientnet_lite0]
    strategies: [full, linear_probe]
    label_fractions: [0.25, 1.0]
    per_class: [10]
    seeds: [0, 1, 2]
    pretraining_corpora: {auto: corpora/gray}
    finetune: {epochs: 40, image_size: 64, lr: 1.0e-4}   # precision: auto (bf16 where native)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from openmednet.config import changed_fields, save_config, to_dict
from openmednet.engine.jobs import run_jobs
from openmednet.engine.trainer import NonFiniteLossError
from openmednet.eval.finetune import run_finetune
from openmednet.eval.semi import unread_semi_message, unread_semi_settings
from openmednet.eval.leakage import (
    check_pretraining_leakage,
    shipped_corpus_fingerprint,
)
from openmednet.eval.study._config import _STUDY_OWNED as _STUDY_OWNED
from openmednet.eval.study._config import MIN_SEEDS
from openmednet.eval.study._config import (
    FinetuneOverlay,
    StudyConfig,
    TargetSpec,
    _check_grid,
)
from openmednet.eval.study._plan import (
    _DECODED,
    _Arm,
    _check_unlabelled,
    _decoded_target,
    _plan,
    arm_dir,
)
from openmednet.eval.study._plan import _arm_config as _arm_config
from openmednet.eval.study._plan import _budgets as _budgets
from openmednet.eval.study._plan import _needs_corpus as _needs_corpus
from openmednet.eval.study._resume import _done
from openmednet.eval.study._resume import _result_config as _result_config
from openmednet.eval.study_report import TASK_REPORTS, summarize, write_report

__all__ = ["FinetuneOverlay", "StudyConfig", "TargetSpec", "arm_dir", "check_pretraining_leakage", "run_study", "shipped_corpus_fingerprint"]
# The ``name as name`` imports above re-export private planning and resume rules that tests check here.

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ run
def _check_parts(jobs: int, num_parts: int, part: int, report_only: bool) -> None:
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1 (arms trained at once; 1 = one after another), got {jobs}")
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"--part is 0-based and must lie in [0, --num-parts): got --part {part} with "
                         f"--num-parts {num_parts}; the parts of a 2-machine grid are --part 0 and --part 1")
    if report_only and num_parts > 1:
        raise ValueError("--report-only merges the arms of every part: drop --num-parts/--part")


def _warn_unread_semi_settings(cfg: StudyConfig) -> None:
    """Warn about shared ``finetune`` settings that no semi method of the grid reads (e.g.
    ``rounds`` without a ``pseudo_label`` arm): they look applied and are not."""
    unread = unread_semi_settings(cfg.finetune, cfg.semi)
    if unread:
        warnings.warn(f"study finetune: {unread_semi_message(unread, cfg.semi)}", stacklevel=3)


def run_study(cfg: StudyConfig, *, jobs: int = 1, num_parts: int = 1, part: int = 0,
              report_only: bool = False) -> dict[str, Any]:
    """Run (or resume) every arm, then write ``report.json``, ``report.md`` and plots.

    Args:
        cfg: the grid.
        jobs: arms trained at once, each in its own process with ``1/jobs`` of the threads (at
            least 1; ``openmednet.engine.jobs``); 1 trains them here, one after another. Each arm
            seeds itself, so the metrics are those of a sequential run that gives an arm as many
            threads (bit for bit; a different thread count changes the last digits).
        num_parts, part: train only part ``part`` (0-based) of ``num_parts``: the arms whose index in
            the ordered grid is ``part`` modulo ``num_parts``, so ``num_parts`` machines with the same
            config and ``out`` (shared, or copied together afterwards) cover the grid once. A part
            writes its report to ``out/parts/part<k>-of-<K>/``, not ``out/report.*``.
        report_only: train nothing: report the finished arms found in ``out`` (e.g. of every part)
            in ``out/report.*``; arms without ``metrics.json`` (not run yet, or failed) are listed
            under ``missing``.

    Returns:
        The content of the report's ``report.json``.
    """
    _check_parts(jobs, num_parts, part, report_only)
    _check_grid(cfg)
    if not report_only:  # a report of finished arms reads no unlabelled image
        _check_unlabelled(cfg)
    if len(cfg.seeds) < MIN_SEEDS:
        warnings.warn(f"{len(cfg.seeds)} seed(s): a study needs at least {MIN_SEEDS} for seed spread", stacklevel=2)
    _warn_unread_semi_settings(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if num_parts > 1:  # the parts' shared record, and their check that they share one config
        _check_same_study(cfg, out)
        save_config(cfg, out / "study.yaml")
    refused, checks, planned = [], [], []  # planned: (arm, metrics or None), in grid order

    def to_train() -> Iterator[_Arm]:  # drawn lazily: the next target is decoded while arms train
        for i, arm in enumerate(_plan(cfg, refused, checks)):
            if i % num_parts != part:
                continue
            metrics = _done(arm.run)
            if metrics is not None:
                logger.info("arm %s: done before, reusing its metrics", arm.run.out)
            planned.append((arm, metrics))
            if metrics is None and not report_only:
                yield arm

    try:
        trained = iter(run_jobs(_train_arm, to_train(), 1 if report_only else jobs, describe=lambda a: f"arm {a.run.out}"))
    finally:
        _DECODED.clear()  # this process's copy of the last target
    arms, failed, missing = [], [], []
    for arm, metrics in planned:
        if metrics is None and report_only:
            missing.append(arm.labels())
            continue
        if metrics is None:
            metrics = next(trained)
        if "error" in metrics:
            failed.append({**arm.labels(), "error": metrics["error"]})
        else:
            arms.append(_arm_row(arm, metrics))
    result = {"arms": arms, "summary": summarize(arms), "refused": refused, "failed": failed,
              "leakage_checks": checks, "config": to_dict(cfg)}
    if report_only:
        result["missing"] = missing
    if num_parts > 1:
        result["part"] = {"part": part, "num_parts": num_parts}
        out = out / "parts" / f"part{part}-of-{num_parts}"
    else:  # written with the report: a study refused midway (another run's arm in out) leaves the old one
        save_config(cfg, out / "study.yaml")
    write_report(out, result)
    return result


def _check_same_study(cfg: StudyConfig, out: Path) -> None:
    """Refuse a part whose config differs from the one the other parts in ``out`` recorded.

    Each arm has its own folder, so a part of another config (``--set finetune.epochs=2`` on one
    machine) trained all its arms and the mismatch surfaced only when ``--report-only`` joined
    them, hours later.
    """
    from openmednet.config import load_config

    saved = out / "study.yaml"
    if not saved.is_file():
        return
    changed = changed_fields(to_dict(load_config(StudyConfig, saved)), to_dict(cfg))
    if changed:
        raise ValueError(f"{out} holds parts of a study with another configuration (differs in: {', '.join(changed)}; "
                         f"see {saved}): every part must run the same config into the same out")


def _train_arm(arm: _Arm) -> dict[str, Any]:
    """Train one arm, here or in a ``--jobs`` worker: its metrics, or ``{"error": ...}``."""
    logger.info("arm %s", arm.run.out)
    target = _decoded_target(arm.spec, arm.run.task, arm.run.max_side)
    try:
        return run_finetune(arm.run, target=target).metrics
    except (NonFiniteLossError, ValueError) as e:
        # A diverging arm (NaN loss) or one refused by its own checks must not stop the other
        # arms, nor every resume: it is reported as failed, and retried by the next resume.
        logger.error("arm %s failed: %s", arm.run.out, e)
        return {"error": f"{type(e).__name__}: {e}"}


def _arm_row(arm: _Arm, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The arm's line of ``report.json``: sizes, best epoch, dropped images, headline test metrics."""
    test, headline = metrics["test"], TASK_REPORTS[arm.run.task][0]
    return {
        "target": arm.spec.name, "init": arm.init, "strategy": arm.strategy, "budget": arm.budget, "seed": arm.seed,
        "n_train": sum(metrics["data"]["counts"]["train_used"].values()), "n_test": test["n"],
        # Few-shot arms still choose their epoch on the whole validation split: record its size.
        "n_val": sum(metrics["data"]["counts"]["val"].values()),
        "best_epoch": metrics["best_epoch"], "run_dir": str(arm.run.out),
        "dropped": {k: len(v) for k, v in metrics["data"]["dropped"].items()},
        **{m: test[m] for m in headline},
        "ci": {m: test["ci"][m] for m in headline if m in test.get("ci", {})},
    }
