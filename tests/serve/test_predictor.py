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


@pytest.mark.parametrize("sources, names", [
    (["a/x.png", "b/x.png", "x_2.png"], ["x", "x_2", "x_2_2"]),
    (["x_2.png", "a/x.png", "b/x.png", "c/x.png"], ["x_2", "x", "x_3", "x_4"]),
    (["v.nii.gz", "v_f1.png", "v.nii.gz"], ["v", "v_f1", "v_2"]),
])
def test_output_names_never_repeat_a_name_given_to_another_file(sources, names):
    # Regression: b/x.png became "x_2" and so did x_2.png: one mask and overlay overwrote the other
    # while predictions.csv listed both rows with the same file.
    from openmednet.serve.predictor import output_name

    used: dict[str, int] = {}
    assert [output_name(s, 0, "", used) for s in sources] == names


# --- review fixes: upload limits, reader choice, hooks, skips, warnings --------------------------


def _gif_bytes(frames: int, side: int = 8) -> bytes:
    images = [Image.fromarray(np.full((side, side), 10 * (i + 1), dtype=np.uint8)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=10)
    return buf.getvalue()


def _nifti_bytes(tmp_path, shape=(16, 16, 20)) -> bytes:
    import nibabel as nib

    data = np.random.default_rng(0).integers(0, 1000, shape).astype(np.int16)  # every slice has content
    nib.save(nib.Nifti1Image(data, affine=np.eye(4)), tmp_path / "v.nii")
    return (tmp_path / "v.nii").read_bytes()


def test_upload_reading_stops_after_max_frames(predictor, tmp_path, monkeypatch):
    """A volume over the frame limit is read up to the first image over it, not to the end."""
    import openmednet.serve.predictor._files as module  # where files are read

    read = []

    def counting(*args, **kwargs):
        for item in read_images(*args, **kwargs):
            read.append(item[1].frame)
            yield item

    monkeypatch.setattr(module, "read_images", counting)
    with pytest.raises(TooManyImagesError, match="v.nii holds 3 or more images, more than the limit of 2"):
        predictor.predict_bytes(_nifti_bytes(tmp_path), "v.nii", cam=False, max_frames=2)
    assert read == [0, 1, 2]  # 20 slices in the file


@pytest.mark.filterwarnings("ignore::openmednet.serve.predictor.ChannelConversionWarning")  # later GIF frames: RGB
def test_multi_frame_gif_is_refused_from_its_frame_count(predictor):
    from openmednet.data.readers import SkipImage

    with pytest.raises(SkipImage, match="6 frames, limit is 5") as info:
        predictor.predict_bytes(_gif_bytes(6), "anim.gif", cam=False, max_frames=5)
    assert info.value.reason == "decompression_bomb"
    assert len(predictor.predict_bytes(_gif_bytes(5), "anim.gif", cam=False, max_frames=5)) == 5


def test_nifti_upload_gets_a_voxel_limit(predictor, tmp_path):
    from openmednet.data.readers import SkipImage

    data = _nifti_bytes(tmp_path)  # 16 x 16 x 20 = 5120 voxels
    # Default: max_pixels * max_frames = 100 * 50 = 5000 voxels < 5120.
    with pytest.raises(SkipImage, match="exceeds 5000 voxels") as info:
        predictor.predict_bytes(data, "v.nii", cam=False, max_pixels=100, max_frames=50)
    assert info.value.reason == "decompression_bomb"
    with pytest.raises(SkipImage, match="exceeds 5119 voxels"):
        predictor.predict_bytes(data, "v.nii", cam=False, max_voxels=5119)
    assert len(predictor.predict_bytes(data, "v.nii", cam=False, max_pixels=256, max_frames=20)) == 20


def test_npz_uploads_are_refused(predictor, tmp_path):
    from openmednet.data.readers import NoReaderError

    buf = io.BytesIO()
    np.savez(buf, train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 1), np.uint8))
    with pytest.raises(NoReaderError):
        predictor.predict_bytes(buf.getvalue(), "pneumoniamnist.npz", cam=False)


