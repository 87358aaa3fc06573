"""The reader contract: every file format becomes ``(array, ImageMeta)`` pairs.

Modelled on MONAI's ``ImageReader``: a reader says which files it can read (``verify_suffix``,
refined by ``can_read`` for formats with a magic number) and yields 2D images. One file may hold
several images (multi-frame DICOM, NIfTI volumes, ``.npz`` arrays), so ``read`` is a generator.

Skips. A reader *raises* ``SkipImage`` when the whole file is unusable (corrupt, unsupported
transfer syntax...) and *yields* a ``SkipImage`` for one unusable frame or slice (an empty NIfTI
slice) so the remaining frames still come through; ``openmednet.data.readers.read_images``
separates the two for callers. ``reason`` is a short stable key that build reports count.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

#: Stable skip reasons (keys of the build report). Readers may add format-specific ones.
SKIP_REASONS = (
    "empty_file",  # zero bytes
    "missing_file",  # listed in a manifest but absent on disk
    "not_an_image",  # the bytes are not the format the name claims (text named .png)
    "corrupt",  # truncated or damaged data
    "decompression_bomb",  # header claims more pixels, or a longer side, than the reader's limit
    "extreme_aspect",  # header claims a strip (e.g. 100000 x 1) longer than MAX_ASPECT times its width
    "unsupported_transfer_syntax",  # DICOM compression without an installed decoder
    "unsupported_format",  # no reader for this file
    "unsupported_image",  # readable but not a 2D picture (e.g. 5D NIfTI, DICOM without pixels)
    "empty_slice",  # constant or near-constant frame/slice
    "read_error",  # any other failure inside a third-party decoder
    "broken_link",  # a symbolic link that loops or points at nothing
    "bad_file_name",  # the file name is not valid UTF-8 (it could not be reported, stored or written to a CSV)
    "outside_root",  # a manifest path or symlink that resolves outside its source folder
)

#: Longest accepted image side, in pixels. Twice the side of the largest square the pixel limits
#: admit, and three times the longest real 2D radiograph (stitched long-leg films, ~6-7k).
DEFAULT_MAX_SIDE = 16384
#: Largest accepted ratio of the longer to the shorter side. Real images here stay under 3.2
#: (../shared/data: a 128 x 41 chest X-ray); a 512 x 32 strip is the most elongated image
#: accepted. Without it a 177-byte 100000 x 1 PNG passes a pixel limit, and every later square
#: resize in "crop" mode blows it up to ``size * 100000 * size`` pixels.
DEFAULT_MAX_ASPECT = 16.0
#: Robust percentiles that become 0 and 255 when a medical file carries no display window
#: (DICOM without VOI LUT/window, NIfTI volumes): a few extreme voxels do not set the contrast.
PERCENTILES = (0.5, 99.5)


class SkipImage(Exception):
    """A file (or one frame of it) that cannot or should not be used.

    Args:
        reason: short stable key counted in build reports, one of ``SKIP_REASONS`` (e.g.
            ``"corrupt"``, ``"unsupported_transfer_syntax"``, ``"empty_slice"``).
        message: what was found and what to do about it.
        path: the file concerned, when known.
        frame: the frame/slice index inside the file, ``None`` for the whole file.
    """

    def __init__(self, reason: str, message: str, path: Path | None = None, frame: int | None = None):
        where = "" if path is None else f" [{path}{'' if frame is None else f' frame {frame}'}]"
        super().__init__(f"{reason}: {message}{where}")
        self.reason = reason
        self.message = message
        self.path = path
        self.frame = frame


@dataclass
class ImageMeta:
    """What is known about one 2D image.

    Readers fill the pixel facts; ``read_item`` adds the source facts (source name, label, split,
    group) taken from the ``SourceItem`` so every image carries its provenance.

    Attributes:
        path: the file it came from (original path).
        frame: index inside the file (DICOM frame, NIfTI slice along the axis, ``.npz`` row), 0 for
            single images.
        modality: e.g. ``"CT"``, ``"MR"``, ``"CR"``, ``"XR"``, ``"US"``; ``""`` when unknown.
        photometric: ``"MONOCHROME2"`` for gray (after any MONOCHROME1 inversion), ``"RGB"``.
        original_shape: shape before any conversion (e.g. ``(rows, cols)``, ``(X, Y, Z, T)``).
        original_dtype: dtype or mode as stored (``"uint16"``, ``"I;16"``, ``"CMYK"``...).
        source: name of the ``SourceSpec`` the image was enumerated from (``""`` if read directly).
        label: class name, ``None`` when unlabelled.
        split: ``"train"``/``"val"``/``"test"`` when the source defines one, else ``None``.
        group: patient/lesion id for group-aware splits, else ``None``.
        extra: format-specific facts (window used, rescale slope, slice axis, scaling rule...).
    """

    path: Path
    frame: int = 0
    modality: str = ""
    photometric: str = ""
    original_shape: tuple[int, ...] = ()
    original_dtype: str = ""
    source: str = ""
    label: str | None = None
    split: str | None = None
    group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: What ``ImageReader.read`` yields: an image, or a per-frame skip.
ReadResult = Union[tuple[np.ndarray, ImageMeta], SkipImage]


class ImageReader(abc.ABC):
    """Base class of format readers.

    ``read`` yields ``(array, meta)`` where ``array`` is ``(H, W)`` for gray or ``(H, W, 3)`` for
    colour, ``uint8`` in [0, 255] (intensity mapping to 8 bits is the reader's job: DICOM
    windowing, NIfTI percentile scaling, 16-bit PNG scaling). It raises ``SkipImage`` for an
    unusable file and yields a ``SkipImage`` for an unusable frame.

    Attributes:
        name: key in ``SUPPORTED_READERS``.
        suffixes: lower-case file-name endings the reader claims (``".nii.gz"``).
        install_hint: pip command that provides the reader's decoder library.
    """

    name: str = ""
    suffixes: tuple[str, ...] = ()
    install_hint: str = ""

    def verify_suffix(self, path: Path) -> bool:
        """Whether this reader handles ``path`` judging by its name."""
        name = Path(path).name.lower()
        return any(name.endswith(s) for s in self.suffixes)

    def can_read(self, path: Path) -> bool:
        """Whether this reader handles ``path``; by default the name decides (see ``verify_suffix``).

        Readers of formats with a magic number (DICOM) override this to also look at the bytes.
        """
        return self.verify_suffix(path)

    @abc.abstractmethod
    def read(self, path: Path) -> Iterator[ReadResult]:
        """Yield the 2D images of ``path``; raise ``SkipImage`` for an unusable file."""


def check_not_empty(path: Path) -> None:
    """Raise ``SkipImage`` ``"bad_file_name"``, ``"missing_file"``, ``"broken_link"`` or ``"empty_file"``
    before decoding.

    Decoders report these cases with unrelated messages (or, for zero-byte DICOM, with a
    parse error), so readers check them first to get stable reasons.
    """
    path = Path(path)
    check_file_name(path)
    if not path.is_file():
        if path.is_symlink():
            raise SkipImage("broken_link", _broken_link(path), path)
        raise SkipImage("missing_file", "file not found; check the path or the manifest row", path)
    if path.stat().st_size == 0:
        raise SkipImage("empty_file", "file has 0 bytes; re-download or remove it", path)


def check_file_name(path: Path) -> None:
    """Raise ``SkipImage("bad_file_name")`` for a path that is not valid UTF-8.

    POSIX names are bytes; Python hands undecodable ones over as surrogate escapes, which every
    later UTF-8 write (a corpus record, a report, a predictions CSV) refuses. Refusing the file
    here, once, with its bytes in the message, turns what was an abort far from the cause into
    one reported skip.
    """
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise SkipImage(
            "bad_file_name",
            f"file name is not valid UTF-8 ('{printable_path(path)}'); rename it (e.g. convmv -f latin1 -t utf8)",
        ) from None


def printable_path(path: str | Path) -> str:
    """``path`` as text any UTF-8 writer accepts: undecodable bytes shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _broken_link(path: Path) -> str:
    """Why a symbolic link leads to no file: a loop, or a missing target."""
    try:
        path.resolve(strict=True)
    except (RuntimeError, OSError) as e:  # Python < 3.13 reports a loop as RuntimeError
        if isinstance(e, FileNotFoundError):
            return f"symbolic link to a missing file ({path.readlink()}); fix or remove the link"
        return "symbolic link loop; fix or remove the link"
    return "symbolic link to something that is not a file; fix or remove the link"


