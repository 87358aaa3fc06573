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
"""

from __future__ import annotations

import csv
import io
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from openmednet.data.images import to_channels
from openmednet.data.readers import (
    SUPPORTED_READERS,
    NoReaderError,
    SkipImage,
    get_reader,
    read_images,
)
from openmednet.engine.inputs import EvalInputs
from openmednet.explain.gradcam import GradCAM, overlay_png
from openmednet.models import (
    InitSpec,
    PretrainedCfg,
    create_model,
    get_pretrained_cfg,
    is_model,
    load_pretrained,
)
from openmednet.models._weights import CARD_FILE, resolve_card_path
from openmednet.utils import atomic_write_bytes, atomic_write_text

__all__ = [
    "UPLOAD_READERS", "ChannelConversionWarning", "Prediction", "Predictor", "SkippedFileWarning", "TooManyImagesError",
    "fit_channels", "iter_batches", "load_model", "load_predictor", "output_name", "predictions_csv", "read_upload",
    "save_predictions_csv", "write_cam_overlays",
]

logger = logging.getLogger(__name__)


class TooManyImagesError(ValueError):
    """A file holds more images (frames, slices) than the caller accepts."""


class ChannelConversionWarning(UserWarning):
    """An image's channels were converted to match the model (colour -> gray or gray -> colour)."""


class SkippedFileWarning(UserWarning):
    """An input file could not be read and contributes no prediction (``openmednet predict`` exits 3)."""


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


# ----------------------------------------------------------------------------------- loading
def load_model(spec: str | Path) -> nn.Module:
    """Load a model with its weights from a saved model directory/file or a registered weight set.

    A registry name is never built with random weights: an untrained 1000-class model gives a
    confident-looking label that changes from run to run.

    Args:
        spec: a directory holding ``model.safetensors`` and its model card (written by
            ``save_pretrained``; ``openmednet finetune --out RUN`` writes ``RUN/model``), the run
            folder ``RUN`` itself, the ``.safetensors`` file, or a registered weight set
            (``"mednet_gray.<tag>"``, or ``"mednet_gray"`` for its default weights). A
            segmentation run (``finetune --task segmentation``) is recognised from its card.

    Returns:
        The model in eval mode with ``model.pretrained_cfg`` set: a classifier, or an
        ``eval.segmentation.SegmentationNet`` (``model.task == "segmentation"``).

    Raises:
        FileNotFoundError: ``spec`` is neither a registered name nor an existing path.
        ValueError: ``spec`` is an architecture without registered weights, or a path that holds
            no saved model.
    """
    try:
        init = InitSpec.parse(spec)  # the init grammar of fine-tuning: one parser
    except (FileNotFoundError, ValueError):
        init = None  # reported below with what prediction accepts
    if init is not None and init.kind == "path":
        return _load_saved(init.path, spec)
    if init is not None and init.kind in ("auto", "scratch"):
        raise ValueError(f"'{spec}' says how to start fine-tuning, not which trained model to use: fine-tune first "
                         f"(openmednet finetune --data DIR --init {spec} --out runs/x) and pass runs/x/model")
    if init is not None and is_model(init.name):
        if get_pretrained_cfg(str(spec), allow_missing=True) is None:
            raise ValueError(
                f"'{spec}' is an architecture without weights: a randomly initialised model predicts noise. "
                f"Fine-tune it first (openmednet finetune --data DIR --init scratch:{spec} --out runs/x) and "
                f"pass the run's model folder (runs/x/model)"
            )
        return create_model(str(spec), pretrained=True).eval()
    raise FileNotFoundError(
        f"model '{spec}' is neither a registered model (see `openmednet models list`) nor an existing "
        "directory/file with model.safetensors and its model card"
    )


def _model_folder(path: Path) -> Path:
    """The folder of a saved model: ``path`` itself, a weights file's folder, or ``RUN/model``."""
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent  # the card sits next to its weights (save_pretrained's layout)
    if path.is_dir() and not (path / CARD_FILE).is_file() and (path / "model" / CARD_FILE).is_file():
        return path / "model"  # a fine-tuning run folder
    return path