@pytest.mark.parametrize("suffix", [".jpe", ".jfif", ".pgm", ".ppm", ".PNG", ".nii.gz", ".dic"])
def test_upload_suffixes_come_from_the_readers(suffix):
    from openmednet.serve.predictor._files import _upload_suffix

    assert _upload_suffix(f"scan{suffix}") == suffix.lower()
    assert _upload_suffix("archive.npz") == _upload_suffix("notes.txt") == ""


def test_pgm_upload_is_read(predictor, real_files):
    buf = io.BytesIO()
    Image.open(real_files["gray"]).convert("L").save(buf, format="PPM")  # binary PGM for mode L
    (pred,) = predictor.predict_bytes(buf.getvalue(), "scan.pgm", cam=False)
    (expected,) = predictor.predict_path(real_files["gray"])
    assert pred.probabilities == pytest.approx(expected.probabilities, abs=1e-6)


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_predictor_leaves_the_model_unchanged(model_dir, real_files):
    import copy

    model = load_model(model_dir)
    first, second = Predictor(model), Predictor(model)  # two predictors must not stack hooks
    gray = np.asarray(Image.open(real_files["gray"]))
    (a,) = first.predict_arrays([gray], cam=True)
    (b,) = second.predict_arrays([gray], cam=True)
    np.testing.assert_array_equal(a.cam, b.cam)
    assert _hooks(model) == 0
    clone = copy.deepcopy(model)  # failed with "cannot pickle '_thread._local'" while a hook held GradCAM
    torch.save(model, io.BytesIO())
    with torch.no_grad():
        x = torch.rand(2, 1, 64, 64)
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_inference_errors_are_not_reported_as_skipped_files(predictor, real_files, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("model failed")

    monkeypatch.setattr(predictor, "predict_arrays", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "skipped ..." warning would fail here
        with pytest.raises(ValueError, match="model failed"):
            list(predictor.predict_path([real_files["gray"], real_files["dicom"]], batch_size=2))


def test_file_failing_half_way_contributes_nothing(predictor, real_files, tmp_path, monkeypatch):
    import openmednet.serve.predictor._files as module  # where files are read
    from openmednet.data.readers import SkipImage

    def half_read(path, *args, **kwargs):
        items = read_images(path, *args, **kwargs)
        yield next(items)  # frame 0 reads, then the file turns out damaged
        raise SkipImage("corrupt", "frame 1 is truncated", path, 1)

    shutil.copy(real_files["gray"], tmp_path / "a_ok.jpeg")
    shutil.copy(real_files["gray"], tmp_path / "b_half.jpeg")
    monkeypatch.setattr(module, "read_images", lambda path, *a, **k: (
        half_read(path, *a, **k) if path.name == "b_half.jpeg" else read_images(path, *a, **k)))
    with pytest.warns(UserWarning, match="skipped .*b_half.jpeg"):
        preds = list(predictor.predict_path(tmp_path))
    assert [p.source.rsplit("/", 1)[-1] for p in preds] == ["a_ok.jpeg"]


def test_conversion_warning_text_does_not_name_the_file(predictor, real_files, caplog):
    data = real_files["color"].read_bytes()
    with caplog.at_level("INFO", logger="openmednet.serve.predictor"), pytest.warns(ChannelConversionWarning) as caught:
        (pred,) = predictor.predict_bytes(data, "patient-4711.jpg", cam=False)
    assert pred.notes == ["rgb->gray (colour discarded)"]
    (warning,) = caught
    # A per-upload text would be a new __warningregistry__ entry for every upload, forever.
    assert str(warning.message) == "model expects 1 channel(s), image has 3: converted rgb->gray (colour discarded)"
    assert any("patient-4711.jpg" in r.getMessage() for r in caplog.records)  # the log still says which file
