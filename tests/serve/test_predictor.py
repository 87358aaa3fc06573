"""Predictor: the model card's contract applied to real PNG/JPEG/DICOM/NIfTI files."""

from __future__ import annotations

import csv
import io
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from openmednet import create_model
from openmednet.data.datasets import LabelledDataset
from openmednet.data.readers import read_images
from openmednet.data.transforms import build_transform
from openmednet.serve.predictor import (
    ChannelConversionWarning,
    Predictor,
    TooManyImagesError,
    load_model,
    save_predictions_csv,
)

LABELS = ("no", "yes")  # as saved by the model_dir fixture


def test_probabilities_equal_the_finetuning_eval_pipeline(predictor, model_dir, real_files):
    """Same numbers as fine-tuning's evaluation data path: LabelledDataset(resize_mode="crop") + eval transform."""
    (pred,) = list(predictor.predict_path(real_files["gray"]))
    model = load_model(model_dir)
    ((array, _),) = list(read_images(real_files["gray"]))
    assert array.shape != (64, 64)  # the resize is exercised
    dataset = LabelledDataset([(array, "no")], channels=1, image_size=64, class_names=list(LABELS),
                              transform=build_transform(model.pretrained_cfg, train=False), resize_mode="crop")
    x, _ = dataset[0]
    with torch.no_grad():
        expected = torch.softmax(model(x[None]), dim=1)[0].tolist()
    assert list(pred.probabilities) == list(LABELS)
    np.testing.assert_allclose(list(pred.probabilities.values()), expected, rtol=0, atol=1e-6)
    assert pred.label == LABELS[int(np.argmax(expected))]
    assert pred.notes == []


def test_colour_to_gray_is_warned_and_noted(predictor, real_files):
    with pytest.warns(ChannelConversionWarning, match="colour discarded"):
        (pred,) = list(predictor.predict_path(real_files["color"]))
    assert pred.notes == ["rgb->gray (colour discarded)"]
    gray = np.asarray(Image.open(real_files["color"]).convert("L"))  # ITU-R 601 luma, as documented
    (expected,) = predictor.predict_arrays([gray])
    assert pred.probabilities == pytest.approx(expected.probabilities, abs=1e-6)


def test_gray_model_gets_gray_for_gray_content_saved_as_rgb(predictor, real_files):
    image = np.asarray(Image.open(real_files["rgb_gray"]))
    assert image.ndim == 3
    with pytest.warns(ChannelConversionWarning, match="rgb->gray"):
        (pred,) = predictor.predict_arrays([image])
    assert pred.notes[0].startswith("rgb->gray")


def test_folder_of_dicom_and_nifti_with_cams(predictor, real_files, tmp_path):
    shutil.copy(real_files["dicom"], tmp_path / "ct.dcm")
    shutil.copy(real_files["nifti"], tmp_path / "brain.nii")
    (tmp_path / "notes.txt").write_text("not an image")  # ignored: no reader handles it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no conversion, nothing skipped
        preds = list(predictor.predict_path(tmp_path, cam=True, batch_size=4))
    nifti_slices = len(list(read_images(real_files["nifti"])))
    assert [p.source.rsplit("/", 1)[-1] for p in preds] == ["brain.nii"] * nifti_slices + ["ct.dcm"]
    assert len({p.frame for p in preds[:-1]}) == nifti_slices  # one prediction per slice
    for p in preds:
        assert sum(p.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert p.cam.shape == p.image.shape == (64, 64)
        assert 0.0 <= p.cam.min() and p.cam.max() <= 1.0
        assert Image.open(io.BytesIO(p.overlay_png())).size == (256, 256)


def test_model_view_is_what_the_model_saw(predictor, real_files):
    (array, _), = list(read_images(real_files["dicom"]))
    x, _ = predictor.preprocess(array)
    view = predictor.model_view(x)
    renormalised = (torch.from_numpy(view).float()[None] / 255 - 0.5) / 0.25
    torch.testing.assert_close(renormalised, x, rtol=0, atol=0.5 / 255 / 0.25 + 1e-6)


def test_csv(predictor, real_files, tmp_path):
    preds = list(predictor.predict_path([real_files["gray"], real_files["dicom"]]))
    assert save_predictions_csv(preds, tmp_path / "p.csv", predictor.label_names) == 2
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert list(rows[0]) == ["source", "frame", "label", "p_no", "p_yes", "notes"]
    assert [r["source"] for r in rows] == [str(real_files["gray"]), str(real_files["dicom"])]
    for r, p in zip(rows, preds):
        assert float(r["p_yes"]) == pytest.approx(p.probabilities["yes"], abs=1e-6)


def test_bad_file_is_skipped_with_a_warning(predictor, real_files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(real_files["gray"].read_bytes()[:200])  # a truncated real JPEG named .png
    with pytest.warns(UserWarning, match="skipped .*broken.png"):
        preds = list(predictor.predict_path([bad, real_files["gray"]]))
    assert len(preds) == 1


def test_upload_limits(predictor, real_files):
    data = real_files["nifti"].read_bytes()
    with pytest.raises(TooManyImagesError, match="more than the limit of 3"):
        predictor.predict_bytes(data, "brain.nii", cam=False, max_frames=3)
    dicom = real_files["dicom"].read_bytes()
    (pred,) = predictor.predict_bytes(dicom, "IM0001", cam=False)  # no suffix: sniffed as DICOM
    assert pred.source == "IM0001"
    from openmednet.data.readers import SkipImage

    with pytest.raises(SkipImage, match="decompression_bomb"):
        predictor.predict_bytes(real_files["gray"].read_bytes(), "big.jpeg", max_pixels=100 * 100)


def test_contract_errors(model_dir):
    with pytest.raises(ValueError, match="num_classes=0"):
        Predictor(create_model("mednet_test", num_classes=0))
    model = load_model(model_dir)
    with pytest.raises(ValueError, match="intensity 'ct_window"):
        Predictor(model, model.pretrained_cfg.replace(intensity="ct_window(40,400)"))
    with pytest.raises(ValueError, match="3 label names for a model with 2 classes"):
        Predictor(model, label_names=("a", "b", "c"))
    with pytest.raises(FileNotFoundError, match="neither a registered model"):
        load_model("no_such_model_dir")


def test_overlay_names_are_unique(predictor, real_files, tmp_path):
    from openmednet.serve.predictor import write_cam_overlays

    gray = np.asarray(Image.open(real_files["gray"]))
    preds = predictor.predict_arrays([gray] * 3, sources=["a/scan.png", "b/scan.png", "c/vol.nii.gz"],
                                     frames=[0, 0, 4], cam=True)
    paths = write_cam_overlays(preds, tmp_path)
    assert [p.name for p in paths] == ["scan_cam.png", "scan_2_cam.png", "vol_f4_cam.png"]
    assert all(Image.open(p).format == "PNG" for p in paths)