def _load_saved(path: Path, spec: str | Path) -> nn.Module:
    """A saved classifier or segmenter, told apart by its card (see :func:`load_model`)."""
    from openmednet.eval.segmentation import (
        is_segmentation_model,
        load_segmentation_model,
    )

    folder = _model_folder(path)
    if is_segmentation_model(folder):
        return load_segmentation_model(folder)
    if not resolve_card_path(folder).is_file():
        raise FileNotFoundError(f"'{spec}' holds no saved model: expected a fine-tuning run folder RUN or RUN/model "
                                f"(written by `openmednet finetune --out RUN`, classification or segmentation), "
                                f"its model.safetensors, or a {CARD_FILE}")
    try:
        return load_pretrained(folder).eval()  # verifies the checksum the card records
    except ValueError:
        if folder.is_file() and folder.suffix != ".json":
            raise ValueError(f"'{spec}' is not a saved model (no classification or segmentation model card): pass a "
                             f"fine-tuning run folder RUN or RUN/model, its model.safetensors or a {CARD_FILE}") from None
        raise


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


def _read_images(
    path: Path, max_pixels: int | None = None, max_frames: int | None = None, max_voxels: int | None = None,
) -> Iterator[tuple[np.ndarray, int]]:
    """``(uint8 (H, W) or (H, W, 3), frame)`` for every usable 2D image in ``path``, lazily.

    The limits go to the readers that check them on headers before decoding: ``max_pixels`` to
    Pillow (per page) and DICOM (rows x columns x frames), ``max_frames`` to Pillow (pages),
    ``max_voxels`` to NIfTI (per volume). ``max_pixels`` is checked again on every decoded image.

    Raises:
        NoReaderError: no reader handles ``path``.
    """
    limits = {"max_pixels": max_pixels, "max_frames": max_frames, "max_voxels": max_voxels}
    # get_reader hands each reader only the options it takes.
    reader = get_reader(path, **{k: v for k, v in limits.items() if v is not None})
    for array, meta in read_images(path, reader):
        if max_pixels is not None and array.shape[0] * array.shape[1] > max_pixels:
            raise SkipImage("decompression_bomb", f"{array.shape[1]}x{array.shape[0]} image exceeds "
                            f"{max_pixels} pixels", path, meta.frame)
        yield array, meta.frame


def _has_reader(path: Path) -> bool:
    try:
        get_reader(path)
    except NoReaderError:
        return False
    return True


def _list_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files to predict: given files as is, folder contents that some reader handles (sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
            files.extend(p for p in found if _has_reader(p))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item} (expected an image file, DICOM, NIfTI or folder)")
    return files


