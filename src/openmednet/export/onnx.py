"""Export a model to ONNX (dynamic batch) and check it against PyTorch with onnxruntime.

The ONNX graph takes ``input`` ``(batch, C, H, W)`` float32, already normalised as the model card
says, and returns ``logits`` ``(batch, num_classes)`` (no softmax, as in PyTorch); a segmentation
U-Net (``eval.segmentation.SegmentationNet``) returns ``logits`` ``(batch, num_classes, H, W)``,
whose argmax over classes is the mask at the input size. Only the batch axis is dynamic: the image size is fixed to the card's ``input_size`` so tools that need static
spatial shapes (MATLAB's ``importNetworkFromONNX``, TensorRT) import it as is.

Two exporters (``torch.onnx.export``):
- ``"dynamo"`` (default when ``onnxscript`` is installed and ``opset >= 18``): PyTorch's
  ``torch.export``-based exporter, the default since PyTorch 2.9. Its operator implementations
  start at opset 18; for a lower opset it converts the model down and, when that fails (it does
  for MedNet at opset 13 with torch 2.14), keeps opset 18 with only a log warning.
- ``"torchscript"``: the legacy tracer, faster to run and still shipped, but deprecated upstream.
  The default for ``opset < 18``: it writes the requested opset directly.

Whatever the exporter, the written file's opset (``opset_import`` of the default domain) is
checked against the requested one, and a mismatch is an error rather than a surprise for the
runtime that loads the file.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from openmednet.utils import atomic_write_bytes

__all__ = ["DEFAULT_OPSET", "check_onnx", "export_onnx", "onnx_opset"]

logger = logging.getLogger(__name__)

#: Opset 18: supported by onnxruntime >= 1.14 and by MATLAB's ONNX importer in recent releases;
#: pass ``opset=13`` for older runtimes (exported by the TorchScript exporter, see the module docstring).
DEFAULT_OPSET = 18
#: Lowest opset the dynamo exporter implements (torch's TORCHLIB_OPSET); below it, it converts down.
DYNAMO_MIN_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _resolve_input_size(model: nn.Module, input_size: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None)
        if cfg is None:
            raise ValueError("model has no pretrained_cfg: pass input_size=(C, H, W)")
        input_size = tuple(cfg.input_size)
    if len(input_size) != 3 or min(input_size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with positive sizes, got {input_size}")
    return tuple(int(v) for v in input_size)  # type: ignore[return-value]


def _export_bytes(model: nn.Module, example: torch.Tensor, opset: int, exporter: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="openmednet-onnx-") as tmp:
        out = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # The tracers' advice targets exporter developers, not users of a finished model.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*will be removed.*", category=DeprecationWarning)
            if exporter == "dynamo":
                program = torch.onnx.export(
                    model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},),
                    external_data=False, verbose=False,
                )
                program.save(str(out))
            else:
                torch.onnx.export(
                    model, (example,), str(out), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                )
        return out.read_bytes()


def onnx_opset(data: bytes) -> int:
    """The ONNX operator-set version of a serialised model (its default-domain ``opset_import``).

    Raises:
        ValueError: the model imports no default-domain opset.
    """
    import onnx

    model = onnx.load_from_string(data)
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ValueError("the ONNX model imports no default-domain ('ai.onnx') opset")
    return int(versions[0])


def _check_opset(data: bytes, opset: int, exporter: str) -> None:
    """Raise when the exporter wrote another opset than ``opset`` (the dynamo exporter may keep 18)."""
    got = onnx_opset(data)
    if got != opset:
        hint = (f"the dynamo exporter implements opset >= {DYNAMO_MIN_OPSET} and could not convert this model "
                "down; use exporter='torchscript' (the default for opsets below 18)"
                if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET else "choose another opset or exporter")
        raise ValueError(f"the {exporter} exporter wrote opset {got}, not the requested {opset}: {hint}")


def check_onnx(model: nn.Module, onnx_model: str | Path | bytes, input_size: tuple[int, int, int] | None = None,
               batch_sizes: tuple[int, ...] = (1, 3), atol: float = 1e-4, seed: int = 0,
               inputs: torch.Tensor | None = None) -> float:
    """Compare onnxruntime's outputs with PyTorch's on random inputs of several batch sizes
    (and on ``inputs``: real images prepared by the model's input pipeline).

    Args:
        model: the PyTorch model (eval mode is set).
        onnx_model: the ``.onnx`` file, or its bytes.
        input_size: ``(C, H, W)``; default the model card's.
        batch_sizes: batch sizes to run (two different ones prove the batch axis is dynamic).
        atol: largest allowed absolute difference of logits.
        seed: seed of the random inputs (standard normal, i.e. the normalised input range).
        inputs: ``(B, C, H, W)`` model inputs compared as well, e.g. real images through
            ``EvalInputs``: random noise is not what the network sees in use.

    Returns:
        The largest absolute difference seen.

    Raises:
        ValueError: outputs differ by more than ``atol`` (the message gives the difference).
    """
    import onnx
    import onnxruntime as ort

    data = onnx_model if isinstance(onnx_model, bytes) else Path(onnx_model).read_bytes()
    onnx.checker.check_model(data)
    c, h, w = _resolve_input_size(model, input_size)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    model.eval()
    batches = [torch.randn(b, c, h, w, generator=generator) for b in batch_sizes]
    if inputs is not None:
        if tuple(inputs.shape[1:]) != (c, h, w):
            raise ValueError(f"check inputs of shape {tuple(inputs.shape)} do not fit the model's (B, {c}, {h}, {w})")
        batches.append(inputs.float())
    for x in batches:
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > atol:
        raise ValueError(f"onnxruntime differs from PyTorch by {worst:.3g} > atol {atol:g}: "
                         "try the other exporter (exporter='torchscript'/'dynamo') or another opset")
    return worst


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str | None = None,
    check: bool = True,
    atol: float = 1e-4,
    check_inputs: torch.Tensor | None = None,
) -> Path:
    """Export ``model`` to an ONNX file with a dynamic batch axis.

    Args:
        model: a classifier or segmentation U-Net; exported in eval mode (its mode is restored afterwards).
        path: output ``.onnx`` file, written atomically.
        input_size: ``(C, H, W)``; default ``model.pretrained_cfg.input_size``.
        opset: ONNX opset version; the file is guaranteed to have it (else ``ValueError``).
        exporter: ``"dynamo"`` or ``"torchscript"``; default dynamo when ``onnxscript`` is installed
            and ``opset >= 18``, else torchscript (see the module docstring).
        check: run :func:`check_onnx` (onnxruntime vs PyTorch within ``atol``) before writing.
        atol: tolerance of the check.
        check_inputs: ``(B, C, H, W)`` real model inputs the check compares too (``check_onnx(inputs=)``).

    Returns:
        ``path``.

    Raises:
        ValueError: bad arguments; the exporter cannot export the model at ``opset`` or wrote another
            opset; the check failed. Nothing is written then.
    """
    if exporter is None:
        dynamo_ok = opset >= DYNAMO_MIN_OPSET and importlib.util.find_spec("onnxscript") is not None
        exporter = "dynamo" if dynamo_ok else "torchscript"
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got '{exporter}'")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ValueError("the dynamo exporter needs onnxscript: pip install onnxscript, or use exporter='torchscript'")
    path = Path(path)
    c, h, w = _resolve_input_size(model, input_size)
    was_training = model.training
    model.eval()
    try:
        # Batch 2 as the example: a batch of 1 can be specialised away by the tracers.
        try:
            data = _export_bytes(model, torch.zeros(2, c, h, w), opset, exporter)
        # An opset the exporter lacks (RuntimeError "Unsupported onnx_opset_version: 0") or lacks an
        # operator of the model in (SymbolicValueError at opset 5: MedNet's pooling needs >= 7)
        # ended `openmednet export --opset` in a long traceback; the fix is the user's: another opset.
        except (torch.onnx.errors.OnnxExporterError, RuntimeError) as e:
            text = str(e).strip() or type(e).__name__
            first = text.splitlines()[0].split(". ")[0].rstrip(".")  # torch's first sentence, not its IR dump
            raise ValueError(f"the {exporter} exporter cannot export this model at opset {opset} ({first[:200]}): "
                             f"use opset {DEFAULT_OPSET} (the default) or 13 for older runtimes, or the other "
                             f"exporter") from e
        _check_opset(data, opset, exporter)
        if check:  # before writing, so a failed check leaves no file behind
            worst = check_onnx(model, data, (c, h, w), atol=atol, inputs=check_inputs)
            logger.info("ONNX check passed: max |onnxruntime - torch| = %.2e (atol %g)", worst, atol)
        atomic_write_bytes(path, data)
    finally:
        model.train(was_training)
    return path
