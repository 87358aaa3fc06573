"""``StudyConfig``: the grid of a transfer study, its targets and shared fine-tuning fields, checked on load."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openmednet._errors import look_up_option
from openmednet.config import from_dict
from openmednet.eval.finetune import FinetuneConfig
from openmednet.eval.semi import split_study_strategy, study_strategies
from openmednet.eval.strategies import STRATEGIES

__all__ = ["FinetuneOverlay", "StudyConfig", "TargetSpec"]


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
        semi: ``FinetuneConfig.semi`` values, a grid axis (``[none, pseudo_label, fixmatch, freematch]``); arms
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



#: Seeds a study needs for a spread over seeds (fewer warn).
MIN_SEEDS = 3


def _check_grid(cfg: StudyConfig) -> None:
    """Fail before any data is read on what would otherwise fail hours in: repeated grid values,
    unknown strategies, inits that are malformed or name no registered model or existing path."""
    from openmednet.models import InitSpec, get_pretrained_cfg
    from openmednet.models._registry import model_entrypoint

    for name in ("inits", "strategies", "label_fractions", "per_class", "seeds", "semi", "unlabelled"):
        value = getattr(cfg, name)
        if not isinstance(value, (list, tuple)):  # a string would be iterated letter by letter
            raise ValueError(f"{name} must be a list, got {value!r}: write [{value}]")  # noqa: TRY004
    # An empty axis empties the grid: "0 arms ... report" and exit 0 (or an IndexError for seeds).
    for name in ("targets", "inits", "strategies", "seeds", "semi"):
        if not list(getattr(cfg, name)):
            raise ValueError(f"{name} is empty: the grid would have no arm; give at least one"
                             + (f" (at least {MIN_SEEDS} for seed spread)" if name == "seeds" else ""))
    for name in ("inits", "strategies", "label_fractions", "per_class", "seeds", "semi"):
        values = list(getattr(cfg, name))
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"{name} repeats {repeated}: each arm would run twice and count as two seeds")
    for strategy in cfg.strategies:
        look_up_option(strategy, STRATEGIES, "strategy")
    study_strategies(cfg.strategies, cfg.semi)  # unknown semi methods fail here
    semi = [m for m in cfg.semi if m != "none"]
    if semi and not cfg.unlabelled:
        raise ValueError(f"semi {list(cfg.semi)} needs unlabelled images: add unlabelled: [rest_of_train] or folders")
    if semi and cfg.task == "segmentation":
        raise ValueError(f"task segmentation has no semi-supervised mode yet, got semi {list(cfg.semi)}: use semi: [none]")
    # A semi arm's own checks (rest_of_train with folders...): they failed when the first semi arm
    # was planned, after the arms before it had trained.
    for method in semi:
        FinetuneConfig(data=Path(), out=Path(), **_fields(cfg.finetune), **split_study_strategy(f"full+{method}", cfg.unlabelled))
    from openmednet.eval.finetune._outputs import check_out_outside_data

    for target in cfg.targets:  # every arm would refuse it (start_run), one by one
        if isinstance(target, Mapping) and target.get("data") is not None:
            check_out_outside_data(cfg.out, target["data"], what="study out")
    for init in cfg.inits:
        spec = InitSpec.parse(init)  # a missing weights path fails here
        if spec.kind == "scratch":
            model_entrypoint(spec.name)
        elif spec.kind == "pretrained":
            get_pretrained_cfg(spec.name)
