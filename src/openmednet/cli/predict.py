"""``openmednet predict``: class probabilities (and Grad-CAM overlays) for image files and folders.

Exit codes: 0 every input file was predicted; 3 some files could not be read and were skipped
(the others are predicted and written, the skipped ones are listed as warnings); 2 an error
(nothing readable, bad model...). Files in a folder that no reader handles (``labels.csv``) are
passed over, not skipped.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from openmednet.utils import atomic_write_text

if TYPE_CHECKING:
    from rich.table import Table

    from openmednet.serve.predictor import Prediction

#: Rows of the printed table; the CSV (--out) has them all.
TABLE_ROWS = 50
#: Exit code when some inputs were skipped: scripts must not mistake a partial run for a full one.
EXIT_SKIPPED = 3


def register(app: typer.Typer) -> None:
    """Add the ``predict`` command to ``app``."""

    @app.command("predict")
    def predict_cmd(
        model: str = typer.Argument(
            ..., help="A fine-tuned model folder, e.g. runs/busi/model (written by `openmednet finetune --out "
            "runs/busi`), or a registered weight set with a classifier head."
        ),
        inputs: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG/TIFF), DICOM, NIfTI or folders."),
        out: Path | None = typer.Option(None, "--out", help="Write predictions to this CSV file."),
        cam: Path | None = typer.Option(None, "--cam", help="Write Grad-CAM overlays (PNG) to this folder."),
        batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
        cam_layer: str | None = typer.Option(
            None, help="Grad-CAM layer, e.g. blocks.5 (default: deepest stage with a map of at least 7x7)."
        ),
    ) -> None:
        """Predict every image (volumes: every slice) under the model card's input contract.

        Example, after `openmednet finetune --data DIR --out runs/busi`:

        openmednet predict runs/busi/model scans/ --out preds.csv

        Exit codes: 0 all files predicted; 3 some files unreadable and skipped (the rest predicted); 2 error.
        """
        # Predictions stream: each batch's overlays are written as it is produced and its images
        # dropped; the CSV (small rows) is written atomically at the end, the table shows the first
        # TABLE_ROWS rows.
        from rich.console import Console

        from openmednet.serve.predictor import Predictor, SkippedFileWarning, predictions_csv

        predictor = Predictor.from_spec(model, cam_layer=cam_layer)
        shown: list[Prediction] = []  # the first TABLE_ROWS predictions, for the printed table
        warned: Counter[str] = Counter()  # conversions and skipped files: counted, not stored
        skipped: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("always")

            def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
                warned.update([str(message)])
                if issubclass(category, SkippedFileWarning):
                    skipped.append(str(message))

            warnings.showwarning = show
            stream = _stream(predictor.predict_path(inputs, cam=cam is not None, batch_size=batch_size), cam, shown)
            # Consumed one prediction at a time: overlays are written and images dropped as they come.
            if out is not None:
                text, count = predictions_csv(stream, predictor.label_names)
            else:
                count = sum(1 for _ in stream)
        _log_warnings(warned)
        if not count:
            raise ValueError(f"no readable image in {', '.join(map(str, inputs))}")
        if out is not None:
            atomic_write_text(out, text)  # at the end: a failed run leaves no partial CSV
        Console().print(_table(shown, predictor.label_names))
        if count > len(shown):
            typer.echo(f"first {len(shown)} of {count} predictions shown" + ("" if out else "; pass --out FILE for all"))
        if out is not None:
            typer.echo(f"{count} predictions written to {out}" + (f", overlays in {cam}" if cam else ""))
        if skipped:
            typer.secho(f"{len(skipped)} input file(s) skipped as unreadable (see the warnings); "
                        f"exit code {EXIT_SKIPPED}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_SKIPPED)


def _stream(predictions: Iterable[Prediction], cam_dir: Path | None, shown: list[Prediction]) -> Iterator[Prediction]:
    """Pass predictions on after writing their overlay (if any) and dropping their images."""
    from openmednet.serve.predictor import write_cam_overlays

    used: dict[str, int] = {}  # overlay names, unique across batches
    for p in predictions:
        if cam_dir is not None:
            write_cam_overlays([p], cam_dir, used)
        p.image = p.cam = None  # the CSV row and the table need only the probabilities
        if len(shown) < TABLE_ROWS:
            shown.append(p)
        yield p


def _log_warnings(warned: Counter[str]) -> None:
    """One log line per distinct warning, with a count: a conversion repeats for every image."""
    log = logging.getLogger("openmednet.predict")
    for message, n in warned.items():
        log.warning("%s", message if n == 1 else f"{message} ({n} times)")


def _table(predictions: list[Prediction], label_names: tuple[str, ...]) -> Table:
    from rich.table import Table

    table = Table("source", "frame", "label", *label_names, "notes")
    for p in predictions:
        table.add_row(Path(p.source).name, str(p.frame), p.label, *(f"{v:.3f}" for v in p.probabilities.values()),
                      "; ".join(p.notes))
    return table
