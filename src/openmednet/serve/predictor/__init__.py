"""``Predictor``: a model plus its input contract, from files to class probabilities and Grad-CAMs.

The same object backs ``openmednet predict``, the web service and the Python API::

    predictor = Predictor.from_spec("runs/busi/model")        # `openmednet finetune --out runs/busi` wrote it
    for pred in predictor.predict_path("scans/", cam=True):
        print(pred.source, pred.label, pred.probabilities)

``load_predictor(spec)`` reads the saved model's card and returns a ``Predictor`` for a classifier
or a ``serve.segmenter.Segmenter`` for a segmentation model (``"task": "segmentation"``); both
read files with the helpers here (``iter_batches``, ``read_upload``, ``fit_channels``).

Input contract. The model's ``PretrainedCfg`` (its model card) says how training images were
prepared: channels and size, ``mean``/``std`` after scaling to [0, 1], and the intensity pipeline.
Prediction applies exactly that: readers turn each file into 8-bit gray or RGB (DICOM windowing,
MONOCHROME1 inversion, NIfTI slices), then the images are converted to the model's channels and
go through the evaluation pipeline of fine-tuning (``openmednet.engine.inputs.EvalInputs``: resize
of the short side, centre crop to ``input_size``, normalisation; the same object prepares a
fine-tuning run's validation and test images). A channel conversion is never silent: it is
recorded in ``Prediction.notes`` (and so in the CSV and the web service's JSON), logged with the
image's name, and raises a :class:`ChannelConversionWarning` whose text names only the
conversion (a per-file text would add an entry to ``__warningregistry__`` for every upload of a
long-running server).

Modules, one concern each: ``_files`` (input loading: files, folders and uploads to images, channel
fitting), ``_loading`` (model loading), ``_results`` (``Prediction``, CSV and overlay files); the
``Predictor`` and ``load_predictor`` are here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from openmednet.engine.inputs import EvalInputs
from openmednet.explain.gradcam import GradCAM
from openmednet.models import PretrainedCfg
from openmednet.serve.predictor._files import (
    UPLOAD_READERS,
    ChannelConversionWarning,
    SkippedFileWarning,
    TooManyImagesError,
    fit_channels,
    iter_batches,
    read_upload,
)
from openmednet.serve.predictor._loading import load_model
from openmednet.serve.predictor._results import (
    Prediction,
    cam_file_name,
    output_name,
    predictions_csv,
    save_predictions_csv,
    write_cam_overlays,
)

__all__ = [
    "UPLOAD_READERS",
    "ChannelConversionWarning",
    "Prediction",
    "Predictor",
    "SkippedFileWarning",
    "TooManyImagesError",
    "cam_file_name",
    "fit_channels",
    "iter_batches",
    "load_model",
    "load_predictor",
    "output_name",
    "predictions_csv",
    "read_upload",
    "save_predictions_csv",
    "write_cam_overlays",
]


def load_predictor(spec: str | Path, *, cam_layer: str | None = None, device: str | torch.device = "cpu") -> Any:
    """:func:`load_model`, then the object that predicts with it, chosen by the saved card's task.

    Returns:
        A :class:`Predictor` for a classifier, a ``serve.segmenter.Segmenter`` for a segmentation model.

    Raises:
        ValueError: ``cam_layer`` for a segmentation model (Grad-CAM explains class scores);
            the errors of :func:`load_model`.
    """
    model = load_model(spec)
    if getattr(model, "task", None) == "segmentation":
        from openmednet.serve.segmenter import Segmenter

        if cam_layer is not None:
            raise ValueError(f"'{spec}' is a segmentation model: it has no Grad-CAM (its overlays show the predicted "
                             "mask); drop --cam-layer")
        return Segmenter(model, device=device)
    return Predictor(model, cam_layer=cam_layer, device=device)


class Predictor:
    """Class probabilities (and optional Grad-CAMs) for images, under a model's input contract.

    Args:
        model: a classifier with ``num_classes > 0``; put in eval mode here.
        cfg: its input contract; default ``model.pretrained_cfg``.
        label_names: one name per class; default ``cfg.label_names`` or ``class_0, class_1...``.
        cam_layer: Grad-CAM target layer (default: ``default_target_layer`` at the card's input
            size: the last stage, or a finer one for small inputs).
        device: where the model runs.

    Thread-safe: the web service calls one instance from several worker threads.
    """

    task = "classification"

    def __init__(
        self,
        model: nn.Module,
        cfg: PretrainedCfg | None = None,
        label_names: Sequence[str] | None = None,
        cam_layer: str | None = None,
        device: str | torch.device = "cpu",
    ):
        if getattr(model, "task", None) == "segmentation":
            raise ValueError("a segmentation model predicts masks, not classes: use load_predictor(spec) or "
                             "openmednet.serve.segmenter.Segmenter(model)")
        cfg = cfg if cfg is not None else getattr(model, "pretrained_cfg", None)
        if cfg is None:
            raise ValueError("model has no pretrained_cfg (input contract): pass cfg=PretrainedCfg(...)")
        num_classes = getattr(model, "num_classes", 0)
        if num_classes < 1:
            arch = cfg.meta.get("architecture", "ARCH") + (f".{cfg.meta['tag']}" if cfg.meta.get("tag") else "")
            raise ValueError(
                f"'{arch}' has no classifier (num_classes=0): pre-trained weights are a backbone, not a "
                f"classifier. Fine-tune first (openmednet finetune --data DIR --init {arch} --out runs/x) "
                f"and pass the run's model folder (runs/x/model)"
            )
        names = tuple(label_names or cfg.label_names or (f"class_{i}" for i in range(num_classes)))
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} label names for a model with {num_classes} classes: {names}")
        if cfg.intensity != "uint8/255":
            # Readers map every modality to 8 bits (DICOM windows, NIfTI percentiles); a model trained
            # on another mapping would get inputs it never saw, so refuse rather than guess.
            raise ValueError(
                f"model card asks for intensity '{cfg.intensity}', but prediction feeds reader output "
                "scaled as 'uint8/255': re-export the card with the mapping the readers apply"
            )
        self.model = model.to(device).eval()
        self.cfg = cfg
        self.label_names = names
        self.device = torch.device(device)
        self.cam = GradCAM(self.model, cam_layer, input_size=cfg.input_size)
        self._inputs = EvalInputs(cfg)
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def from_spec(cls, spec: str | Path, **kwargs: Any) -> Predictor:
        """:func:`load_model` then ``Predictor(model, **kwargs)``."""
        return cls(load_model(spec), **kwargs)

    @property
    def in_chans(self) -> int:
        """Channels the model expects."""
        return self.cfg.input_size[0]

    def card(self) -> dict[str, Any]:
        """The model card as plain types (architecture, classes, input contract)."""
        cfg = self.cfg
        return {
            "task": self.task,
            "architecture": cfg.meta.get("architecture", type(self.model).__name__),
            "label_names": list(self.label_names),
            "input_contract": {
                "channels": self.in_chans, "size": list(cfg.input_size[1:]), "mean": list(cfg.mean),
                "std": list(cfg.std), "intensity": cfg.intensity, "interpolation": cfg.interpolation,
            },
            "license": cfg.license,
        }

    # ------------------------------------------------------------------------------- contract
    def preprocess(self, image: np.ndarray, source: str = "<array>") -> tuple[Tensor, list[str]]:
        """Apply the input contract to one 8-bit image: the evaluation transform of training.

        Args:
            image: ``uint8`` ``(H, W)`` gray or ``(H, W, 3)`` RGB, as readers produce.
            source: name used in the log.

        Returns:
            ``(in_chans, H', W')`` float tensor, ``(H', W') = input_size[1:]`` (resize of the short
            side, then centre crop), normalised with the card's mean/std; and the list of
            conversion notes.
        """
        image, notes = fit_channels(image, self.in_chans, source)  # noted and warned here; a no-op in EvalInputs
        return self._inputs(image), notes

    def model_view(self, x: Tensor) -> np.ndarray:
        """Undo the normalisation of a preprocessed ``(C, H, W)`` input: the uint8 image the model saw.

        Returns:
            ``(H, W)`` or ``(H, W, 3)`` uint8, for overlays aligned pixel for pixel with the CAM.
        """
        view = (x.cpu() * self._std + self._mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        return view[0].numpy() if view.shape[0] == 1 else view.permute(1, 2, 0).numpy()

    # ------------------------------------------------------------------------------- predict
    def predict_arrays(
        self, images: Sequence[np.ndarray], sources: Sequence[str] | None = None,
        frames: Sequence[int] | None = None, cam: bool = False,
    ) -> list[Prediction]:
        """Predict a batch of 8-bit images in one forward pass.

        Args:
            images: ``uint8`` ``(H, W)`` or ``(H, W, 3)`` arrays, any sizes (see :meth:`preprocess`).
            sources: a name per image for results and the log; default ``<array i>``.
            frames: a frame index per image; default 0.
            cam: also compute the Grad-CAM of each image's predicted class (same forward pass).

        Returns:
            One :class:`Prediction` per image, in order.
        """
        sources = list(sources or (f"<array {i}>" for i in range(len(images))))
        frames = list(frames or [0] * len(images))
        prepared = [self.preprocess(img, src) for img, src in zip(images, sources)]
        x = torch.stack([t for t, _ in prepared]).to(self.device)
        if cam:
            maps, logits = self.cam.compute(x)  # CAM of the predicted class
            maps = maps.cpu().numpy()
        else:
            with torch.no_grad():
                logits = self.model(x)
            maps = [None] * len(images)
        probs = torch.softmax(logits, dim=1).cpu()
        out = []
        for i, (tensor, notes) in enumerate(prepared):
            p = probs[i].tolist()
            out.append(Prediction(
                source=sources[i], frame=frames[i], probabilities=dict(zip(self.label_names, p)),
                label=self.label_names[int(np.argmax(p))], notes=notes,
                image=self.model_view(tensor) if cam else None, cam=maps[i],
            ))
        return out

    def predict_path(
        self, inputs: str | Path | Iterable[str | Path], cam: bool = False, batch_size: int = 16,
        exclude: Iterable[str | Path] = (),
    ) -> Iterator[Prediction]:
        """Predict every 2D image in files and folders (PNG/JPEG/DICOM/NIfTI; volumes give slices).

        Files are read by :func:`iter_batches` (unreadable ones skipped with a
        :class:`SkippedFileWarning`; files under the ``exclude`` folders, e.g. the run's own
        overlays, passed over). Errors of the model itself are not input errors: they propagate.
        """
        for images, sources, frames in iter_batches(inputs, batch_size, exclude):
            yield from self.predict_arrays(images, sources, frames, cam=cam)

    def predict_bytes(self, data: bytes, filename: str, cam: bool = True,
                      max_pixels: int | None = None, max_frames: int | None = None,
                      max_voxels: int | None = None) -> list[Prediction]:
        """Predict the images of an uploaded file (all frames/slices).

        Args:
            data: the file's bytes.
            filename: its name; only its suffix is used, to pick the reader among PNG/JPEG/TIFF/...
                (Pillow), DICOM and NIfTI (``.npz`` archives are not accepted: they unpack every
                array at once). Without a known suffix only DICOM is recognised, by its ``DICM``
                magic bytes (PACS exports often have no suffix); other formats are refused.
            cam: compute Grad-CAMs.
            max_pixels: refuse images with more pixels (checked on headers where possible).
            max_frames: refuse files with more images than this; reading stops at the first
                image over the limit, and Pillow files are refused from their frame count before
                any frame is decoded.
            max_voxels: refuse NIfTI volumes with more voxels, from the header; default
                ``max_pixels * max_frames`` when both are given, else the reader's default.

        Raises:
            SkipImage: the file is not a usable image (``reason`` says why).
            TooManyImagesError: more than ``max_frames`` images.
            NoReaderError: no reader handles the file (a ``ValueError``).
        """
        arrays, frames = read_upload(data, filename, max_pixels, max_frames, max_voxels)
        return self.predict_arrays(arrays, [filename] * len(arrays), frames, cam=cam)
