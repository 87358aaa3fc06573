"""``export --safetensors`` copies a model with its card's provenance, also into its own folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from openmednet import create_model
from openmednet.cli.app import app
from openmednet.models import save_pretrained


def _card(folder: Path) -> dict:
    card = json.loads((folder / "model_card.json").read_text())
    card["provenance"].pop("created")
    return card


@pytest.fixture()
def run_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    folder = tmp_path / "run/model"
    save_pretrained(create_model("mednet_test", num_classes=2), folder, data=("busi",), objective="finetune:full",
                    epochs=3, metrics={"auroc_macro": 0.75}, details={"note": "kept"}, label_names=("a", "b"))
    return folder


@pytest.mark.parametrize("into", ["copy", "in_place"])
def test_export_keeps_data_metrics_and_details(run_model: Path, tmp_path: Path, into: str) -> None:
    # Regression: the exported card had data [], objective "", epochs null, metrics {} and no
    # details, and exporting into the model's own folder erased them from the original.
    before = _card(run_model)
    out = run_model if into == "in_place" else tmp_path / "copy"
    result = CliRunner().invoke(app, ["export", str(run_model), "--safetensors", str(out)])
    assert result.exit_code == 0, result.output
    after = _card(out)
    assert after == before
    assert after["metrics"] == {"auroc_macro": 0.75} and after["provenance"]["details"] == {"note": "kept"}
    assert after["provenance"]["data"] == ["busi"] and after["provenance"]["epochs"] == 3


def test_exported_shipped_weights_keep_their_corpus_fingerprint(tmp_path: Path) -> None:
    from openmednet.export.safetensors import export_safetensors
    from openmednet.models import get_pretrained_cfg, read_model_card
    from openmednet.serve.predictor import load_model

    shipped = get_pretrained_cfg("mednet_gray")
    export_safetensors(load_model("mednet_gray"), tmp_path)
    card = read_model_card(tmp_path)  # verifies the copied weights
    assert card.corpus_fingerprint_sha256 == shipped.meta["corpus_fingerprint"]["sha256"]
    assert (tmp_path / card.corpus_fingerprint).is_file() and card.details == shipped.meta["details"]
    assert list(card.data) == shipped.meta["data"] and card.objective == shipped.meta["objective"]
