"""scripts/results_table.py: the tables of docs/results.md are printed from report.json, so a cell
it drops or merges is a wrong published number."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "results_table.py"


@pytest.fixture(scope="module")
def results_table():
    spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summary(init: str, strategy: str, mean: float, sd: float = 0.01) -> dict:
    stats = {"mean": mean, "sd": sd, "ci_low": mean - 0.1, "ci_high": mean + 0.1}
    return {"target": "busi", "init": init, "strategy": strategy, "budget": "10shot", "n_train": 30,
            "auroc_macro": stats}


def _report(*summaries: dict, out: str = "runs/x") -> dict:
    return {"arms": [{"target": "busi", "n_test": 258}], "summary": list(summaries), "config": {"out": out}}


def test_strategy_columns_keep_one_row_per_init(results_table):
    # Regression: with strategies as columns the rows were target x budget only, so the second
    # init's summaries overwrote the first's and the table showed one init under no name.
    report = _report(_summary("auto", "full", 0.80), _summary("auto", "full+fixmatch", 0.81),
                     _summary("efficientnet_lite0", "full", 0.60), _summary("efficientnet_lite0", "full+fixmatch", 0.70))
    text = results_table.table([report], "auroc_macro", "strategy", ci=False, mean_row=True)
    lines = text.splitlines()
    assert lines[2] == "| busi (258) | 10 per class (30), MedNet pre-trained | 0.800 ± 0.010 | **0.810 ± 0.010** |"
    assert lines[3] == "| busi (258) | 10 per class (30), ImageNet Lite0 | 0.600 ± 0.010 | **0.700 ± 0.010** |"
    assert lines[4] == "| mean of 1 rows | MedNet pre-trained | 0.800 | **0.810** |"
    assert lines[5] == "| mean of 1 rows | ImageNet Lite0 | 0.600 | **0.700** |"


def test_one_init_keeps_the_plain_rows(results_table):
    text = results_table.table([_report(_summary("auto", "full", 0.8), _summary("auto", "full+fixmatch", 0.9))],
                               "auroc_macro", "strategy", ci=True, mean_row=True)
    assert text.splitlines()[2] == "| busi (258) | 10 per class (30) | 0.800 ± 0.010 [0.700, 0.900] | **0.900 ± 0.010 [0.800, 1.000]** |"
    assert text.splitlines()[3] == "| mean of 1 rows | | 0.800 | **0.900** |"


def test_a_single_seed_shows_no_spread(results_table):
    text = results_table.table([_report(_summary("auto", "full", 0.8, sd=math.nan))], "auroc_macro", "init", ci=False)
    assert text.splitlines()[2] == "| busi (258) | 10 per class (30) | 0.800 |"


def test_two_results_for_one_cell_are_refused(results_table):
    # strategies as rows are not shown with --columns init: printing either result would hide the other
    report = _report(_summary("auto", "full", 0.8), _summary("auto", "full+fixmatch", 0.9))
    with pytest.raises(ValueError, match="two results for the cell"):
        results_table.table([report], "auroc_macro", "init", ci=False)


def test_a_labelled_control_study_gets_its_own_column(results_table, monkeypatch):
    # the same strategy in a control study (one setting changed, its own folder) would be refused as
    # two results for one cell; --study-label gives it a column of its own
    base = _report(_summary("auto", "full", 0.8), _summary("auto", "full+fixmatch", 0.9), out="runs/semi")
    control = _report(_summary("auto", "full+fixmatch", 0.85), out="runs/semi_samesteps")
    with pytest.raises(ValueError, match="two results for the cell"):
        results_table.table([base, control], "auroc_macro", "strategy", ci=False)
    monkeypatch.setitem(results_table.STUDY_LABELS, "semi_samesteps", "lambda_u 0")
    lines = results_table.table([base, control], "auroc_macro", "strategy", ci=False).splitlines()
    assert lines[0] == "| target (test images) | training images | full | full+fixmatch | full+fixmatch (lambda_u 0) |"
    assert lines[2] == "| busi (258) | 10 per class (30) | 0.800 ± 0.010 | **0.900 ± 0.010** | 0.850 ± 0.010 |"


def test_a_study_label_naming_no_report_or_without_strategy_columns_is_refused(results_table, monkeypatch):
    # Regression (hostile-user probe): --study-label with a typo in the folder name, or without
    # --columns strategy, was ignored without a word.
    reports = [_report(_summary("auto", "full", 0.8), out="runs/semi"),
               _report(_summary("auto", "full+fixmatch", 0.85), out="runs/semi_samesteps")]
    monkeypatch.setitem(results_table.STUDY_LABELS, "semi_samestep", "lambda_u 0")
    with pytest.raises(ValueError, match="--study-label semi_samestep names no given report's study folder "
                                         r"\(theirs: semi, semi_samesteps\)"):
        results_table.check_study_labels(reports, "strategy")
    monkeypatch.setattr(results_table, "STUDY_LABELS", {"semi_samesteps": "lambda_u 0"})
    results_table.check_study_labels(reports, "strategy")
    with pytest.raises(ValueError, match="add --columns strategy"):
        results_table.check_study_labels(reports, "init")


def test_unreadable_foreign_or_metricless_reports_are_one_line_errors(results_table, tmp_path):
    # Regression (hostile-user probe): a missing or broken file, a JSON that is no study report and
    # a report without the metric (a segmentation study) were tracebacks.
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "list.json").write_text("[1]")
    for name, says in (("missing.json", "cannot read it as a report.json"), ("bad.json", "cannot read it"),
                       ("list.json", "not a report.json of openmednet study")):
        with pytest.raises(ValueError, match=f"{name}: {says}"):
            results_table.load_report(tmp_path / name)
    seg = _report({**{k: v for k, v in _summary("auto", "full", 0.8).items() if k != "auroc_macro"},
                   "dice_mean": {"mean": 0.5, "sd": 0.1, "ci_low": 0.4, "ci_high": 0.6}}, out="runs/seg")
    with pytest.raises(ValueError, match="the study runs/seg has no auroc_macro \\(its metrics: dice_mean\\)"):
        results_table.table([seg], "auroc_macro", "init", ci=False)


def test_segmentation_studies_are_tabled_by_dice_and_empty_reports_refused(results_table):
    """Regression (hostile-user probe): a segmentation study could not be tabled (--metric refused
    dice_mean), and a report of 0 finished arms printed a header over nothing, exit 0."""
    seg = _report({**{k: v for k, v in _summary("auto", "full", 0.8).items() if k != "auroc_macro"},
                   "dice_mean": {"mean": 0.5, "sd": 0.1, "ci_low": 0.4, "ci_high": 0.6}}, out="runs/seg")
    assert "dice_mean" in results_table.METRICS
    table = results_table.table([seg], "dice_mean", "init", ci=True)
    assert "0.500 ± 0.100 [0.400, 0.600]" in table
    with pytest.raises(ValueError, match="give --metric dice_mean"):
        results_table.table([seg], "auroc_macro", "init", ci=False)
    empty = {"arms": [], "summary": [], "config": {"out": "runs/e"}, "missing": [{"target": "busi"}] * 3}
    with pytest.raises(ValueError, match=r"no finished arm in these reports \(3 missing"):
        results_table.table([empty], "auroc_macro", "init", ci=False)
