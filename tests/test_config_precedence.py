"""One precedence rule for every command: defaults < YAML < ``--set`` < explicit flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.config import _parse_scalar, cli_overrides


class _Captured(Exception):
    """Raised by the stand-in run function once it has the resolved config: nothing trains."""


def test_cli_overrides_orders_set_before_flags_and_keeps_values_verbatim() -> None:
    items = cli_overrides(["epochs=5"], {"out": Path("runs/a #1"), "seed": None, "data": "2024", "lr": 1e-05,
                                         "resume": True, "unlabelled": [Path("u 1"), "rest_of_train"], "x": []})
    assert items[0] == "epochs=5" and [i.split("=", 1)[0] for i in items[1:]] == ["out", "data", "lr", "resume", "unlabelled"]
    assert [_parse_scalar(i.split("=", 1)[1]) for i in items[1:]] == ["runs/a #1", "2024", 1e-05, True, ["u 1", "rest_of_train"]]


@pytest.fixture
def finetune_config(monkeypatch: pytest.MonkeyPatch) -> list:
    from openmednet.eval import finetune

    seen: list = []

    def capture(cfg, *args, **kwargs):
        seen.append(cfg)
        raise _Captured

    monkeypatch.setattr(finetune, "run_finetune", capture)
    return seen


def test_finetune_flags_beat_set_beats_yaml(finetune_config: list, tmp_path: Path) -> None:
    (tmp_path / "ft.yaml").write_text("epochs: 7\nbatch_size: 4\nlr: 0.3\nseed: 9\n")
    result = CliRunner().invoke(app, ["finetune", "--config", str(tmp_path / "ft.yaml"), "--data", "d", "--out", "o",
                                      "--epochs", "2", "--set", "epochs=5", "--set", "lr=0.5"])
    assert isinstance(result.exception, _Captured), result.output
    (cfg,) = finetune_config
    # flag (2) over --set (5) over YAML (7); --set over YAML; YAML over the default; default.
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed, cfg.patience) == (2, 0.5, 4, 9, 10)


def test_pretrain_flags_beat_set_beats_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from openmednet.engine import pretrain

    seen: list = []
    monkeypatch.setattr(pretrain, "run_pretraining", lambda cfg: seen.append(cfg) or [])
    (tmp_path / "pt.yaml").write_text("out: from_yaml\ntrain: {epochs: 7, seed: 3}\noptim: {lr: 0.3}\n")
    result = CliRunner().invoke(app, ["pretrain", "--config", str(tmp_path / "pt.yaml"), "--corpus", "c",
                                      "--set", "out=from_set", "--set", "train.epochs=5", "--out", "from_flag"])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert (cfg.out, cfg.train.epochs, cfg.train.seed, cfg.optim.lr) == ("from_flag", 5, 3, 0.3)
