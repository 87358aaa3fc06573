"""Serving a segmentation model: loading by its card, the shared input pipeline, masks at the
original size, and the web service's JSON for real images (lgg_flair gray, Kvasir colour)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from openmednet.data.readers import read_images
from openmednet.data.segmentation import load_segmentation
from openmednet.eval.finetune import FinetuneConfig
from openmednet.eval.segmentation import _make_loaders, upsample_logits
from openmednet.serve.app import create_app
from openmednet.serve.predictor import Predictor, load_model, load_predictor
from openmednet.serve.segmenter import Segmenter


@pytest.fixture(scope="module")
def segmenter(seg_model_dir) -> Segmenter:
    return load_predictor(seg_model_dir)


@pytest.fixture(scope="module")
def images(shared_data) -> dict[str, np.ndarray]:
    """A gray 256x256 MRI slice and a colour colonoscopy frame of another, non-square size."""
    paths = {"gray": next((shared_data / "seg/gray/lgg_flair/images").rglob("*.jpg")),
             "color": next((shared_data / "seg/color/kvasir_seg/images").rglob("*.jpg"))}
    return {k: next(iter(read_images(p)))[0] for k, p in paths.items()}


def test_the_card_decides_the_task(seg_model_dir, segmenter, model_dir):
    # The run folder and its model folder load the same segmenter; a classifier stays a Predictor.
    assert isinstance(segmenter, Segmenter) and segmenter.task == "segmentation"
    assert isinstance(load_predictor(seg_model_dir / "model"), Segmenter)
    assert isinstance(load_predictor(model_dir), Predictor) and load_predictor(model_dir).task == "classification"
    assert segmenter.card()["input_contract"]["size"] == [32, 32]
    assert segmenter.label_names == ("background", "flair_abnormality")
    with pytest.raises(ValueError, match="segmentation model predicts masks"):
        Predictor(load_model(seg_model_dir))
    with pytest.raises(ValueError, match="no Grad-CAM"):
        load_predictor(seg_model_dir, cam_layer="blocks.1")


def test_masks_are_the_argmax_at_the_original_size(segmenter, images):
    preds = segmenter.predict_arrays([images["gray"], images["color"]], ["gray.jpg", "color.jpg"])
    for pred, image in zip(preds, (images["gray"], images["color"])):
        assert pred.mask.shape == image.shape[:2] and pred.mask.dtype == np.uint8 and pred.mask.max() < 2
        # Exactly the model's argmax on the same input, logits resized bilinearly to the image.
        x, _ = segmenter.preprocess(image)
        with torch.no_grad():
            expected = upsample_logits(segmenter.model(x[None]), image.shape[:2]).argmax(1)[0].numpy()
        np.testing.assert_array_equal(pred.mask, expected)
        counts = np.bincount(pred.mask.ravel(), minlength=2) / pred.mask.size
        assert [pred.fractions[n] for n in segmenter.label_names] == counts.tolist()
        assert np.asarray(Image.open(io.BytesIO(pred.overlay_png()))).shape == (*image.shape[:2], 3)
    assert preds[1].notes == ["rgb->gray (colour discarded)"]  # the colour frame for a gray model: noted


def test_finetune_evaluates_with_the_pipeline_predict_uses(seg_subset, tmp_path, segmenter):
    """Validation/test inputs of a fine-tuning run are `Segmenter.preprocess`'s tensors, exactly,
    and their masks stay at the stored resolution."""
    target = load_segmentation(seg_subset(tmp_path / "lgg", patients=1))
    idx = {"train": np.arange(1), "val": np.arange(1), "test": np.arange(len(target))}
    cfg = FinetuneConfig(data=tmp_path / "lgg", out=tmp_path / "run", task="segmentation", batch_size=4)
    test = _make_loaders(cfg, target, idx, segmenter.model, 1, 32)["test"].dataset
    for i in range(len(target)):
        x, mask = test[i]
        assert torch.equal(x, segmenter.preprocess(target.images[i])[0])
        assert torch.equal(mask, torch.from_numpy(target.masks[i]).long())


def test_service_returns_fractions_mask_and_overlay(segmenter, shared_data):
    path = next((shared_data / "seg/color/kvasir_seg/images").rglob("*.jpg"))
    image = next(iter(read_images(path)))[0]
    client = TestClient(create_app(segmenter))
    assert client.get("/api/model").json()["task"] == "segmentation"
    response = client.post("/api/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == "segmentation" and body["label_names"] == ["background", "flair_abnormality"]
    (item,) = body["results"]
    assert item["size"] == list(image.shape[:2]) and sum(item["fractions"].values()) == pytest.approx(1.0)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["mask_png"]))))
    np.testing.assert_array_equal(mask, segmenter.predict_arrays([image])[0].mask)
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["overlay_png"]))))
    assert overlay.shape == (*image.shape[:2], 3)
    assert "overlay_png" not in client.post("/api/predict?cam=false", files={"file": (path.name, path.read_bytes())}).json()["results"][0]
    # The upload limits of classification apply unchanged.
    small = TestClient(create_app(segmenter, max_pixels=100 * 100))
    refused = small.post("/api/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert refused.status_code == 413, refused.text
    assert client.post("/api/predict", files={"file": ("x.npz", b"PK\x03\x04", "application/zip")}).status_code == 415
