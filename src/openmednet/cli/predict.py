"""``openmednet predict``: class probabilities (and Grad-CAM overlays) for image files and folders,
or, for a segmentation model (recognised from its saved card), one mask and one overlay PNG per
image plus a CSV of per-class pixel fractions (``serve.segmenter``).

Exit codes (both tasks): 0 every input file was predicted; 3 some files could not be read and were skipped
(the others are predicted and written, the skipped ones are listed as warnings); 2 an error
(nothing readable, bad model...). Files in a folder that no reader handles (``labels.csv``) are
passed over, not skipped.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from openmednet.utils import atomic_write_text

if TYPE_CHECKING:
    from rich.table import Table

    from openmednet.serve.predictor import Prediction
    from openmednet.serve.segmenter import Segmenter

#: Rows of the printed table; the CSV (--out) has them all.
TABLE_ROWS = 50
#: Exit code when some inputs were skipped: scripts must not mistake a partial run for a full one.
EXIT_SKIPPED = 3
#: Help of the MODEL argument of ``predict`` and ``serve``: what ``serve.predictor.load_predictor`` accepts.
MODEL_HELP = (
    "A fine-tuned run or its model folder, e.g. runs/busi or runs/busi/model (written by "
    "`openmednet finetune --out runs/busi`, classification or segmentation), or a registered weight "
    "set with a classifier head."
)


def register(app: typer.Typer) -> None:
    """Add the ``predict`` command to ``app``."""

    @app.command("predict")
    def predict_cmd(
        model: str = typer.Argument(..., help=MODEL_HELP),
        inputs: list[Path] = typer.Argument(..., help="Image files (PNG/JPEG/TIFF), DICOM, NIfTI or folders."),
        out: Path | None = typer.Option(
            None, "--out", help="Classifier: write predictions to this CSV file. Segmentation model (required): "
            "a folder for masks/, overlays/ and predictions.csv."
        ),
        cam: Path | None = typer.Option(None, "--cam", help="Write Grad-CAM overlays (PNG) to this folder."),
        batch_size: int = typer.Option(16, min=1, help="Images per forward pass."),
        cam_layer: str | None = typer.Option(
            None, help="Grad-CAM layer, e.g. blocks.5 (default: deepest stage with a map of at least 7x7)."
        ),
    ) -> None:
        """Predict every image (volumes: every slice) under the model card's input contract.

        Example, after `openmednet finetune --data DIR --out runs/busi`:

        openmednet predict runs/busi/model scans/ --out preds.csv

        A segmentation run writes OUT/masks/*_mask.png (class index per pixel, the image's size),
        OUT/overlays/*_overlay.png and OUT/predictions.csv:

        openmednet predict runs/lgg scans/ --out lgg_masks/

        Exit codes: 0 all files predicted; 3 some files unreadable and skipped (the rest predicted); 2 error.
        """
        # Predictions stream: each batch's overlays are written as it is produced and its images
        # dropped; the CSV (small rows) is written atomically at the end, the table shows the first
        # TABLE_ROWS rows.
        from rich.console import Console

        from openmednet.serve.predictor import load_predictor, predictions_csv

        predictor = load_predictor(model, cam_layer=cam_layer)
        if predictor.task == "segmentation":
            _segment(predictor, inputs, out, cam, batch_size)
            return
        if out is not None:
            _check_csv_out(out)
        shown: list[Prediction] = []  # the first TABLE_ROWS predictions, for the printed table
        with _collect_warnings() as skipped:
            # A --cam folder inside an input folder: a re-run must not predict its overlays.
            stream = _stream(predictor.predict_path(inputs, cam=cam is not None, batch_size=batch_size,
                                                    exclude=[cam] if cam else []), cam, shown)
            # Consumed one prediction at a time: overlays are written and images dropped as they come.
            if out is not None:
                text, count = predictions_csv(stream, predictor.label_names)
            else:
                count = sum(1 for _ in stream)
        if not count:
            raise ValueError(f"no readable image in {', '.join(map(str, inputs))}")
        if out is not None:
            atomic_write_text(out, text)  # at the end: a failed run leaves no partial CSV
        Console().print(_table(shown, predictor.label_names))
        if count > len(shown):
            typer.echo(f"first {len(shown)} of {count} predictions shown" + ("" if out else "; pass --out FILE for all"))
        if out is not None:
            typer.echo(f"{count} predictions written to {out}" + (f", overlays in {cam}" if cam else ""))
        _exit_if_skipped(skipped)


#: How a classifier's predictions CSV starts (``serve.predictor.predictions_csv``).
_CSV_START = b"source,frame,label,"


def _check_csv_out(out: Path) -> None:
    """Refuse a classifier ``--out`` that is a folder, or a file other than an earlier predictions
    CSV (or an empty one), before predicting: ``predict runs/x scans/ --out
    runs/x/model/model.safetensors`` replaced the model's weights with the CSV, and ``--out scan.png``
    (or a labels.csv, a metrics.json) that file, at the end of the run; a folder failed only then.
    Replacing the CSV of an earlier run, the usual re-run, stays allowed."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file path for the predictions CSV, e.g. "
                         f"{out / 'predictions.csv'}")
    if out.is_file() and out.stat().st_size:
        with out.open("rb") as f:
            if f.read(len(_CSV_START)) != _CSV_START:
                raise ValueError(f"--out {out} exists and is not a predictions CSV of an earlier run; it would be "
                                 f"replaced: give a new file path (or delete the file first)")


def _segment(segmenter: Segmenter, inputs: list[Path], out: Path | None, cam: Path | None, batch_size: int) -> None:
    """``predict`` for a segmentation model: masks, overlays and CSV in ``out`` (module docstring)."""
    from rich.console import Console
    from rich.table import Table

    from openmednet.serve.segmenter import rows_csv, write_segmentation

    if out is None or out.suffix.lower() == ".csv":
        raise ValueError(f"'{segmenter.card()['architecture']}' is a segmentation model: pass --out DIR, a folder for "
                         "masks/, overlays/ and predictions.csv" + (f" (got {out})" if out else ""))
    if cam is not None:
        raise ValueError("--cam is for classifiers: a segmentation model's overlays are written to OUT/overlays")
    names = segmenter.label_names
    table = Table("source", "frame", "size", *map(_plain, names), "notes")
    with _collect_warnings() as skipped:
        def rows() -> Iterator[list[str]]:
            # --out inside an input folder (predict scans/ --out scans/): a re-run predicted the
            # earlier run's masks and overlays as scans.
            masks = segmenter.predict_path(inputs, batch_size=batch_size, exclude=[out / "masks", out / "overlays"])
            for p, row in write_segmentation(masks, out, names):
                if table.row_count < TABLE_ROWS:
                    table.add_row(_plain(Path(p.source).name), str(p.frame), "x".join(map(str, p.mask.shape[::-1])),
                                  *(f"{p.fractions[n]:.3f}" for n in names), _plain("; ".join(p.notes)))
                yield row

        text, count = rows_csv(rows(), names)
    if not count:
        raise ValueError(f"no readable image in {', '.join(map(str, inputs))}")
    atomic_write_text(out / "predictions.csv", text)
    Console().print(table)
    typer.echo(f"{count} masks (uint8, class index per pixel; fractions shown) in {out / 'masks'}, overlays in "
               f"{out / 'overlays'}, table {out / 'predictions.csv'}")
    _warn_earlier_files(out, text)
    _exit_if_skipped(skipped)


def _warn_earlier_files(out: Path, csv_text: str) -> None:
    """Say when ``out/masks`` or ``out/overlays`` hold files this run did not write.

    A second ``predict`` into the same folder replaces the files of the same names; the others (an
    earlier run's inputs) stay, and ``predictions.csv`` lists this run's only: reported, not
    deleted, since they may be results the user still needs.
    """
    import csv
    import io

    written = {Path(row[column]).name for row in csv.DictReader(io.StringIO(csv_text)) for column in ("mask", "overlay")}
    for sub in ("masks", "overlays"):
        earlier = sorted(p.name for p in (out / sub).glob("*.png") if p.name not in written)
        if earlier:
            typer.secho(f"note: {out / sub} also holds {len(earlier)} file(s) this run did not write (e.g. "
                        f"{', '.join(earlier[:3])}), from an earlier run; predictions.csv lists this run's only",
                        fg=typer.colors.YELLOW, err=True)


@contextmanager
def _collect_warnings() -> Iterator[list[str]]:
    """Count warnings (logged once each on exit) and collect the skipped-file ones (yielded list)."""
    from openmednet.serve.predictor import SkippedFileWarning

    warned: Counter[str] = Counter()  # conversions and skipped files: counted, not stored
    skipped: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
            warned.update([str(message)])
            if issubclass(category, SkippedFileWarning):
                skipped.append(str(message))

        warnings.showwarning = show
        try:
            yield skipped
        finally:
            _log_warnings(warned)


def _exit_if_skipped(skipped: list[str]) -> None:
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

    table = Table("source", "frame", "label", *map(_plain, label_names), "notes")
    for p in predictions:
        table.add_row(_plain(Path(p.source).name), str(p.frame), _plain(p.label),
                      *(f"{v:.3f}" for v in p.probabilities.values()), _plain("; ".join(p.notes)))
    return table


def _plain(text: str) -> str:
    """``text`` shown as is in a rich table: "image [copy].png" was shown as "image .png"."""
    from rich.markup import escape

    return escape(text)
