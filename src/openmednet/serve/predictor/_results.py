"""Result writing: ``Prediction`` (one image's class probabilities and Grad-CAM), CSV rows and overlay files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from openmednet.explain.gradcam import overlay_png
from openmednet.utils import atomic_write_bytes, atomic_write_text, csv_text

__all__ = ["Prediction", "cam_file_name", "output_name", "predictions_csv", "save_predictions_csv",
           "write_cam_overlays"]


@dataclass
class Prediction:
    """The result for one 2D image.

    Attributes:
        source: the file it came from (upload name for the web service).
        frame: slice / frame index inside the file (0 for single images).
        probabilities: ``{label: probability}``, softmax over the model's classes, summing to 1.
        label: the most probable label.
        notes: what was done to fit the input contract (e.g. ``"rgb->gray"``).
        image: with ``cam``: the 8-bit image the model saw (after resize/crop), ``(h, w)`` or ``(h, w, 3)``.
        cam: Grad-CAM of ``label`` at model input size ``(h, w)`` in [0, 1], when requested.
    """

    source: str
    frame: int
    probabilities: dict[str, float]
    label: str
    notes: list[str] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)
    cam: np.ndarray | None = field(default=None, repr=False)

    def overlay_png(self, alpha: float = 0.45, min_side: int = 256) -> bytes:
        """The Grad-CAM over the model's view of the image, as PNG bytes.

        Args:
            alpha: heat-map weight.
            min_side: the view is enlarged (bilinear) to at least this side for display.

        Raises:
            ValueError: no CAM was computed (predict with ``cam=True``).
        """
        if self.cam is None or self.image is None:
            raise ValueError(f"no Grad-CAM for {self.source}: predict with cam=True")
        image = self.image
        h, w = image.shape[:2]
        scale = max(1.0, min_side / min(h, w))
        if scale > 1.0:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BILINEAR))
        return overlay_png(image, self.cam, alpha=alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no pixel arrays)."""
        return {"source": self.source, "frame": self.frame, "label": self.label,
                "probabilities": self.probabilities, "notes": list(self.notes)}


def predictions_csv(predictions: Iterable[Prediction], label_names: Sequence[str]) -> tuple[str, int]:
    """Predictions as CSV text (``source,frame,label,p_<name>...,notes``) and the number of rows.

    ``predictions`` is consumed once, row by row: a generator's images can be freed as it goes.
    """
    header = ["source", "frame", "label", *(f"p_{n}" for n in label_names), "notes"]
    return csv_text(header, ([p.source, p.frame, p.label, *(f"{p.probabilities[n]:.6f}" for n in label_names),
                              ";".join(p.notes)] for p in predictions))


def save_predictions_csv(predictions: Iterable[Prediction], path: str | Path, label_names: Sequence[str]) -> int:
    """Write predictions as CSV (see :func:`predictions_csv`) atomically.

    Returns:
        The number of rows written.
    """
    text, rows = predictions_csv(predictions, label_names)
    atomic_write_text(Path(path), text)
    return rows


def output_name(source: str, frame: int, suffix: str, used: dict[str, int] | None = None) -> str:
    """``<name>[_f<frame>][_<n>]<suffix>``: one output file name per image.

    ``scan.nii.gz`` slice 3 with ``suffix="_cam.png"`` -> ``scan_f3_cam.png``. With ``used`` (every
    name given so far -> the last ``_<n>`` tried for it, updated in place) a name already given gets
    ``_2``, ``_3``... (same file names in different folders), skipping names given otherwise:
    ``a/x.png``, ``b/x.png``, ``x_2.png`` -> ``x``, ``x_2``, ``x_2_2``.
    """
    name = Path(source).name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
    stem = f"{stem}{'' if frame == 0 else f'_f{frame}'}"
    if used is None:
        return stem + suffix
    # Counting stems alone gave b/x.png the name "x_2" that x_2.png then got too: its mask was overwritten.
    name, n = stem, used.get(stem, 1)
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used[stem] = n
    used.setdefault(name, 1)
    return name + suffix


def cam_file_name(pred: Prediction) -> str:
    """``<name>[_f<frame>]_cam.png``: one overlay name per image (``scan.nii.gz`` slice 3 -> ``scan_f3_cam.png``)."""
    return output_name(pred.source, pred.frame, "_cam.png")


def write_cam_overlays(predictions: Iterable[Prediction], out_dir: str | Path,
                       used: dict[str, int] | None = None) -> list[Path]:
    """Write each prediction's Grad-CAM overlay as PNG (atomically) into ``out_dir``.

    Names come from :func:`cam_file_name`; a name already used gets ``_2``, ``_3``... (same file
    names in different folders).

    Args:
        predictions: predictions made with ``cam=True``.
        out_dir: the folder (created if needed).
        used: name -> times used, updated in place; pass the same dict to calls that write one
            batch at a time into the same folder, so names stay unique across batches.

    Returns:
        The written paths, in the order of ``predictions``.
    """
    out_dir = Path(out_dir)
    used = {} if used is None else used
    paths = []
    for pred in predictions:
        name = output_name(pred.source, pred.frame, "_cam.png", used)
        atomic_write_bytes(out_dir / name, pred.overlay_png())
        paths.append(out_dir / name)
    return paths
