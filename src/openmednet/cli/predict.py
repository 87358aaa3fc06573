"""``openmednet predict``: class probabilities (and Grad-CAM overlays) for image files and folders."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add the ``predict`` command to ``app``."""

    @app.command("predict")
    def predict_cmd(
        model: str = typer.Argument(..., help="Registry name (mednet_gray.<tag>) or a saved model directory."),
        inputs: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG/TIFF), DICOM, NIfTI or folders."),
        out: Path | None = typer.Option(None, "--out", help="Write predictions to this CSV file."),
        cam: Path | None = typer.Option(None, "--cam", help="Write Grad-CAM overlays (PNG) to this folder."),
        batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
        cam_layer: str | None = typer.Option(
            None, help="Grad-CAM layer, e.g. blocks.5 (default: deepest stage with a map of at least 7x7)."
        ),
    ) -> None:
        """Predict every image (volumes: every slice) under the model card's input contract."""
        import logging
        import warnings

        from rich.console import Console
        from rich.table import Table

        from openmednet.serve.predictor import (
            Predictor,
            save_predictions_csv,
            write_cam_overlays,
        )

        predictor = Predictor.from_spec(model, cam_layer=cam_layer)
        with warnings.catch_warnings(record=True) as caught:  # conversions and skipped files, one line each
            warnings.simplefilter("always")
            preds = list(predictor.predict_path(inputs, cam=cam is not None, batch_size=batch_size))
        for w in caught:
            logging.getLogger("openmednet.predict").warning("%s", w.message)
        if not preds:
            raise ValueError(f"no readable image in {', '.join(map(str, inputs))}")
        if cam is not None:
            write_cam_overlays(preds, cam)
        if out is not None:
            save_predictions_csv(preds, out, predictor.label_names)
        table = Table("source", "frame", "label", *predictor.label_names, "notes")
        for p in preds[:50] if out is not None else preds:
            table.add_row(Path(p.source).name, str(p.frame), p.label, *(f"{v:.3f}" for v in p.probabilities.values()),
                          "; ".join(p.notes))
        Console().print(table)
        if out is not None:
            typer.echo(f"{len(preds)} predictions written to {out}" + (f", overlays in {cam}" if cam else ""))
