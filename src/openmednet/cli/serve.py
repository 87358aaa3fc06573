"""``openmednet serve``: the local web page + JSON API for a model (uvicorn, 127.0.0.1 by default)."""

from __future__ import annotations

import typer

from openmednet.cli.predict import MODEL_HELP


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""

    @app.command("serve")
    def serve_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        host: str = typer.Option("127.0.0.1", help="Interface to bind; anything but loopback exposes the service."),
        port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
        max_upload_mb: float = typer.Option(32.0, min=0.001, help="Largest accepted upload, in MB."),
        max_pixels: int = typer.Option(4096 * 4096, min=1, help="Largest accepted image (width x height)."),
        max_frames: int = typer.Option(64, min=1, help="Most images (frames/slices) per uploaded file."),
        max_voxels: int = typer.Option(512 * 512 * 128, min=1, help="Largest accepted NIfTI volume (voxels)."),
        workers: int = typer.Option(2, min=1, help="Predictions computed at the same time."),
        max_queue: int = typer.Option(16, min=0, help="Requests waiting for a slot; more get 503 (0: none wait)."),
        body_timeout: float = typer.Option(
            60.0, min=0.001, help="Seconds for an upload's whole body to arrive; slower or stalled ones get 408."
        ),
        cam_layer: str | None = typer.Option(
            None, help="Grad-CAM layer, e.g. blocks.5 (default: deepest stage with a map of at least 7x7)."
        ),
    ) -> None:
        """Serve a drag-and-drop page with predictions and Grad-CAM (or mask) overlays, plus /api/predict.

        Example, after `openmednet finetune --data DIR --out runs/busi`: openmednet serve runs/busi/model
        """
        import logging

        import uvicorn

        from openmednet.serve.app import create_app
        from openmednet.serve.predictor import load_predictor

        if host not in ("127.0.0.1", "localhost", "::1"):
            logging.getLogger(__name__).warning(
                "binding %s: anyone who can reach this machine can upload images; there is no authentication", host)
        predictor = load_predictor(model, cam_layer=cam_layer)
        application = create_app(predictor, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                                 max_pixels=max_pixels, max_frames=max_frames, max_concurrent=workers,
                                 max_voxels=max_voxels, max_queue=max_queue, body_timeout=body_timeout)
        typer.echo(f"OpenMedNet serving {model} on http://{host}:{port}/ (Ctrl+C to stop)")
        uvicorn.run(application, host=host, port=port, log_level="info")
