"""The study's typed ``finetune`` overlay: checked when the study config is loaded, every shipped
study config still loads, and each arm's ``FinetuneConfig`` (what finished arms are compared on)
is what the untyped dict made of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from openmednet.config import from_dict, load_config, save_config, to_dict
from openmednet.engine.precision import resolve_precision
from openmednet.eval.finetune import FinetuneConfig, training_device
from openmednet.eval.semi import FREEMATCH_FIELDS, study_strategies
from openmednet.eval.study import (
    _STUDY_OWNED,
    FinetuneOverlay,
    StudyConfig,
    _arm_config,
    _budgets,
    _done,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STUDY_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if "targets" in (yaml.safe_load(p.read_text()) or {}))


def _write(tmp_path: Path, finetune: Any) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"out": "o", "targets": [{"name": "t", "data": "d"}], "finetune": finetune}))
    return path


def test_the_shipped_configs_include_studies() -> None:
    assert len(STUDY_CONFIGS) >= 20  # the glob found them (configs/, v2/, semi/, seg/, survey/)


@pytest.mark.parametrize("path", STUDY_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_study_config_loads_and_its_arms_are_unchanged(path: Path) -> None:
    cfg = load_config(StudyConfig, path)
    assert isinstance(cfg.finetune, FinetuneOverlay)
    given = yaml.safe_load(path.read_text()).get("finetune") or {}
    # Today's arms, the untyped way: the YAML mapping merged with what the study owns, built once.
    for spec in cfg.target_specs():
        for init in cfg.inits:
            for strategy in study_strategies(cfg.strategies, cfg.semi):
                for _, budget in _budgets(cfg):
                    arm = _arm_config(cfg, spec, init, strategy, budget, cfg.seeds[0], Path("arm"))
                    owned = {k: getattr(arm, k) for k in _STUDY_OWNED}
                    assert arm == from_dict(FinetuneConfig, {**given, **owned}, prefix="finetune.")


@pytest.mark.parametrize(
    "finetune, error, match",
    [
        ({"epoch": 3}, KeyError, r"unknown config key 'finetune.epoch'; did you mean 'epochs'\?"),
        ({"seed": 1}, ValueError, (r"the study sets \['seed'\] for every arm, so finetune.seed would be ignored: "
                                   r"'seed' belongs in seeds")),
        ({"classes": ["a"]}, ValueError, r"'classes' belongs in targets\[\].classes"),
        ({"lr": "fast"}, ValueError, r"config key 'finetune.lr': expected a number"),
        ({"optimizer": "adamx"}, KeyError, r"unknown optimizer 'adamx'; did you mean 'adamw'\?"),
        ({"epochs": 5, "min_epochs": 5}, ValueError, r"min_epochs must be in \[0, epochs\)"),
    ],
)
def test_finetune_mistakes_fail_when_the_study_config_is_loaded(tmp_path: Path, finetune: dict, error: type,
                                                                match: str) -> None:
    with pytest.raises(error, match=match):
        load_config(StudyConfig, _write(tmp_path, finetune))
    with pytest.raises(error, match=match):  # --set goes the same way
        load_config(StudyConfig, _write(tmp_path, {}), [f"finetune.{k}={json.dumps(v)}" for k, v in finetune.items()])


def test_an_empty_finetune_block_is_no_overrides_and_a_non_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("out: o\ntargets:\n  - {name: t, data: d}\nfinetune:\n")  # YAML null
    assert load_config(StudyConfig, path).finetune == FinetuneOverlay()
    with pytest.raises(ValueError, match=r"finetune must be a mapping of FinetuneConfig fields .*got list \['epochs'\]"):
        load_config(StudyConfig, _write(tmp_path, ["epochs"]))


def test_overlay_is_typed_and_round_trips(tmp_path: Path) -> None:
    cfg = load_config(StudyConfig, _write(tmp_path, {"lr": 1, "weight_decay": "1e-5", "epochs": 3}))
    assert (cfg.finetune.lr, cfg.finetune.weight_decay, cfg.finetune.epochs) == (1.0, 1e-5, 3)
    assert cfg.finetune.patience == FinetuneConfig.__dataclass_fields__["patience"].default
    assert not set(_STUDY_OWNED) & set(FinetuneOverlay.__dataclass_fields__)
    save_config(cfg, tmp_path / "saved.yaml")  # what run_study writes to out/study.yaml
    assert load_config(StudyConfig, tmp_path / "saved.yaml") == cfg
    assert StudyConfig(out=cfg.out, targets=cfg.targets, finetune=cfg.finetune) == cfg


#: An arm's config as metrics.json recorded it before the overlay was typed (``to_dict`` of
#: ``_arm_config`` for ``_STUDY`` at commit c44e81b; ``out`` differs per copy and does not count).
_WRITTEN_BEFORE = {
    "data": "target", "out": "study/arm", "init": "scratch:mednet_test", "arch": None, "strategy": "full",
    "freeze_k": 0, "epochs": 3, "patience": 10, "min_epochs": 0, "batch_size": 32, "lr": 1.0, "head_lr_mult": 10.0,
    "weight_decay": 1e-05, "optimizer": "adamw", "warmup_epochs": 1, "image_size": 32, "class_weighted": True,
    "label_fraction": None, "per_class": 3, "seed": 1, "given_splits": False, "split_seed": 0, "val_fraction": 0.15,
    "test_fraction": 0.2, "leakage": "drop", "near_threshold": 6, "hflip": False, "n_boot": 20, "format": "auto",
    "csv_file": None, "columns": {}, "label_map": {"0": "a", "1": "b"}, "classes": None, "max_side": 64,
    "precision": "fp32", "channels_last": None, "num_workers": 0, "device": None, "task": "classification",
    "semi": "pseudo_label", "unlabelled": ["rest_of_train"], "rounds": 2, "semi_threshold": 0.95,
    "pseudo_selection": "per_class_threshold", "pseudo_fraction": 0.5, "student_dropout": 0.5, "mu": 2,
    "lambda_u": 1.0, "strong_magnitude": 9, "max_unlabelled": 50,
}
_STUDY = {
    "out": "study", "targets": [{"name": "t", "data": "target", "given_splits": False, "label_map": {"0": "a", "1": "b"}}],
    "inits": ["scratch:mednet_test"], "per_class": [3], "semi": ["none", "pseudo_label"], "unlabelled": ["rest_of_train"],
    # ints for floats and a YAML-1.1 string float, which the typed overlay coerces on load
    "finetune": {"epochs": 3, "lr": 1, "weight_decay": "1e-5", "precision": "fp32", "image_size": 32, "max_side": 64,
                 "hflip": False, "n_boot": 20, "rounds": 2, "pseudo_selection": "per_class_threshold",
                 "max_unlabelled": 50},
}


def test_an_arm_finished_before_the_typed_overlay_is_reused(tmp_path: Path) -> None:
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(_STUDY))
    cfg = load_config(StudyConfig, tmp_path / "study.yaml")
    run = _arm_config(cfg, cfg.target_specs()[0], "scratch:mednet_test", "full+pseudo_label", {"per_class": 3}, 1,
                      tmp_path / "arm")
    written_now = {**to_dict(run), "out": "study/arm"}
    # FreeMatch's fields came later; a pseudo-label arm written without them is still this run (below)
    assert {k: v for k, v in written_now.items() if k not in FREEMATCH_FIELDS} == _WRITTEN_BEFORE
    run.out.mkdir()
    precision, channels_last = resolve_precision(run.precision, training_device(run), run.channels_last)
    metrics = {"config": _WRITTEN_BEFORE, "model": {"precision": precision, "channels_last": channels_last}}
    (run.out / "metrics.json").write_text(json.dumps(metrics))
    assert _done(run) == metrics  # finished: reused, not refused as a different configuration


@pytest.mark.parametrize("axis", ["targets", "inits", "strategies", "seeds", "semi"])
def test_an_empty_grid_axis_is_refused(axis, tmp_path):
    """Regression (hostile-user probe): ``seeds: []`` ended in an IndexError traceback, and an empty
    ``targets``/``inits``/``strategies`` list ran a study of 0 arms to an empty report, exit 0."""
    from openmednet.eval.study import _check_grid

    grid = {"out": tmp_path / "s", "targets": ({"name": "t", "data": str(tmp_path / "t")},), "inits": ("auto",),
            "per_class": (10,), axis: ()}
    with pytest.raises(ValueError, match=f"{axis} is empty: the grid would have no arm"):
        _check_grid(StudyConfig(**grid))