def check_image_size(
    width: int,
    height: int,
    path: Path | None,
    frame: int | None = None,
    *,
    max_pixels: int,
    max_side: int = DEFAULT_MAX_SIDE,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    hint: str | None = None,
) -> None:
    """The one geometry bound of every reader, applied to header sizes before any pixel is decoded.

    Bounds the area (``max_pixels``), each side (``max_side``) and the aspect ratio
    (``max_aspect``): the area alone admits strips whose later resizes cost far more than their
    bytes (predict, serve and the corpus builder all resize what the readers yield).

    Args:
        width, height: the sizes the header claims.
        path, frame: the file and frame, for the message.
        max_pixels, max_side, max_aspect: the limits.
        hint: the reader class to name in "pass <hint>(max_...=...) if genuine" (``None``: the
            limits are not options of the caller).

    Raises:
        SkipImage: ``"decompression_bomb"`` (area or a side over the limit) or
            ``"extreme_aspect"`` (longer side over ``max_aspect`` times the shorter, or a zero side).
    """
    size = f"header claims {width}x{height}"
    long, short = max(width, height), min(width, height)

    def fix(option: str) -> str:
        return f"; pass {hint}({option}=...) if genuine" if hint else ""

    if width * height > max_pixels:
        message = f"{size} = {width * height} pixels, limit is {max_pixels}{fix('max_pixels')}"
        raise SkipImage("decompression_bomb", message, path, frame)
    if long > max_side:
        raise SkipImage("decompression_bomb", f"{size}: a side of {long} pixels, limit is {max_side}{fix('max_side')}",
                        path, frame)
    if short < 1 or long > max_aspect * short:
        message = f"{size}: aspect ratio {long}:{short} exceeds {max_aspect:g}:1{fix('max_aspect')}"
        raise SkipImage("extreme_aspect", message, path, frame)


def check_limits(max_side: int, max_aspect: float) -> None:
    """Validate a reader's ``max_side`` and ``max_aspect`` arguments (``ValueError``)."""
    if int(max_side) < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side!r}")
    if not float(max_aspect) >= 1:
        raise ValueError(f"max_aspect must be >= 1 (1 = squares only), got {max_aspect!r}")


def scale_to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Linearly map ``[lo, hi]`` onto ``[0, 255]``, clip, and round to ``uint8``.

    Args:
        arr: any real array (any shape).
        lo, hi: input values that become 0 and 255; default to the array's min and max (the
            "min-max" rule used for 16-bit PNG/TIFF).

    Returns:
        ``uint8`` array of the same shape: ``round((v - lo) * 255 / (hi - lo))`` clipped to
        [0, 255]; all zeros when ``hi <= lo`` (a constant image carries no contrast).
    """
    a = np.asarray(arr, dtype=np.float64)
    lo = float(np.min(a)) if lo is None else float(lo)
    hi = float(np.max(a)) if hi is None else float(hi)
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (a - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