def iter_batches(inputs: str | Path | Iterable[str | Path],
                 batch_size: int) -> Iterator[tuple[list[np.ndarray], list[str], list[int]]]:
    """``(images, sources, frames)`` batches of every 2D image in files and folders, lazily.

    Folders are walked recursively and files no reader handles (``labels.csv``...) are passed
    over. A file that fails to read is skipped with a :class:`SkippedFileWarning`, so one bad file
    does not stop a folder; it contributes no image (not the frames read before the failure).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    batch: list[tuple[np.ndarray, str, int]] = []
    for path in _list_files(inputs):
        # Only the reading is guarded: a file's images join the batch once all are read, and the
        # caller's inference runs outside the try, so its errors are not reported as a skipped file.
        try:
            images = list(_read_images(path))
        except (SkipImage, ValueError, OSError) as e:
            warnings.warn(f"skipped {path}: {e}", SkippedFileWarning, stacklevel=2)
            continue
        for array, frame in images:
            batch.append((array, str(path), frame))
            if len(batch) == batch_size:
                yield _unzip(batch)
    if batch:
        yield _unzip(batch)


def _unzip(batch: list[tuple[np.ndarray, str, int]]) -> tuple[list[np.ndarray], list[str], list[int]]:
    images, sources, frames = (list(v) for v in zip(*batch))
    batch.clear()
    return images, sources, frames


def read_upload(data: bytes, filename: str, max_pixels: int | None = None, max_frames: int | None = None,
                max_voxels: int | None = None) -> tuple[list[np.ndarray], list[int]]:
    """The images and frame indices of an uploaded file (see :meth:`Predictor.predict_bytes`).

    Raises:
        SkipImage: the file is not a usable image (``reason`` says why).
        TooManyImagesError: more than ``max_frames`` images.
        NoReaderError: no reader handles the file (a ``ValueError``).
    """
    if max_voxels is None and max_pixels is not None and max_frames is not None:
        max_voxels = max_pixels * max_frames
    images: list[tuple[np.ndarray, int]] = []
    with tempfile.TemporaryDirectory(prefix="openmednet-upload-") as tmp:
        path = Path(tmp) / f"upload{_upload_suffix(filename)}"  # never trust the name as a path
        path.write_bytes(data)
        # Lazily, so a file of thousands of frames costs at most max_frames + 1 decoded images.
        try:
            with closing(_read_images(path, max_pixels, max_frames, max_voxels)) as stream:
                for image in stream:
                    images.append(image)
                    if max_frames is not None and len(images) > max_frames:
                        raise TooManyImagesError(
                            f"{filename} holds {max_frames + 1} or more images, more than the limit of {max_frames}"
                        )
        except (SkipImage, ValueError) as e:
            raise _hide_path(e, path, filename) from None
    if not images:
        raise SkipImage("unsupported_image", f"{filename}: no usable 2D image in the file")
    arrays, frames = zip(*images)
    return list(arrays), list(frames)


def fit_channels(image: np.ndarray, channels: int, source: str) -> tuple[np.ndarray, list[str]]:
    """Convert ``image`` to ``channels``; note, log and warn any conversion.

    Returns:
        ``(converted image, notes)``: ``notes`` is ``[]`` or one of ``"rgb->gray"``,
        ``"rgb->gray (colour discarded)"``, ``"gray->rgb"``.
    """
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"{source}: expected uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    converted, changed = to_channels(image, channels)
    if not changed:
        return converted, []
    if image.ndim == 3:
        lossless = bool((image == image[..., :1]).all())  # gray content saved as RGB
        note = "rgb->gray" + ("" if lossless else " (colour discarded)")
    else:
        note = "gray->rgb"
    message = f"model expects {channels} channel(s), image has {3 if image.ndim == 3 else 1}: converted {note}"
    logger.info("%s: %s", source, message)
    # No file name in the warning text: the set of texts stays bounded (see the module docstring).
    warnings.warn(message, ChannelConversionWarning, stacklevel=4)
    return converted, [note]


# ----------------------------------------------------------------------------------- predictor
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
    ) -> Iterator[Prediction]:
        """Predict every 2D image in files and folders (PNG/JPEG/DICOM/NIfTI; volumes give slices).

        Files are read by :func:`iter_batches` (unreadable ones skipped with a
        :class:`SkippedFileWarning`). Errors of the model itself are not input errors: they propagate.
        """
        for images, sources, frames in iter_batches(inputs, batch_size):
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


def _hide_path(error: Exception, path: Path, filename: str) -> Exception:
    """``error`` with the server's temporary ``path`` replaced by the upload's name (in place).

    Readers name the file they read (nibabel: 'Cannot work out file type of "/tmp/..."'); the
    client must not learn the server's paths.
    """
    def hide(text: object) -> object:
        if not isinstance(text, str):
            return text
        return text.replace(str(path), filename).replace(str(path.parent), "<upload>")

    error.args = tuple(hide(a) for a in error.args)
    if isinstance(error, SkipImage):
        error.message, error.path = hide(error.message), None
    return error


#: Readers that take uploads. Not "npz": an archive is unpacked whole (every array of every
#: split) and kept in the reader's cache, so its size is bounded by nothing the service checks.
UPLOAD_READERS = ("dicom", "nifti", "pil")

# From the readers' own lists, longest first so that ".nii.gz" wins over any shorter ending.
_UPLOAD_SUFFIXES = tuple(sorted({s for name in UPLOAD_READERS for s in SUPPORTED_READERS[name].suffixes},
                                key=lambda s: (-len(s), s)))


def _upload_suffix(filename: str) -> str:
    """The upload's suffix if an upload reader claims it, else ``""`` (then only DICOM is sniffed)."""
    name = filename.lower()
    return next((s for s in _UPLOAD_SUFFIXES if name.endswith(s)), "")


# ----------------------------------------------------------------------------------- output
def predictions_csv(predictions: Iterable[Prediction], label_names: Sequence[str]) -> tuple[str, int]:
    """Predictions as CSV text (``source,frame,label,p_<name>...,notes``) and the number of rows.

    ``predictions`` is consumed once, row by row: a generator's images can be freed as it goes.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["source", "frame", "label", *(f"p_{n}" for n in label_names), "notes"])
    rows = 0
    for p in predictions:
        writer.writerow([p.source, p.frame, p.label, *(f"{p.probabilities[n]:.6f}" for n in label_names),
                         ";".join(p.notes)])
        rows += 1
    return buf.getvalue(), rows


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

    ``scan.nii.gz`` slice 3 with ``suffix="_cam.png"`` -> ``scan_f3_cam.png``. With ``used`` (name
    -> times used, updated in place) a name already given gets ``_2``, ``_3``... (same file names
    in different folders).
    """
    name = Path(source).name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem
    stem = f"{stem}{'' if frame == 0 else f'_f{frame}'}"
    if used is None:
        return stem + suffix
    used[stem] = used.get(stem, 0) + 1
    return f"{stem}{'' if used[stem] == 1 else f'_{used[stem]}'}{suffix}"


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
