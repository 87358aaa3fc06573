"""``openmednet study`` and ``quickstart`` exit codes: failed arms must not look like a success to a script."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.cli.study import EXIT_FAILED_ARMS


def _study_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"out: {tmp_path / 'out'}\ntargets: [{{name: a, data: {tmp_path}}}]\ninits: [scratch:mednet_test]\n")
    return path


@pytest.mark.parametrize("failed, code", [([], 0), ([{"seed": 0, "error": "ValueError: image_size 7 is below"}], 3)])
def test_failed_arms_exit_3_after_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failed: list, code: int) -> None:
    # Regression: a study whose every arm failed printed "0 arms, 1 failed" and exited 0.
    from openmednet.eval import study

    result = {"arms": [], "failed": failed, "refused": [], "summary": []}
    monkeypatch.setattr(study, "run_study", lambda cfg, **kwargs: result)
    run = CliRunner().invoke(app, ["study", "--config", str(_study_yaml(tmp_path))])
    assert run.exit_code == code and EXIT_FAILED_ARMS == 3, run.output
    assert f"0 arms, {len(failed)} failed" in run.output
    assert ("exit code 3" in run.output) == bool(failed)


def test_quickstart_names_failed_arms_and_exits_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: `quickstart --image-size 7` failed every arm, printed an empty table and exited 0.
    from openmednet import quickstart

    failed = [{"init": "efficientnet_lite0", "budget": "frac1", "seed": 0,
               "error": "ValueError: image_size 7 is below the model's minimum 32"}]
    result = {"rows": [], "refused": [], "leakage_checks": [], "report_md": tmp_path / "report.md",
              "report_json": tmp_path / "report.json", "jobs": 1, "elapsed_s": 3.0, "threads": 1,
              "study": {"failed": failed}}
    monkeypatch.setattr(quickstart, "run_quickstart", lambda *args, **kwargs: result)
    run = CliRunner().invoke(app, ["quickstart", "--out", str(tmp_path), "--quiet"])
    assert run.exit_code == EXIT_FAILED_ARMS, run.output
    assert "failed: efficientnet_lite0 frac1 seed 0: ValueError: image_size 7" in " ".join(run.output.split())


def test_report_only_with_a_part_missing_exits_3(brain_subset, tmp_path: Path) -> None:
    # Regression: --report-only over parts of which one was not run wrote a partial report ("1
    # missing") and exited 0, so a pipeline merging the parts went on as if the grid were complete.
    data = tmp_path / "brain"
    data.mkdir()
    brain_subset(data)
    config = tmp_path / "study.yaml"
    config.write_text(f"out: {tmp_path / 'out'}\ntargets: [{{name: brain, data: {data}, given_splits: false}}]\n"
                      "inits: [scratch:mednet_test]\nseeds: [0, 1]\nfinetune: {epochs: 1, image_size: 32, "
                      "batch_size: 8, n_boot: 0, test_fraction: 0.25, max_side: 64}\n")
    study = ["study", "--config", str(config)]
    runner = CliRunner()
    assert runner.invoke(app, [*study, "--num-parts", "2", "--part", "0"]).exit_code == 0
    merged = runner.invoke(app, [*study, "--report-only"])
    assert merged.exit_code == EXIT_FAILED_ARMS and "1 arm(s) missing" in merged.output, merged.output
    assert (tmp_path / "out" / "report.md").is_file()  # written all the same
    assert runner.invoke(app, [*study, "--num-parts", "2", "--part", "1"]).exit_code == 0
    merged = runner.invoke(app, [*study, "--report-only"])
    assert merged.exit_code == 0 and "2 arms, 0 failed, 0 refused, 0 missing" in merged.output, merged.output
