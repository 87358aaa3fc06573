"""``openmednet export``: write a model as ONNX (checked against onnxruntime) and/or safetensors.

Classifiers and segmentation U-Nets alike (the saved card says which). The ONNX check compares
onnxruntime with PyTorch on random inputs and on real images through the model's own input
pipeline: ``--check-images`` or, by default, a few chest X-rays of the embedded demo sample.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import typer

#: Real images the ONNX check runs by default (from the embedded demo sample).
N_CHECK_IMAGES = 4


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""

    @app.command("export")
    def export_cmd(
        model: str = typer.Argument(..., help="Registry name (mednet_gray.<tag>), a fine-tuned run or its model folder."),
        onnx: Path | None = typer.Option(None, "--onnx", help="Write an ONNX file (dynamic batch)."),
        safetensors: Path | None = typer.Option(None, "--safetensors", help="Write model.safetensors + card here."),
        opset: int = typer.Option(18, help="ONNX opset version."),
        exporter: str | None = typer.Option(None, help="'dynamo' (default with onnxscript) or 'torchscript'."),
        check: bool = typer.Option(True, help="Compare onnxruntime with PyTorch (max abs diff <= 1e-4)."),
        check_images: list[Path] = typer.Option(
            [], "--check-images", help="Images/folders the ONNX check runs (default: the embedded demo X-rays)."
        ),
    ) -> None:
        """Export a model for other runtimes (onnxruntime, MATLAB, TensorRT) or for sharing."""
        from openmednet.export.onnx import export_onnx
        from openmednet.serve.predictor import load_model

        if onnx is None and safetensors is None:
            raise ValueError("nothing to export: pass --onnx FILE and/or --safetensors DIR")
        if onnx is not None:
            _check_onnx_out(onnx)
        net = load_model(model)  # a classifier, a backbone (registered weights) or a segmentation U-Net
        segment = getattr(net, "task", None) == "segmentation"
        if onnx is not None:
            real = _check_inputs(net, segment, check_images) if check else None
            export_onnx(net, onnx, opset=opset, exporter=exporter, check=check, check_inputs=real)
            c, h, w = net.pretrained_cfg.input_size
            shape = f"(batch, {net.card['num_classes']}, {h}, {w})" if segment else "(batch, num_classes)"
            typer.echo(f"ONNX: {onnx} (input 'input' (batch, {c}, {h}, {w}), output 'logits' {shape})"
                       + (f", onnxruntime check passed on random inputs and {len(real)} real images" if check else ""))
        if safetensors is not None:
            weights, card = _export_weights(net, safetensors, segment)
            typer.echo(f"safetensors: {weights} + {card}")


def _check_onnx_out(path: Path) -> None:
    """Refuse an ``--onnx`` path that is a folder, or an existing file that is not ``.onnx``, before
    exporting: ``export runs/x --onnx runs/x/model/model.safetensors`` replaced the weights it
    exported with the ONNX file (a folder failed only after the export). Replacing an earlier
    ``.onnx`` stays allowed."""
    if path.is_dir():
        raise ValueError(f"--onnx {path} is a folder: give a file path, e.g. {path / 'model.onnx'}")
    if path.exists() and path.suffix.lower() != ".onnx":
        raise ValueError(f"--onnx {path} exists and is not an .onnx file; it would be replaced: give a new path "
                         f"ending in .onnx (or delete the file first)")


def _check_inputs(net: Any, segment: bool, paths: list[Path]) -> Any:
    """``(B, C, H, W)`` inputs of real images (``paths``' first 8, else the demo sample) through the
    model's evaluation pipeline (``EvalInputs``; ``segmentation_inputs`` for a U-Net)."""
    import numpy as np
    import torch

    from openmednet.engine.inputs import EvalInputs
    from openmednet.eval.segmentation import segmentation_inputs
    from openmednet.quickstart import demo_path
    from openmednet.serve.predictor import iter_batches

    pipeline = segmentation_inputs(net.pretrained_cfg) if segment else EvalInputs(net.pretrained_cfg)

    if paths:
        images = next(iter_batches(paths, batch_size=8), ([],))[0]
        if not images:
            raise ValueError(f"no readable image in --check-images {', '.join(map(str, paths))}")
    else:
        with np.load(demo_path()) as demo:
            images = list(demo["test_images"][:N_CHECK_IMAGES])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # channel conversions: expected for gray check images
        return torch.stack([pipeline(np.asarray(image, dtype=np.uint8)) for image in images])


def _export_weights(net: Any, out: Path, segment: bool) -> tuple[Path, Path]:
    """``model.safetensors`` + card in ``out``, in the saved format of the model's task."""
    if segment:
        from openmednet.eval.segmentation import save_segmentation_model

        save_segmentation_model(net, out)
        return out / "model.safetensors", out / "model_card.json"
    from openmednet.export.safetensors import export_safetensors

    return export_safetensors(net, out)
