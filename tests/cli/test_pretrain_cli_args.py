"""``openmednet pretrain`` flags reach ``PretrainConfig`` verbatim (no YAML reinterpretation)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from openmednet.cli.app import app


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list:
    """The configs ``run_pretraining`` would have run (it is replaced: nothing trains)."""
    from openmednet.engine import pretrain

    configs: list = []
    monkeypatch.setattr(pretrain, "run_pretraining", lambda cfg: configs.append(cfg) or [])
    return configs


def test_paths_stay_strings(captured: list):
    # Unquoted, YAML read "runs/a #1" as "runs/a" (a comment) and "2024" as an int.
    result = CliRunner().invoke(app, ["pretrain", "--corpus", "2024", "--out", "runs/a #1", "--objective", "simclr"])
    assert result.exit_code == 0, result.output
    (cfg,) = captured
    assert cfg.corpus == "2024" and cfg.out == "runs/a #1" and cfg.objective.kind == "simclr"
    assert "nothing to do: runs/a #1" in result.output


def test_flags_win_over_set(captured: list):
    result = CliRunner().invoke(app, ["pretrain", "--set", "out=elsewhere", "--set", "optim.lr=0.1", "--out",
                                      "run: x", "--corpus", "c", "--resume"])
    assert result.exit_code == 0, result.output
    (cfg,) = captured
    assert (cfg.out, cfg.optim.lr, cfg.resume) == ("run: x", 0.1, True)
