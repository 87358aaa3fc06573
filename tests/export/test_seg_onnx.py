"""ONNX export of a segmentation U-Net: onnxruntime equals PyTorch within 1e-4 on real images
(lgg_flair through the model's input pipeline), any batch size, through `openmednet export`."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from openmednet.cli.app import app
from openmednet.data.readers import read_images
from openmednet.export.onnx import check_onnx, export_onnx
from openmednet.serve.predictor import load_predictor


@pytest.fixture(scope="module")
def segmenter(seg_model_dir):
    return load_predictor(seg_model_dir)


@pytest.fixture(scope="module")
def real_inputs(segmenter, shared_data):
    """Three real MRI slices as the U-Net sees them: (3, 1, 32, 32)."""
    paths = sorted((shared_data / "seg/gray/lgg_flair/images").rglob("*.jpg"))[:3]
    return torch.stack([segmenter.preprocess(next(iter(read_images(p)))[0])[0] for p in paths])


def test_export_matches_torch_on_real_images(segmenter, seg_model_dir, real_inputs, tmp_path):
    path = export_onnx(segmenter.model, tmp_path / "unet.onnx", exporter="torchscript", opset=17, check_inputs=real_inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": real_inputs.numpy()})
    with torch.no_grad():
        expected = segmenter.model(real_inputs).numpy()
    assert logits.shape == (3, 2, 32, 32)  # dynamic batch, per-pixel logits at the input size
    assert np.abs(logits - expected).max() <= 1e-4
    # A model that is not the exported one fails loudly.
    changed = load_predictor(seg_model_dir).model
    with torch.no_grad():
        changed.head["segmentation_head"][0].bias.add_(1e-3)
    with pytest.raises(ValueError, match="onnxruntime differs from PyTorch"):
        check_onnx(changed, path, inputs=real_inputs)


def test_export_cli_on_a_segmentation_run(seg_model_dir, shared_data, tmp_path):
    images = shared_data / "seg/gray/lgg_flair/images" / "TCGA_CS_4941_19960909"
    result = CliRunner().invoke(app, ["export", str(seg_model_dir), "--onnx", str(tmp_path / "m.onnx"),
                                      "--check-images", str(images), "--safetensors", str(tmp_path / "copy"),
                                      "--exporter", "torchscript", "--opset", "17"])
    assert result.exit_code == 0, result.output
    assert "output 'logits' (batch, 2, 32, 32)" in result.output and "onnxruntime check passed" in result.output
    copy = load_predictor(tmp_path / "copy")
    x = torch.zeros(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(copy.model(x), load_predictor(seg_model_dir).model(x))
