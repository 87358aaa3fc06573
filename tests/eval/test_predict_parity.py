"""A fine-tuned run's ``predictions.csv`` is what ``openmednet predict`` says about the same files.

Fine-tuning scores its test split with ``EvalInputs`` built from the run's contract; ``predict``
builds it from the saved model card. Real images: the embedded PneumoniaMNIST demo sample
(CC BY 4.0, ``openmednet/assets/demo``) written as PNG files, so the predict side reads files
exactly as a user's would. A colour copy of the test files checks the channel conversion path too.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.engine.inputs import EvalInputs
from openmednet.eval.finetune import FinetuneConfig, run_finetune
from openmednet.quickstart import demo_path

NAMES = {0: "normal", 1: "pneumonia"}


def _demo_as_png(root: Path, per_class: int = 20) -> Path:
    """``root/<class>/<i>.png`` from the demo's training images (class sub-folders, no split column)."""
    data = np.load(demo_path())
    images, labels = data["train_images"], data["train_labels"].ravel()
    for k, name in NAMES.items():
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(labels == k)[:per_class]:
            Image.fromarray(images[i]).save(root / name / f"{i}.png")
    return root


def _read(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("parity")
    data = _demo_as_png(tmp / "target")
    torch.manual_seed(0)
    cfg = FinetuneConfig(data=data, out=tmp / "run", init="scratch:mednet_test", epochs=1, patience=1,
                         image_size=32, batch_size=8, n_boot=0, given_splits=False, test_fraction=0.3)
    run_finetune(cfg)
    return data, tmp / "run"


def test_predict_cli_reproduces_the_runs_test_predictions(run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = run
    rows = _read(out / "predictions.csv")
    assert len(rows) >= 10
    files = [str(data / r["id"]) for r in rows]
    result = CliRunner().invoke(app, ["predict", str(out / "model"), *files, "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    predicted = {r["source"]: r for r in _read(tmp_path / "p.csv")}
    assert set(predicted) == set(files)
    for r, f in zip(rows, files, strict=True):
        p = predicted[f]
        ours = np.array([float(r[f"prob_{n}"]) for n in NAMES.values()])
        theirs = np.array([float(p[f"p_{n}"]) for n in NAMES.values()])
        # predict prints 6 decimals; the run's CSV is the float64 softmax of the same float32 logits.
        np.testing.assert_allclose(theirs, ours, atol=1e-6, err_msg=f)
        assert p["label"] == list(NAMES.values())[int(np.argmax(ours))] and p["notes"] == ""


def test_colour_copies_go_through_the_same_pipeline(run: tuple[Path, Path], tmp_path: Path) -> None:
    # The same gray pixels saved as RGB: predict converts them back (losslessly) and notes it.
    from openmednet.serve.predictor import Predictor

    data, out = run
    rows = _read(out / "predictions.csv")[:4]
    copies = []
    for r in rows:
        gray = np.asarray(Image.open(data / r["id"]))
        copies.append(tmp_path / Path(r["id"]).name)
        Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(copies[-1])
    predictor = Predictor.from_spec(out / "model")
    with pytest.warns(UserWarning, match="converted rgb->gray"):
        preds = list(predictor.predict_path(copies))
    for r, p in zip(rows, preds, strict=True):
        np.testing.assert_allclose([p.probabilities[n] for n in NAMES.values()],
                                   [float(r[f"prob_{n}"]) for n in NAMES.values()], atol=1e-6)
        assert p.notes == ["rgb->gray"]


def test_eval_inputs_follow_the_contract() -> None:
    contract = {"input_size": (3, 8, 8), "mean": (0.5,), "std": (0.25,)}
    inputs = EvalInputs(contract)
    image = np.full((16, 32), 255, dtype=np.uint8)  # gray, wide: shorter side 16 -> 8, centre crop
    prepared, converted = inputs.prepare(image)
    assert prepared.shape == (8, 8, 3) and converted
    x = inputs(image)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full((3, 8, 8), 2.0))  # (1 - 0.5) / 0.25
    with pytest.raises(ValueError, match="input_size must be"):
        EvalInputs({"input_size": (3, 8, 16), "mean": (0.5,), "std": (0.25,)})
