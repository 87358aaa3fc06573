"""``openmednet finetune`` through Typer's CliRunner on a tiny real target."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from openmednet.cli.app import app


def test_finetune_cli_runs_and_reports(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "gray/targets/openi_abd_vs_cxr"
    rows = [r for r in csv.DictReader((root / "labels.csv").read_text().splitlines()) if r["split"] == "train"]
    rows = [r for r in rows if r["label"] == "chest"][:8] + [r for r in rows if r["label"] == "abdomen"][:8]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        f.write("path,label,split,group\n")
        f.writelines(f"{Path(r['path']).name},{r['label']},,\n" for r in rows)
    for r in rows:  # copies: a source's paths must stay inside its folder (issue 14 item 6)
        shutil.copyfile(root / r["path"], tmp_path / Path(r["path"]).name)
    result = CliRunner().invoke(app, [
        "finetune", "--data", str(tmp_path), "--init", "scratch:mednet_test", "--out", str(tmp_path / "run"),
        "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--strategy", "linear_probe",
        "--set", "n_boot=10", "--set", "test_fraction=0.25",
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["model"]["strategy"] == "linear_probe"
    assert metrics["config"]["test_fraction"] == 0.25
    assert f"| auroc_macro | {metrics['test']['auroc_macro']:.3f}" in result.output


def test_finetune_cli_needs_data_and_out() -> None:
    result = CliRunner().invoke(app, ["finetune", "--init", "auto"])
    assert result.exit_code != 0
    assert "give --data and --out" in str(result.exception)
