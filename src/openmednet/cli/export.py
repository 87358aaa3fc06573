"""``openmednet export``: write a model as ONNX (checked against onnxruntime) and/or safetensors."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``export`` command to ``app``."""

    @app.command("export")
    def export_cmd(
        model: str = typer.Argument(..., help="Registry name (mednet_gray.<tag>) or a saved model directory."),
        onnx: Path | None = typer.Option(None, "--onnx", help="Write an ONNX file (dynamic batch)."),
        safetensors: Path | None = typer.Option(None, "--safetensors", help="Write model.safetensors + card here."),
        opset: int = typer.Option(18, help="ONNX opset version."),
        exporter: str | None = typer.Option(None, help="'dynamo' (default with onnxscript) or 'torchscript'."),
        check: bool = typer.Option(True, help="Compare onnxruntime with PyTorch (max abs diff <= 1e-4)."),
    ) -> None:
        """Export a model for other runtimes (onnxruntime, MATLAB, TensorRT) or for sharing."""
        from openmednet.export.onnx import export_onnx
        from openmednet.export.safetensors import export_safetensors
        from openmednet.serve.predictor import load_model

        if onnx is None and safetensors is None:
            raise ValueError("nothing to export: pass --onnx FILE and/or --safetensors DIR")
        net = load_model(model)
        if onnx is not None:
            export_onnx(net, onnx, opset=opset, exporter=exporter, check=check)
            typer.echo(f"ONNX: {onnx} (input 'input' (batch, {', '.join(map(str, net.pretrained_cfg.input_size))}), "
                       "output 'logits')" + (", onnxruntime check passed" if check else ""))
        if safetensors is not None:
            weights, card = export_safetensors(net, safetensors)
            typer.echo(f"safetensors: {weights} + {card}")
