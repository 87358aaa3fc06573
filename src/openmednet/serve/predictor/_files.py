"""Input loading: files, folders and uploads to 8-bit 2D images, and their channels fitted to a model.

Shared by ``Predictor`` and ``serve.segmenter.Segmenter`` (and ``openmednet export``'s sample
inputs): ``iter_batches`` (files and folders, lazily, unreadable files skipped with a warning),
``read_upload`` (an upload's bytes, with the service's limits, never naming a server path) and
``fit_channels`` (a channel conversion is noted, logged and warned, never silent).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np

from openmednet.data.images import to_channels
from openmednet.data.readers import (
    SUPPORTED_READERS,
    NoReaderError,
    SkipImage,
    get_reader,
    read_images,
)

__all__ = ["UPLOAD_READERS", "ChannelConversionWarning", "SkippedFileWarning", "TooManyImagesError", "fit_channels",
           "iter_batches", "read_upload"]

logger = logging.getLogger(__name__)


class TooManyImagesError(ValueError):
    """A file holds more images (frames, slices) than the caller accepts."""


class ChannelConversionWarning(UserWarning):
    """An image's channels were converted to match the model (colour -> gray or gray -> colour)."""


class SkippedFileWarning(UserWarning):
    """An input file could not be read and contributes no prediction (``openmednet predict`` exits 3)."""



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


def _under(path: Path, folders: list[Path]) -> bool:
    """Whether ``path`` (links followed) lies in one of the resolved ``folders``."""
    real = path.resolve()
    return any(folder == real or folder in real.parents for folder in folders)


def _list_files(inputs: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> list[Path]:
    """Files to predict: given files as is, folder contents that some reader handles (sorted),
    except what lies under an ``exclude`` folder (links followed)."""
    skip = [Path(p).resolve() for p in exclude]
    files: list[Path] = []
    passed_over = 0
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
            kept = [p for p in found if not _under(p, skip)]
            passed_over += len(found) - len(kept)
            files.extend(p for p in kept if _has_reader(p))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item} (expected an image file, DICOM, NIfTI or folder)")
    if passed_over:
        logger.info("passed over %d file(s) in the output folders %s", passed_over, ", ".join(map(str, skip)))
    return files


def iter_batches(inputs: str | Path | Iterable[str | Path], batch_size: int,
                 exclude: Iterable[str | Path] = ()) -> Iterator[tuple[list[np.ndarray], list[str], list[int]]]:
    """``(images, sources, frames)`` batches of every 2D image in files and folders, lazily.

    Folders are walked recursively and files no reader handles (``labels.csv``...) are passed
    over, as are files under the ``exclude`` folders: the caller's output folders, so that a run
    writing its masks or overlays inside an input folder does not predict them when run again. A
    file that fails to read is skipped with a :class:`SkippedFileWarning`, so one bad file does
    not stop a folder; it contributes no image (not the frames read before the failure).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    batch: list[tuple[np.ndarray, str, int]] = []
    for path in _list_files(inputs, exclude):
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
