"""``Segmenter``: a fine-tuned segmentation model, from files to class masks and overlays.

The segmentation counterpart of :class:`~openmednet.serve.predictor.Predictor`, behind the same
``openmednet predict``, web service and Python API; ``load_predictor`` picks it when the saved
model's card says ``"task": "segmentation"`` (``openmednet finetune --task segmentation``)::

    segmenter = load_predictor("runs/lgg")                     # or runs/lgg/model
    for pred in segmenter.predict_path("scans/"):
        print(pred.source, pred.fractions)                      # pred.mask: uint8 (H, W)

Per image, as fine-tuning's test evaluation does (``openmednet.eval.segmentation``):

1. the reader's 8-bit image, converted to the model's channels (``fit_channels``: noted, logged,
   warned, as for classification);
2. the evaluation pipeline ``segmentation_inputs(card)``: ``EvalInputs`` with the whole image
   resized to the card's ``S x S`` (no crop: every pixel gets a prediction), normalised;
3. the U-Net's logits ``(K, S, S)``, resized **bilinearly on the logits** back to the image's
   original ``(H, W)`` (``upsample_logits``), then the argmax: a uint8 mask of class indices
   ``0..K-1`` (0 = background) at the original size.

Files are read with the classification helpers (``iter_batches``, ``read_upload``), so skipped
files, upload limits and reader errors behave the same. Overlays are ``mask_overlay``: the
colours of fine-tuning's ``plots/overlays.png``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openmednet.eval.segmentation import (
    mask_overlay,
    segmentation_inputs,
    upsample_logits,
)
from openmednet.serve.predictor import (
    fit_channels,
    iter_batches,
    output_name,
    read_upload,
)
from openmednet.utils import atomic_write_bytes, csv_text

__all__ = ["SegmentationPrediction", "Segmenter", "rows_csv", "segmentation_csv_header", "write_segmentation"]


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SegmentationPrediction:
    """The result for one 2D image.

    Attributes:
        source: the file it came from (upload name for the web service).
        frame: slice / frame index inside the file (0 for single images).
        mask: uint8 ``(H, W)`` class indices at the image's original size (0 = background).
        fractions: ``{class name: share of the image's pixels}``, summing to 1.
        notes: what was done to fit the input contract (e.g. ``"rgb->gray"``).
        image: the 8-bit image as read (original size), for the overlay; ``None`` once dropped.
    """

    source: str
    frame: int
    mask: np.ndarray = field(repr=False)
    fractions: dict[str, float]
    notes: list[str] = field(default_factory=list)
    image: np.ndarray | None = field(default=None, repr=False)

    def mask_png(self) -> bytes:
        """The mask as a single-channel PNG (pixel value = class index)."""
        return _png(self.mask)

    def overlay_png(self) -> bytes:
        """The image with each predicted class in its colour (``mask_overlay``), as PNG bytes.

        Raises:
            ValueError: the image was dropped.
        """
        if self.image is None:
            raise ValueError(f"no image kept for {self.source}: the overlay must be made before the image is dropped")
        return _png(mask_overlay(self.image, self.mask))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no pixel arrays)."""
        return {"source": self.source, "frame": self.frame, "size": list(self.mask.shape),
                "fractions": self.fractions, "notes": list(self.notes)}


class Segmenter:
    """Class masks for images under a segmentation model's input contract (module docstring).

    Args:
        model: an ``eval.segmentation.SegmentationNet`` (``load_segmentation_model``); put in eval mode.
        device: where the model runs.

    Thread-safe: the web service calls one instance from several worker threads.
    """

    task = "segmentation"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu"):
        if getattr(model, "task", None) != "segmentation":
            raise ValueError(f"{type(model).__name__} is not a segmentation model: use Predictor for a classifier")
        self.model = model.to(device).eval()
        self.cfg = model.pretrained_cfg
        self.label_names = tuple(model.card.get("class_names") or self.cfg.label_names)
        self.device = torch.device(device)
        self._inputs = segmentation_inputs(self.cfg)

    @property
    def in_chans(self) -> int:
        """Channels the model expects."""
        return int(self.cfg.input_size[0])

    def card(self) -> dict[str, Any]:
        """The model card as plain types (task, encoder, classes, input contract)."""
        cfg, card = self.cfg, self.model.card
        return {
            "task": self.task,
            "architecture": f"Unet(tu-{card['encoder']})",
            "label_names": list(self.label_names),
            "input_contract": {"channels": self.in_chans, "size": list(cfg.input_size[1:]), "mean": list(cfg.mean),
                               "std": list(cfg.std), "intensity": card.get("intensity", "uint8/255"),
                               "resize": self._inputs.resize},
            "output": "uint8 mask at the image's size, class index per pixel (logits resized bilinearly, then argmax)",
        }

    def preprocess(self, image: np.ndarray, source: str = "<array>") -> tuple[torch.Tensor, list[str]]:
        """``(float32 (C, S, S) model input, conversion notes)`` of one uint8 ``(H, W)`` / ``(H, W, 3)`` image."""
        image, notes = fit_channels(image, self.in_chans, source)
        return self._inputs(image), notes

    @torch.no_grad()
    def predict_arrays(self, images: Sequence[np.ndarray], sources: Sequence[str] | None = None,
                       frames: Sequence[int] | None = None) -> list[SegmentationPrediction]:
        """Masks of a batch of 8-bit images (any sizes) in one forward pass, in order."""
        sources = list(sources or (f"<array {i}>" for i in range(len(images))))
        frames = list(frames or [0] * len(images))
        prepared = [self.preprocess(img, src) for img, src in zip(images, sources)]
        logits = self.model(torch.stack([x for x, _ in prepared]).to(self.device))
        out = []
        for i, image in enumerate(images):
            mask = upsample_logits(logits[i:i + 1], image.shape[:2]).argmax(1)[0].cpu().numpy().astype(np.uint8)
            counts = np.bincount(mask.ravel(), minlength=len(self.label_names))
            out.append(SegmentationPrediction(
                source=sources[i], frame=frames[i], mask=mask, notes=prepared[i][1], image=image,
                fractions={name: float(c / mask.size) for name, c in zip(self.label_names, counts)},
            ))
        return out

    def predict_path(self, inputs: str | Path | Iterable[str | Path], batch_size: int = 16,
                     exclude: Iterable[str | Path] = ()) -> Iterator[SegmentationPrediction]:
        """Masks of every 2D image in files and folders; unreadable files are skipped with a
        ``SkippedFileWarning`` and files under ``exclude`` passed over (``iter_batches``), as for
        classification."""
        for images, sources, frames in iter_batches(inputs, batch_size, exclude):
            yield from self.predict_arrays(images, sources, frames)

    def predict_bytes(self, data: bytes, filename: str, max_pixels: int | None = None, max_frames: int | None = None,
                      max_voxels: int | None = None) -> list[SegmentationPrediction]:
        """Masks of the images of an uploaded file, under the limits of ``Predictor.predict_bytes``."""
        arrays, frames = read_upload(data, filename, max_pixels, max_frames, max_voxels)
        return self.predict_arrays(arrays, [filename] * len(arrays), frames)


# ----------------------------------------------------------------------------------- output
def segmentation_csv_header(label_names: Sequence[str]) -> list[str]:
    """Columns of ``openmednet predict``'s CSV for a segmentation model."""
    return ["source", "frame", "mask", "overlay", "height", "width", *(f"fraction_{n}" for n in label_names), "notes"]


def write_segmentation(predictions: Iterable[SegmentationPrediction], out_dir: str | Path,
                       label_names: Sequence[str]) -> Iterator[tuple[SegmentationPrediction, list[str]]]:
    """Write each mask and overlay (PNG, atomically), drop its image, and pass on its CSV row.

    Files: ``out_dir/masks/<name>[_f<frame>]_mask.png`` (uint8 class indices, the image's size) and
    ``out_dir/overlays/<name>[_f<frame>]_overlay.png``; names made unique by ``output_name``.
    Rows follow :func:`segmentation_csv_header`, with paths relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    used: dict[str, int] = {}
    for p in predictions:
        name = output_name(p.source, p.frame, "", used)
        mask_rel, overlay_rel = f"masks/{name}_mask.png", f"overlays/{name}_overlay.png"
        atomic_write_bytes(out_dir / mask_rel, p.mask_png())
        atomic_write_bytes(out_dir / overlay_rel, p.overlay_png())
        p.image = None  # written: the row and the table need only the fractions
        row = [p.source, str(p.frame), mask_rel, overlay_rel, str(p.mask.shape[0]), str(p.mask.shape[1]),
               *(f"{p.fractions[n]:.6f}" for n in label_names), ";".join(p.notes)]
        yield p, row


def rows_csv(rows: Iterable[list[str]], label_names: Sequence[str]) -> tuple[str, int]:
    """CSV text (header + ``rows``) and the number of rows."""
    return csv_text(segmentation_csv_header(label_names), rows)
