"""``openmednet pretrain`` through the Typer app (kept here to share the tiny real corpus fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openmednet.cli.app import app


def test_pretrain_cli_runs_and_writes_the_run(tiny_corpus: Path, tmp_path: Path):
    out = tmp_path / "run"
    args = ["pretrain", "--corpus", str(tiny_corpus), "--out", str(out), "--objective", "supervised",
            "--set", "model.name=mednet_test", "--set", "data.image_size=32", "--set", "data.batch_size=8",
            "--set", "data.num_workers=0", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
            "--set", "train.progress=false", "--set", "monitor.k=3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"done: {out} (epoch 0:" in result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "loss.png", "checkpoint-last.pt", "backbone"} <= names
    epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["kind"] == "epoch" and epoch["step"] == 2 and 0.0 <= epoch["knn/top1"] <= 1.0
    card = json.loads((out / "backbone" / "model_card.json").read_text())
    assert card["architecture"] == "mednet_test" and card["provenance"]["objective"] == "supervised/union"
    assert card["model_args"]["width_mult"] == 0.25  # the architecture's default, not overridden


def test_pretrain_cli_unknown_key(tiny_corpus: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["pretrain", "--corpus", str(tiny_corpus), "--out", str(tmp_path),
                                      "--set", "optim.lrr=0.1"])
    assert isinstance(result.exception, KeyError)
    assert "did you mean 'lr'" in str(result.exception)


def test_pretrain_cli_channel_mismatch(tiny_corpus: Path, tmp_path: Path):
    result = CliRunner().invoke(app, ["pretrain", "--corpus", str(tiny_corpus), "--out", str(tmp_path / "r"),
                                      "--set", "model.name=mednet_color"])
    assert isinstance(result.exception, ValueError)
    with pytest.raises(ValueError, match="use mednet_gray"):
        raise result.exception


@pytest.mark.parametrize("target,label,projector_dims", [
    ("pooled", "supervised/union+distill(efficientnet_lite0)", 2),
    ("map", "supervised/union+distill(efficientnet_lite0, map)", 4),
])
def test_pretrain_supervised_plus_distill_runs_and_keeps_the_teacher_out(
    tiny_corpus: Path, tmp_path: Path, target: str, label: str, projector_dims: int
):
    from openmednet.engine.checkpoint import load_checkpoint

    out = tmp_path / "run"
    args = ["pretrain", "--corpus", str(tiny_corpus), "--out", str(out), "--objective", "supervised+distill",
            "--set", "model.name=mednet_test", "--set", "data.image_size=32", "--set", "data.batch_size=8",
            "--set", "data.num_workers=0", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
            "--set", "train.progress=false", "--set", "monitor.enabled=false", "--set", "train.precision=fp32",
            "--set", "objective.distill_hidden_dim=32", "--set", f"objective.distill_target={target}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r.get("kind") == "epoch"][-1]
    assert epoch["train/distill_loss"] > 0 and epoch["train/sup_loss"] > 0
    card = json.loads((out / "backbone" / "model_card.json").read_text())
    assert card["provenance"]["objective"] == label
    state = load_checkpoint(out / "checkpoint-last.pt")["model"]
    assert not any("teacher" in k for k in state) and any(k.startswith("distill.projector") for k in state)
    assert state["distill.projector.0.weight"].dim() == projector_dims  # linear layers vs 1x1 convolutions


def test_model_init_starts_from_a_saved_backbone_and_refuses_another_width(tiny_corpus: Path, tmp_path: Path):
    from openmednet.engine.pretrain import ModelSection, PretrainConfig, build_backbone
    from openmednet.models import load_pretrained

    out = tmp_path / "stage64"
    args = ["pretrain", "--corpus", str(tiny_corpus), "--out", str(out), "--objective", "supervised",
            "--set", "model.name=mednet_test", "--set", "data.image_size=32", "--set", "data.batch_size=8",
            "--set", "data.num_workers=0", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2",
            "--set", "train.progress=false", "--set", "monitor.enabled=false", "--set", "train.precision=fp32"]
    assert CliRunner().invoke(app, args).exit_code == 0
    saved = load_pretrained(out / "backbone", num_classes=0).state_dict()
    cfg = PretrainConfig(model=ModelSection(name="mednet_test", init=str(out / "backbone")))
    started = build_backbone(cfg, channels=1).state_dict()
    assert started.keys() == saved.keys()
    assert all(torch.equal(started[k], saved[k]) for k in saved)
    with pytest.raises(ValueError, match="set model.name/width_mult to match"):
        build_backbone(PretrainConfig(model=ModelSection(name="mednet_test", width_mult=0.5, init=str(out / "backbone"))), 1)
