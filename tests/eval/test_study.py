"""Transfer study on a tiny real target: arms, resume, refusal of leaky pre-training corpora, report."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from openmednet import create_model
from openmednet.config import load_config, save_config
from openmednet.data.corpus import build_corpus
from openmednet.data.sources import SourceSpec
from openmednet.eval.study import StudyConfig, run_study
from openmednet.models import save_pretrained


def _target(shared_data: Path, tmp: Path, per_class: int = 12) -> Path:
    root = shared_data / "gray/targets/openi_abd_vs_cxr"
    rows = [r for r in csv.DictReader((root / "labels.csv").read_text().splitlines()) if r["split"] == "train"]
    rows = [r for r in rows if r["label"] == "chest"][:per_class] + [r for r in rows if r["label"] == "abdomen"][:per_class]
    (tmp / "target").mkdir()
    with open(tmp / "target/labels.csv", "w", newline="") as f:
        f.write("path,label,split,group\n")
        f.writelines(f"{Path(r['path']).name},{r['label']},,\n" for r in rows)
    for r in rows:  # copies: a source's paths must stay inside its folder (issue 14 item 6)
        shutil.copyfile(root / r["path"], tmp / "target" / Path(r["path"]).name)
    return tmp / "target"


@pytest.fixture(scope="module")
def study(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("study")
    data = _target(shared_data, tmp)
    torch.manual_seed(0)
    save_pretrained(create_model("mednet_test", num_classes=0), tmp / "weights")
    # A "pre-training corpus" that contains the target itself: every test image is in it.
    build_corpus([SourceSpec(name="leaky", root=data)], tmp / "leaky_corpus", channels=1, image_size=32)
    weights = str(tmp / "weights")
    (tmp / "study.yaml").write_text(json.dumps({  # JSON is YAML
        "out": str(tmp / "out"),
        "targets": [{"name": "openi24", "data": str(data)}],
        "inits": ["scratch:mednet_test", weights, str(tmp / "weights/model_card.json")],
        "strategies": ["full"],
        "label_fractions": [1.0],
        "per_class": [3],
        "seeds": [0, 1, 2],
        "pretraining_corpora": {weights: str(tmp / "leaky_corpus")},
        "finetune": {"epochs": 1, "image_size": 32, "batch_size": 8, "n_boot": 20, "max_side": 64,
                     "test_fraction": 0.25},
    }))
    cfg = load_config(StudyConfig, tmp / "study.yaml")
    return tmp, cfg, run_study(cfg)


def test_study_runs_every_arm_and_summarises(study: tuple[Path, StudyConfig, dict]) -> None:
    tmp, _, result = study
    assert len(result["arms"]) == 6  # 1 target x 1 usable init x 1 strategy x 2 budgets x 3 seeds
    few = [a for a in result["arms"] if a["budget"] == "3shot"]
    assert {a["n_train"] for a in few} == {6}
    full = [a for a in result["arms"] if a["budget"] == "frac1"]
    assert len({a["n_test"] for a in result["arms"]}) == 1  # one test split for every arm
    assert few[0]["n_train"] < full[0]["n_train"]
    row = next(r for r in result["summary"] if r["budget"] == "3shot")
    values = [a["auroc_macro"] for a in few]
    assert row["auroc_macro"]["mean"] == pytest.approx(sum(values) / 3)
    assert row["seeds"] == 3
    assert json.loads((tmp / "out/report.json").read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    md = (tmp / "out/report.md").read_text()
    n_val = few[0]["n_val"]
    assert n_val > 0 and {a["n_val"] for a in result["arms"]} == {n_val}  # budgets shrink train, not val
    assert "## openi24" in md and f"| scratch:mednet_test | full | 3shot | 6 | {n_val} | 3 |" in md
    assert "Left out of every arm: 0 images with conflicting labels, 0 training/validation near-copies" in md
    for plot in ("label_efficiency_openi24.png", "learning_curves_openi24.png"):
        assert (tmp / "out/plots" / plot).is_file()


def test_leaky_or_undeclared_pretraining_is_refused(study: tuple[Path, StudyConfig, dict]) -> None:
    tmp, _, result = study
    reasons = {r["init"]: r["reason"] for r in result["refused"]}
    assert "are in the pre-training corpus" in reasons[str(tmp / "weights")]
    assert "no corpus is declared" in reasons[str(tmp / "weights/model_card.json")]
    assert "Refused arms" in (tmp / "out/report.md").read_text()


def test_study_resumes_without_rerunning(study: tuple[Path, StudyConfig, dict]) -> None:
    tmp, cfg, result = study
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "out/runs").rglob("metrics.json")}
    again = run_study(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["summary"] == result["summary"]
    changed = StudyConfig(**{**cfg.__dict__, "finetune": dataclasses.replace(cfg.finetune, lr=0.5)})
    recorded = (tmp / "out/study.yaml").read_text()
    with pytest.raises(ValueError, match="different configuration"):
        run_study(changed)
    # Regression (hostile-user probe): the refused study had already rewritten study.yaml (lr 0.5),
    # while report.json and the arms were of lr 1e-3.
    assert (tmp / "out/study.yaml").read_text() == recorded
    # A part of another config is refused before it trains (it trained its whole share before).
    from openmednet.eval.study import _check_same_study

    (tmp / "parts_out").mkdir()
    save_config(cfg, tmp / "parts_out" / "study.yaml")
    _check_same_study(cfg, tmp / "parts_out")
    with pytest.raises(ValueError, match=r"holds parts of a study with another configuration \(differs in: finetune.lr;"):
        _check_same_study(changed, tmp / "parts_out")


def test_infeasible_per_class_budget_refuses_its_arms_not_the_study(shared_data: Path, tmp_path: Path) -> None:
    data = _target(shared_data, tmp_path, per_class=6)  # 6 per class, of which some go to val/test
    cfg = StudyConfig(
        out=tmp_path / "out", targets=({"name": "openi12", "data": str(data)},), inits=("scratch:mednet_test",),
        label_fractions=(), per_class=(50,), seeds=(0, 1, 2),
        finetune={"epochs": 1, "image_size": 32, "batch_size": 8, "n_boot": 20, "max_side": 64},
    )
    result = run_study(cfg)
    assert result["arms"] == []
    (refusal,) = result["refused"]
    assert refusal["init"] == "scratch:mednet_test"
    assert "full 50shot: class" in refusal["reason"] and "fewer than per_class=50" in refusal["reason"]
    assert "fewer than per_class=50" in (tmp_path / "out/report.md").read_text()


def test_moved_study_reuses_its_arms(study: tuple[Path, StudyConfig, dict], tmp_path: Path) -> None:
    # Where the study lives and how many loader workers run do not change a result.
    tmp, cfg, result = study
    shutil.copytree(tmp / "out", tmp_path / "moved")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "moved/runs").rglob("metrics.json")}
    moved = StudyConfig(**{**cfg.__dict__, "out": tmp_path / "moved", "finetune": dataclasses.replace(cfg.finetune, num_workers=1)})
    again = run_study(moved)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r["auroc_macro"] for r in again["summary"]] == [r["auroc_macro"] for r in result["summary"]]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"seeds": (0, 1, 1)}, r"seeds repeats \['1'\]"),
        ({"label_fractions": (1, 1.0)}, "label_fractions repeats"),
        ({"inits": ("scratch:mednet_tset",)}, "did you mean 'mednet_test'"),
        ({"inits": ("mednet_gray.nope",)}, "unknown weights 'mednet_gray.nope'"),
        ({"strategies": ("full", "linear_prob")}, "did you mean 'linear_probe'"),
        ({"finetune": {"given_splits": False}}, r"'given_splits' belongs in targets\[\].given_splits"),
        ({"finetune": {"lr": "fast"}}, "config key 'finetune.lr': expected a number"),
    ],
)
def test_grid_mistakes_fail_before_any_data_is_read(tmp_path: Path, change: dict, match: str) -> None:
    fields = {"out": tmp_path / "out", "targets": ({"name": "x", "data": str(tmp_path / "does-not-exist")},),
              "inits": ("scratch:mednet_test",), "seeds": (0, 1, 2), **change}
    with pytest.raises((ValueError, KeyError), match=match):
        run_study(StudyConfig(**fields))


def test_a_failing_arm_is_reported_and_the_others_still_run(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openmednet.engine.trainer import NonFiniteLossError
    from openmednet.eval import study as study_module

    real = study_module.run_finetune

    def diverge_on_seed_1(run, target=None):  # stands in for a learning rate that blows up one seed
        if run.seed == 1:
            raise NonFiniteLossError("loss is nan at step 3")
        return real(run, target=target)

    monkeypatch.setattr(study_module, "run_finetune", diverge_on_seed_1)
    cfg = StudyConfig(
        out=tmp_path / "out", targets=({"name": "openi12", "data": str(_target(shared_data, tmp_path, per_class=6))},),
        inits=("scratch:mednet_test",), seeds=(0, 1, 2),
        finetune={"epochs": 1, "image_size": 32, "batch_size": 8, "n_boot": 0, "max_side": 64, "test_fraction": 0.25},
    )
    result = run_study(cfg)
    assert [a["seed"] for a in result["arms"]] == [0, 2] and result["summary"][0]["seeds"] == 2
    (failed,) = result["failed"]
    assert failed["seed"] == 1 and "NonFiniteLossError: loss is nan" in failed["error"]
    assert "## Failed arms" in (tmp_path / "out/report.md").read_text()
    assert not (Path(failed["run_dir"]) / "metrics.json").exists()  # the next resume retries it


def test_arms_finished_before_a_field_existed_are_reused(study: tuple[Path, StudyConfig, dict], tmp_path: Path) -> None:
    # Regression: arms saved before FinetuneConfig had `task` were refused as "a different
    # configuration" after the update, which would have re-run every finished arm of a study.
    tmp, cfg, result = study
    shutil.copytree(tmp / "out", tmp_path / "old")
    for path in (tmp_path / "old/runs").rglob("metrics.json"):
        metrics = json.loads(path.read_text())
        del metrics["config"]["task"]
        path.write_text(json.dumps(metrics))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "old/runs").rglob("metrics.json")}
    again = run_study(StudyConfig(**{**cfg.__dict__, "out": tmp_path / "old"}))
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r["auroc_macro"] for r in again["summary"]] == [r["auroc_macro"] for r in result["summary"]]
