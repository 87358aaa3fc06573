"""Study grids (issue 15 item 3): ``jobs=2`` gives a sequential run's metrics bit for bit;
``num_parts``/``part`` cover the grid once; ``report_only`` merges the parts into the single run's report.

One tiny real grid (20 brain MRIs, 32 px, 1 epoch): scratch ``mednet_test`` x {full, freeze_k} x 2
seeds. ``freeze_k: 99`` makes both freeze_k arms fail on their own check, so failures travel too.
This process runs at one intra-op thread (conftest), and so does each of two workers.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from openmednet.eval.study import StudyConfig, run_study

pytestmark = pytest.mark.filterwarnings("ignore:2 seed")
NAMES = ("predictions.csv", "history.json", "splits.csv")


def _brain(shared_data: Path, dst: Path, per_class: int = 10) -> Path:
    root = shared_data / "gray/targets/brain_mri_yes_no"
    rows = list(csv.DictReader((root / "labels.csv").open()))
    rows = [r for r in rows if r["label"] == "no"][:per_class] + [r for r in rows if r["label"] == "yes"][:per_class]
    dst.mkdir()
    with (dst / "labels.csv").open("w", newline="") as f:
        f.write("path,label,split,group\n")
        for i, r in enumerate(rows):
            name = f"{r['label']}{i}{Path(r['path']).suffix}"
            shutil.copyfile(root / r["path"], dst / name)
            f.write(f"{name},{r['label']},,\n")
    return dst


def _cfg(data: Path, out: Path) -> StudyConfig:
    return StudyConfig(
        out=out, targets=({"name": "brain20", "data": str(data)},), inits=("scratch:mednet_test",),
        strategies=("full", "freeze_k"), seeds=(0, 1),
        finetune={"epochs": 1, "image_size": 32, "batch_size": 8, "n_boot": 20, "max_side": 64,
                  "test_fraction": 0.25, "freeze_k": 99},
    )


def _key(arm: dict) -> tuple:
    return arm["strategy"], arm["seed"]


def _same(a: object, b: object) -> bool:
    """Equal, NaN included (``json.dumps`` writes NaN as ``NaN``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _without_dirs(arms: list[dict]) -> list[dict]:
    return [{k: v for k, v in a.items() if k != "run_dir"} for a in arms]


@pytest.fixture(scope="module")
def grid(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("grid")
    data = _brain(shared_data, tmp / "brain")
    runs = {"tmp": tmp, "sequential": run_study(_cfg(data, tmp / "seq")),
            "jobs2": run_study(_cfg(data, tmp / "par"), jobs=2)}
    parts = _cfg(data, tmp / "parts")
    runs["part0"] = run_study(parts, num_parts=2, part=0)
    runs["after_part0"] = run_study(parts, report_only=True)
    runs["part1"] = run_study(parts, num_parts=2, part=1)
    runs["stamps"] = {p: p.stat().st_mtime_ns for p in (tmp / "parts/runs").rglob("*") if p.is_file()}
    runs["merged"] = run_study(parts, report_only=True)
    return runs


def test_two_jobs_give_the_metrics_of_a_sequential_run(grid: dict) -> None:
    seq, par = grid["sequential"], grid["jobs2"]
    assert [_key(a) for a in seq["arms"]] == [("full", 0), ("full", 1)]
    assert [_key(a) for a in seq["failed"]] == [("freeze_k", 0), ("freeze_k", 1)]
    assert "ValueError: freeze_k: k must lie in" in seq["failed"][0]["error"]
    assert _same(_without_dirs(par["arms"]), _without_dirs(seq["arms"]))
    assert _same(par["summary"], seq["summary"]) and _same(_without_dirs(par["failed"]), _without_dirs(seq["failed"]))
    for a, b in zip(seq["arms"], par["arms"], strict=True):
        for name in NAMES:
            assert (Path(a["run_dir"]) / name).read_bytes() == (Path(b["run_dir"]) / name).read_bytes(), name
        test_a, test_b = (json.loads((Path(x["run_dir"]) / "metrics.json").read_text())["test"] for x in (a, b))
        assert _same(test_a, test_b)


def test_parts_cover_the_grid_once_and_each_writes_its_own_report(grid: dict) -> None:
    p0, p1 = grid["part0"], grid["part1"]
    assert [_key(a) for a in p0["arms"] + p0["failed"]] == [("full", 0), ("freeze_k", 0)]  # round robin
    assert [_key(a) for a in p1["arms"] + p1["failed"]] == [("full", 1), ("freeze_k", 1)]
    assert p0["part"] == {"part": 0, "num_parts": 2}
    md = (grid["tmp"] / "parts/parts/part1-of-2/report.md").read_text()
    assert md.startswith("# Transfer study report: part 1 of 2 (0-based)") and "--report-only" in md
    assert json.loads((grid["tmp"] / "parts/parts/part0-of-2/report.json").read_text())["part"]["part"] == 0


def test_report_only_lists_the_missing_arms_and_merges_the_parts(grid: dict) -> None:
    # After part 0 only: part 1's arms and part 0's failed arm are missing, not dropped.
    assert [_key(a) for a in grid["after_part0"]["missing"]] == [("full", 1), ("freeze_k", 0), ("freeze_k", 1)]
    merged, seq = grid["merged"], grid["sequential"]
    assert _same(_without_dirs(merged["arms"]), _without_dirs(seq["arms"])) and _same(merged["summary"], seq["summary"])
    assert [_key(a) for a in merged["missing"]] == [_key(a) for a in seq["failed"]] and merged["failed"] == []
    md = (grid["tmp"] / "parts/report.md").read_text()
    assert "## Missing arms" in md and "| brain20 | scratch:mednet_test | freeze_k | frac1 | 1 |" in md
    # Nothing was trained by the report.
    assert {p: p.stat().st_mtime_ns for p in grid["stamps"]} == grid["stamps"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"jobs": 0}, "--jobs must be >= 1"),
        ({"num_parts": 2, "part": 2}, "0-based"),
        ({"num_parts": 0}, r"\[0, --num-parts\)"),
        ({"num_parts": 2, "part": 1, "report_only": True}, "drop --num-parts"),
    ],
)
def test_bad_jobs_or_parts_fail_before_any_data_is_read(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_study(_cfg(tmp_path / "does-not-exist", tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()
