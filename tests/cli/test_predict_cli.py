"""CLI: ``openmednet predict`` / ``export`` on real files, round trip through the exported folder."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from openmednet import create_model
from openmednet.cli.app import app
from openmednet.export.safetensors import export_safetensors

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    export_safetensors(create_model("mednet_test", num_classes=2), out, label_names=("normal", "pneumonia"))
    return out


@pytest.fixture()
def scans(shared_data, tmp_path):
    """A folder with a real chest X-ray JPEG, a real CT DICOM and a text file to pass over."""
    folder = tmp_path / "scans"
    folder.mkdir()
    xray = sorted((shared_data / "gray/pretrain/chest_xray_pneumonia/original_subset/NORMAL").glob("*.jp*g"))[:1]
    if not xray:
        pytest.skip("no chest X-ray JPEG in the shared data")
    shutil.copy(xray[0], folder / "xray.jpeg")
    shutil.copy(shared_data / "formats/pydicom-3.0.2/CT_small.dcm", folder / "ct.dcm")
    (folder / "README.txt").write_text("not an image")
    return folder


def _read_csv(path):
    return list(csv.DictReader(path.open()))


def test_predict_folder_with_csv_and_cams(model_dir, scans, tmp_path):
    result = runner.invoke(app, ["predict", str(model_dir), str(scans), "--out", str(tmp_path / "p.csv"),
                                 "--cam", str(tmp_path / "cams")])
    assert result.exit_code == 0, result.output
    rows = _read_csv(tmp_path / "p.csv")
    assert [r["source"] for r in rows] == [str(scans / "ct.dcm"), str(scans / "xray.jpeg")]
    for r in rows:
        assert float(r["p_normal"]) + float(r["p_pneumonia"]) == pytest.approx(1.0, abs=2e-6)
        assert r["label"] == max(("normal", "pneumonia"), key=lambda n: float(r[f"p_{n}"]))
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["ct_cam.png", "xray_cam.png"]
    assert Image.open(tmp_path / "cams" / "ct_cam.png").size == (256, 256)
    assert "2 predictions written" in result.output


def test_export_round_trip(model_dir, scans, tmp_path):
    onnx_file, copy_dir = tmp_path / "m.onnx", tmp_path / "copy"
    result = runner.invoke(app, ["export", str(model_dir), "--onnx", str(onnx_file), "--exporter", "torchscript",
                                 "--safetensors", str(copy_dir)])
    assert result.exit_code == 0, result.output
    assert "onnxruntime check passed" in result.output
    # The exported folder predicts exactly what the original does.
    outs = []
    for source in (model_dir, copy_dir):
        csv_path = tmp_path / f"{source.name}.csv"
        assert runner.invoke(app, ["predict", str(source), str(scans), "--out", str(csv_path)]).exit_code == 0
        outs.append([(r["p_normal"], r["p_pneumonia"]) for r in _read_csv(csv_path)])
    assert outs[0] == outs[1]
    # And the ONNX file takes any batch size.
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": np.zeros((3, 1, 64, 64), np.float32)})
    assert logits.shape == (3, 2)


def test_user_errors(model_dir, tmp_path):
    result = runner.invoke(app, ["export", str(model_dir)])
    assert isinstance(result.exception, ValueError) and "nothing to export" in str(result.exception)
    result = runner.invoke(app, ["predict", str(model_dir), str(tmp_path / "missing.png")])
    assert isinstance(result.exception, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["predict", str(model_dir), str(tmp_path / "empty")])
    assert isinstance(result.exception, ValueError) and "no readable image" in str(result.exception)


def test_predict_streams_overlays_and_bounds_the_table(model_dir, tmp_path, monkeypatch):
    """Overlays are written as predictions come and their images dropped; the table keeps 50 rows."""
    import logging
    import warnings

    from openmednet.serve.predictor import (
        ChannelConversionWarning,
        Prediction,
        Predictor,
    )

    cams, made = tmp_path / "cams", []

    def fake_predict_path(self, inputs, cam=False, batch_size=16, exclude=()):
        assert cam
        for i in range(60):
            if made:  # the CLI has handled the previous prediction before asking for this one
                assert (cams / f"img{i - 1}_cam.png").is_file()
                assert made[-1].image is None and made[-1].cam is None
            warnings.warn("model expects 1 channel(s), image has 3: converted rgb->gray", ChannelConversionWarning)
            made.append(Prediction(source=f"/in/img{i}.png", frame=0, probabilities={"normal": 0.25, "pneumonia": 0.75},
                                   label="pneumonia", notes=["rgb->gray"], image=np.zeros((64, 64), np.uint8),
                                   cam=np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)))
            yield made[-1]

    monkeypatch.setattr(Predictor, "predict_path", fake_predict_path)
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    log = logging.getLogger("openmednet.predict")  # not the root logger: the CLI resets its handlers
    log.addHandler(handler)
    try:
        result = runner.invoke(app, ["predict", str(model_dir), str(tmp_path), "--out", str(tmp_path / "p.csv"),
                                     "--cam", str(cams)])
    finally:
        log.removeHandler(handler)
    assert result.exit_code == 0, result.output
    assert len(_read_csv(tmp_path / "p.csv")) == 60 and len(list(cams.iterdir())) == 60
    assert "img49.png" in result.output and "img50.png" not in result.output
    assert "first 50 of 60 predictions shown" in result.output and "60 predictions written" in result.output
    # One log line for 60 identical conversion warnings.
    assert logged == ["model expects 1 channel(s), image has 3: converted rgb->gray (60 times)"]


def test_the_table_shows_file_names_with_brackets_as_they_are(model_dir, scans, tmp_path):
    # Regression: rich read "[copy]" as markup and the table showed "xray .jpeg".
    folder = tmp_path / "named"
    folder.mkdir()
    shutil.copy(scans / "xray.jpeg", folder / "xray [copy].jpeg")
    result = runner.invoke(app, ["predict", str(model_dir), str(folder), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert "xray [copy].jpeg" in result.output


def test_a_file_name_with_a_carriage_return_cannot_forge_a_row(model_dir, scans, tmp_path):
    # Regression: predict's CSV ended rows in a lone LF, so a CR inside a field went unquoted and
    # "scan\rpatient42.png" read back as two rows, one for a patient42.png that was never given.
    # Every table now has the one format of utils.csv_text (fine-tuning's: CRLF, CR/LF quoted).
    folder = tmp_path / "named"
    folder.mkdir()
    shutil.copy(scans / "xray.jpeg", folder / "scan\rpatient42.jpeg")
    shutil.copy(scans / "xray.jpeg", folder / "plain.jpeg")
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(model_dir), str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["source"] for r in rows] == [str(folder / "plain.jpeg"), str(folder / "scan\rpatient42.jpeg")]
    assert rows[0]["p_normal"] == rows[1]["p_normal"] and out.read_bytes().count(b"\r\n") == 3


def test_a_rerun_does_not_predict_its_own_cam_overlays(model_dir, scans, tmp_path):
    # Regression: with --cam inside the input folder, a second run predicted the first run's overlays.
    for _ in range(2):
        result = runner.invoke(app, ["predict", str(model_dir), str(scans), "--cam", str(scans / "cams"),
                                     "--out", str(tmp_path / "p.csv")])
        assert result.exit_code == 0, result.output
        assert "2 predictions written" in result.output
    assert sorted(p.name for p in (scans / "cams").iterdir()) == ["ct_cam.png", "xray_cam.png"]


def test_out_never_replaces_a_file_that_is_not_an_earlier_predictions_csv(model_dir, scans, tmp_path):
    # Regression (hostile-user probe): 'predict MODEL scans --out MODEL/model.safetensors' replaced
    # the model's weights with the CSV, and --out naming an input image (or a labels.csv, a
    # metrics.json) replaced that file, at the end of the run.
    weights = (model_dir / "model.safetensors").read_bytes()
    image = (scans / "xray.jpeg").read_bytes()
    for out in (model_dir / "model.safetensors", scans / "xray.jpeg"):
        result = runner.invoke(app, ["predict", str(model_dir), str(scans), "--out", str(out)])
        assert isinstance(result.exception, ValueError), result.output
        assert f"--out {out} exists and is not a predictions CSV of an earlier run" in str(result.exception)
    assert (model_dir / "model.safetensors").read_bytes() == weights and (scans / "xray.jpeg").read_bytes() == image
    result = runner.invoke(app, ["predict", str(model_dir), str(scans), "--out", str(tmp_path)])
    assert isinstance(result.exception, ValueError) and "is a folder: give a file path" in str(result.exception)
    for _ in range(2):  # a re-run replaces its own CSV, as before
        result = runner.invoke(app, ["predict", str(model_dir), str(scans), "--out", str(tmp_path / "p.csv")])
        assert result.exit_code == 0, result.output
    assert len(_read_csv(tmp_path / "p.csv")) == 2


def test_export_onnx_never_replaces_a_file_that_is_not_onnx(model_dir, tmp_path):
    # Regression (hostile-user probe): 'export MODEL --onnx MODEL/model.safetensors' replaced the
    # weights it exported with the ONNX file; an --onnx folder failed only after the export.
    weights = (model_dir / "model.safetensors").read_bytes()
    result = runner.invoke(app, ["export", str(model_dir), "--onnx", str(model_dir / "model.safetensors"), "--no-check"])
    assert isinstance(result.exception, ValueError) and "exists and is not an .onnx file" in str(result.exception)
    assert (model_dir / "model.safetensors").read_bytes() == weights
    result = runner.invoke(app, ["export", str(model_dir), "--onnx", str(tmp_path), "--no-check"])
    assert isinstance(result.exception, ValueError) and "is a folder: give a file path" in str(result.exception)
