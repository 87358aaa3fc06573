"""`openmednet predict` on a real 1-epoch segmentation run (lgg_flair, scratch mednet_test, 32 px):
masks at the original size, equal to fine-tuning's own test predictions; skipped files; errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from openmednet import create_model
from openmednet.cli.app import app
from openmednet.data.readers import read_images
from openmednet.eval.segmentation import upsample_logits
from openmednet.export.safetensors import export_safetensors
from openmednet.serve.predictor import load_predictor

runner = CliRunner()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("classifier")
    export_safetensors(create_model("mednet_test", num_classes=2), out, label_names=("no", "yes"))
    return out


@pytest.fixture(scope="module")
def run(seg_subset, tmp_path_factory):
    data = seg_subset(tmp_path_factory.mktemp("lgg"), patients=4)
    out = tmp_path_factory.mktemp("seg") / "run"
    result = runner.invoke(app, ["finetune", "--task", "segmentation", "--data", str(data), "--init", "scratch:mednet_test",
                                 "--out", str(out), "--epochs", "1", "--image-size", "32", "--batch-size", "8",
                                 "--set", "n_boot=0"])
    assert result.exit_code == 0, result.output
    return out


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_card_records_the_run_size_and_task(run):
    # Regression: the card kept the init's 64 px contract although the run trained at 32 px.
    card = json.loads((run / "model" / "model_card.json").read_text())
    assert card["task"] == "segmentation" and card["input_size"] == [1, 32, 32] and card["resize"] == "stretch"


def test_predict_writes_masks_overlays_and_fractions(run, shared_data, tmp_path):
    gray = sorted((shared_data / "seg/gray/lgg_flair/images").rglob("*.jpg"))[:2]
    colour = sorted((shared_data / "seg/color/kvasir_seg/images").rglob("*.jpg"))[:1]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(run), *map(str, gray + colour), str(tmp_path / "in"), "--out", str(out),
                                 "--batch-size", "1"])
    assert result.exit_code == 3, result.output  # one unreadable file skipped: as for classification
    rows = _rows(out / "predictions.csv")
    assert [r["source"] for r in rows] == [str(p) for p in gray + colour]
    segmenter = load_predictor(run / "model")
    for row, path in zip(rows, gray + colour):
        image = next(iter(read_images(path)))[0]
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.shape == image.shape[:2] and mask.dtype == np.uint8 and mask.max() < 2
        assert [int(row["height"]), int(row["width"])] == list(image.shape[:2])
        # The mask is the PyTorch model's argmax on the same preprocessed input, exactly.
        with torch.no_grad():
            logits = segmenter.model(segmenter.preprocess(image)[0][None])
        np.testing.assert_array_equal(mask, upsample_logits(logits, image.shape[:2]).argmax(1)[0].numpy())
        fractions = np.bincount(mask.ravel(), minlength=2) / mask.size
        assert [float(row[f"fraction_{n}"]) for n in ("background", "flair_abnormality")] == pytest.approx(fractions, abs=1e-6)
        assert Image.open(out / row["overlay"]).size == (image.shape[1], image.shape[0])


def test_predict_reproduces_the_runs_test_masks(run, tmp_path):
    """The masks fine-tuning wrote for its test images are what `predict` gives on those files."""
    tests = [r["id"] for r in _rows(run / "splits.csv") if r["split"] == "test"]  # relative to --data
    assert tests
    data = Path(yaml.safe_load((run / "config.yaml").read_text())["data"])
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(run / "model"), *(str(data / i) for i in tests), "--out", str(out)])
    assert result.exit_code == 0, result.output
    by_source = {r["source"]: r for r in _rows(out / "predictions.csv")}
    for path in tests:
        ours = np.asarray(Image.open(out / by_source[str(data / path)]["mask"]))
        theirs = np.asarray(Image.open((run / "predictions" / path).with_suffix(".png")))
        assert (ours == theirs).mean() > 0.999, path  # batch composition may move a tie pixel, no more


def test_user_errors(run, classifier_dir, tmp_path):
    image = next(iter((run / "plots").glob("*.png")))
    result = runner.invoke(app, ["predict", str(run), str(image)])
    assert isinstance(result.exception, ValueError) and "pass --out DIR" in str(result.exception)
    result = runner.invoke(app, ["predict", str(run), str(image), "--out", str(tmp_path / "o"), "--cam", str(tmp_path / "c")])
    assert isinstance(result.exception, ValueError) and "--cam is for classifiers" in str(result.exception)
    # Neither a classification nor a segmentation model: a clear message, not a stack trace.
    result = runner.invoke(app, ["predict", str(image), str(image)])
    assert isinstance(result.exception, ValueError) and "is not a saved model" in str(result.exception)
    result = runner.invoke(app, ["predict", str(run / "plots"), str(image)])
    assert isinstance(result.exception, FileNotFoundError) and "holds no saved model" in str(result.exception)
    # A classifier still writes its CSV of probabilities.
    result = runner.invoke(app, ["predict", str(classifier_dir), str(image), "--out", str(tmp_path / "c.csv")])
    assert result.exit_code == 0, result.output
    assert list(_rows(tmp_path / "c.csv")[0]) == ["source", "frame", "label", "p_no", "p_yes", "notes"]


def test_a_second_predict_into_the_folder_reports_the_earlier_files(run, shared_data, tmp_path):
    # Regression: predicting other images into the same --out left the first run's masks beside
    # the new ones without a word, while predictions.csv listed only the new ones.
    images = sorted((shared_data / "seg/gray/lgg_flair/images").rglob("*.jpg"))[:2]
    out = tmp_path / "out"
    first = runner.invoke(app, ["predict", str(run), str(images[0]), "--out", str(out)])
    assert first.exit_code == 0 and "earlier run" not in first.output
    second = runner.invoke(app, ["predict", str(run), str(images[1]), "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert f"also holds 1 file(s) this run did not write (e.g. {images[0].stem}_mask.png)" in second.output
    assert [r["source"] for r in _rows(out / "predictions.csv")] == [str(images[1])]
    again = runner.invoke(app, ["predict", str(run), str(images[1]), "--out", str(out)])
    assert "also holds 1 file(s)" in again.output  # the same input again: only the first run's file is foreign


def test_a_file_name_with_a_carriage_return_stays_one_row(run, shared_data, tmp_path):
    # Regression: as for classifiers, a CR in a file name split its predictions.csv row in two.
    image = min((shared_data / "seg/gray/lgg_flair/images").rglob("*.jpg"))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a\rb.jpg").write_bytes(image.read_bytes())
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(run), str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["source"] for r in rows] == [str(folder / "a\rb.jpg")] and (out / rows[0]["mask"]).is_file()


def test_a_rerun_into_an_input_folder_does_not_predict_its_own_masks(run, shared_data, tmp_path):
    # Regression: `predict run scans/ --out scans/` run twice predicted the first run's masks and
    # overlays as scans (4 files became 12 rows, with masks of masks).
    scans = tmp_path / "scans"
    scans.mkdir()
    for path in sorted((shared_data / "seg/gray/lgg_flair/images").rglob("*.jpg"))[:2]:
        (scans / path.name).write_bytes(path.read_bytes())
    for _ in range(2):
        result = runner.invoke(app, ["predict", str(run), str(scans), "--out", str(scans)])
        assert result.exit_code == 0, result.output
        assert "2 masks" in result.output
    assert len(_rows(scans / "predictions.csv")) == 2 and len(list((scans / "masks").iterdir())) == 2
