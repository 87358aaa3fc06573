"""ONNX export: onnxruntime equals PyTorch within 1e-4, batch axis dynamic, failures are clear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from openmednet import create_model
from openmednet.export.onnx import (
    INPUT_NAME,
    OUTPUT_NAME,
    _check_opset,
    check_onnx,
    export_onnx,
    onnx_opset,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("mednet_test", num_classes=3)
    m.train()  # export must not depend on (nor change) the caller's mode
    return m


@pytest.fixture(scope="module")
def dynamo_file(model, tmp_path_factory) -> Path:
    """The default exporter (torch.export-based), run once for the module: it takes seconds."""
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _real_batch(shared_data: Path, n: int) -> torch.Tensor:
    from PIL import Image

    root = shared_data / "gray" / "pretrain" / "knee_oa"
    files = sorted(root.rglob("*.png"))[:n] or sorted(root.rglob("*.jp*g"))[:n]
    if len(files) < n:
        pytest.skip(f"need {n} images under {root}")
    arrays = [np.asarray(Image.open(f).convert("L").resize((64, 64), Image.BILINEAR)) for f in files]
    return (torch.from_numpy(np.stack(arrays)[:, None]).float() / 255 - 0.5) / 0.25


def test_default_export_matches_torch_on_real_images(model, dynamo_file, shared_data):
    assert model.training, "export_onnx must restore the model's mode"
    graph = onnx.load(str(dynamo_file))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, 64, 64]
    session = ort.InferenceSession(str(dynamo_file), providers=["CPUExecutionProvider"])
    model.eval()
    try:
        for n in (1, 5):  # two batch sizes: the batch axis really is dynamic
            x = _real_batch(shared_data, n)
            with torch.no_grad():
                expected = model(x).numpy()
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
            assert got.shape == (n, 3)
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    finally:
        model.train()


def test_torchscript_exporter_and_check(model, tmp_path):
    path = export_onnx(model, tmp_path / "ts.onnx", exporter="torchscript", opset=17)
    assert onnx.load(str(path)).opset_import[0].version == 17
    assert check_onnx(model, path, batch_sizes=(2, 7)) <= 1e-4


def test_check_detects_a_different_model(model, dynamo_file):
    other = create_model("mednet_test", num_classes=3)  # fresh random weights
    with pytest.raises(ValueError, match="differs from PyTorch"):
        check_onnx(other, dynamo_file)


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="exporter must be"):
        export_onnx(model, tmp_path / "x.onnx", exporter="tensorrt")
    with pytest.raises(ValueError, match="input_size must be"):
        export_onnx(model, tmp_path / "x.onnx", input_size=(1, 64))
    assert not (tmp_path / "x.onnx").exists()


def test_low_opset_is_written_or_refused(model, tmp_path):
    # Default exporter below opset 18: TorchScript, which writes the requested opset itself.
    path = export_onnx(model, tmp_path / "op13.onnx", opset=13)
    assert onnx_opset(path.read_bytes()) == 13
    assert check_onnx(model, path) <= 1e-4


def test_an_opset_the_exporter_cannot_use_is_a_clear_error(model, tmp_path):
    # Regression: `openmednet export --opset 0` ended in torch's RuntimeError and --opset 5 in a
    # SymbolicValueError with an IR dump (MedNet's pooling needs opset >= 7), exit 1.
    for opset, cause in ((0, "Unsupported onnx_opset_version: 0"), (5, "get_pool_ceil_padding")):
        with pytest.raises(ValueError, match=f"cannot export this model at opset {opset} \\(.*{cause}.*use opset 18"):
            export_onnx(model, tmp_path / "x.onnx", opset=opset)
    assert not (tmp_path / "x.onnx").exists()


def test_opset_mismatch_is_a_clear_error():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    _check_opset(data, 18, "dynamo")
    with pytest.raises(ValueError, match="dynamo exporter wrote opset 18, not the requested 13.*exporter='torchscript'"):
        _check_opset(data, 13, "dynamo")


def test_dynamo_with_a_low_opset_yields_it_or_a_clear_error(model, tmp_path):
    """torch 2.14's dynamo exporter implements opset >= 18; below, it may silently keep 18."""
    try:
        path = export_onnx(model, tmp_path / "d13.onnx", opset=13, exporter="dynamo", check=False)
    except ValueError as e:
        assert "not the requested 13" in str(e)
        assert not (tmp_path / "d13.onnx").exists()
    else:
        assert onnx_opset(path.read_bytes()) == 13
