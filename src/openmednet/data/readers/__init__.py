"""Format readers and the entry points ``get_reader`` and ``read_images``.

Every reader turns a file into a stream of 2D ``uint8`` images, ``(H, W)`` gray or ``(H, W, 3)``
RGB, each with an ``ImageMeta``. Formats:

====== ======================================== ==============================================
name   files                                    library
====== ======================================== ==============================================
dicom  .dcm .dicom .dic, or ``DICM`` magic      pydicom (+ pylibjpeg plugins for compression)
nifti  .nii .nii.gz                             nibabel
npz    .npz (MedMNIST layout)                   numpy
pil    .png .jpg .jpeg .tif .tiff .bmp ...      Pillow
====== ======================================== ==============================================

Example:
    >>> skips = []
    >>> for img, meta in read_images("scan.dcm", on_skip=skips.append):
    ...     print(img.shape, meta.modality, meta.extra["voi"])
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from openmednet._errors import look_up_option
from openmednet.data.readers.base import SKIP_REASONS, ImageMeta, ImageReader, SkipImage, check_not_empty
from openmednet.data.readers.dicom import DicomReader
from openmednet.data.readers.nifti import NiftiReader
from openmednet.data.readers.npz import NpzReader
from openmednet.data.readers.pil import PILReader

__all__ = [
    "SKIP_REASONS",
    "SUPPORTED_READERS",
    "DicomReader",
    "ImageMeta",
    "ImageReader",
    "NiftiReader",
    "NoReaderError",
    "NpzReader",
    "PILReader",
    "SkipImage",
    "check_reader_options",
    "get_reader",
    "read_images",
    "reader_options",
]

logger = logging.getLogger(__name__)

#: Reader name -> class, in the order ``get_reader`` tries them (DICOM first: it sniffs content).
SUPPORTED_READERS: dict[str, type[ImageReader]] = {
    "dicom": DicomReader,
    "nifti": NiftiReader,
    "npz": NpzReader,
    "pil": PILReader,
}


class NoReaderError(ValueError):
    """No reader handles a file (by its name, or by its content for DICOM).

    A ``ValueError`` so existing ``except ValueError`` callers keep working; catch this type to tell
    "unsupported file type" apart from other bad values.
    """


def get_reader(path: str | Path, reader: str | None = None, **options: Any) -> ImageReader:
    """Choose and build the reader for ``path``.

    Args:
        path: the file to read.
        reader: a name from ``SUPPORTED_READERS`` to force a reader; ``None`` picks by suffix
            (and, for DICOM, by the ``DICM`` magic bytes).
        **options: reader constructor arguments (e.g. ``axis=0, stride=2`` for NIfTI). A source
            may mix formats, so each reader takes the options it knows and ignores the others.

    Raises:
        KeyError: unknown reader name, or an option no reader takes (with a suggestion).
        NoReaderError: no reader handles ``path`` (a ``ValueError``); the message lists the
            readers, their suffixes and how to install their libraries.
    """
    path = Path(path)
    check_reader_options(options)
    if reader is not None:
        return _build(look_up_option(reader, SUPPORTED_READERS, "reader"), options)
    # Names first, for every reader; only then content sniffing (DICOM's magic bytes), so that a
    # JPEG is never opened just to learn that it is not DICOM.
    defaults = _default_readers()
    for name, impl in defaults.items():
        if impl.verify_suffix(path):
            return _build(name, options)
    for name, impl in defaults.items():
        if impl.can_read(path):
            return _build(name, options)
    table = "; ".join(f"{name} ({', '.join(cls.suffixes)}; {cls.install_hint})" for name, cls in SUPPORTED_READERS.items())
    raise NoReaderError(
        f"no reader for '{path.name}' (suffix '{''.join(path.suffixes)}'). Readers: {table}. Pass reader=<name> to force one."
    )


def reader_options() -> dict[str, list[str]]:
    """Option name -> readers that accept it (the constructor arguments of every reader)."""
    table: dict[str, list[str]] = {}
    for name in SUPPORTED_READERS:
        for option in _accepted_options(name):
            table.setdefault(option, []).append(name)
    return table


def check_reader_options(options: Mapping[str, Any]) -> None:
    """Raise ``KeyError`` (with a suggestion) for an option that no reader accepts."""
    if options:
        known = reader_options()
        for key in options:
            look_up_option(key, known, "reader option")


@functools.cache
def _accepted_options(name: str) -> frozenset[str]:
    params = inspect.signature(SUPPORTED_READERS[name].__init__).parameters.values()
    return frozenset(p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)


@functools.cache
def _default_readers() -> dict[str, ImageReader]:
    """One default-configured instance per reader (readers hold only their settings)."""
    return {name: cls() for name, cls in SUPPORTED_READERS.items()}


def _build(name: str, options: Mapping[str, Any]) -> ImageReader:
    """The reader ``name`` with the options it accepts (others belong to other formats)."""
    mine = {k: v for k, v in options.items() if k in _accepted_options(name)}
    return SUPPORTED_READERS[name](**mine) if mine else _default_readers()[name]


def read_images(
    path: str | Path,
    reader: str | ImageReader | None = None,
    *,
    on_skip: Callable[[SkipImage], None] | None = None,
    **options: Any,
) -> Iterator[tuple[np.ndarray, ImageMeta]]:
    """Yield the 2D images of one file as ``(array, meta)``.

    Args:
        path: the file.
        reader: reader name, reader instance, or ``None`` to choose by ``get_reader``.
        on_skip: called with each ``SkipImage`` (file or frame). When given, nothing is raised
            for bad input, which is what a corpus build wants (count, never abort). When
            ``None``, an unusable *file* raises ``SkipImage`` and skipped *frames* are logged.
        **options: reader constructor arguments (only when ``reader`` is not an instance).

    Yields:
        ``(array, meta)``: ``array`` is ``(H, W)`` or ``(H, W, 3)`` ``uint8``.

    Raises:
        SkipImage: unusable file, only when ``on_skip`` is ``None``.
        NoReaderError, KeyError: no reader for the file / unknown reader name (not input errors
            of the file itself but of the call).
    """
    path = Path(path)
    if isinstance(reader, ImageReader) and options:
        raise ValueError(f"options {sorted(options)} given with a reader instance; configure the instance instead")
    impl = reader if isinstance(reader, ImageReader) else get_reader(path, reader, **options)
    try:
        check_not_empty(path)
        stream = impl.read(path)
        while True:
            try:
                result = next(stream)
            except StopIteration:
                return
            except SkipImage:
                raise
            except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop a build
                raise SkipImage("read_error", f"{impl.name} reader failed ({type(e).__name__}: {e})", path) from e
            if isinstance(result, SkipImage):
                _frame_skipped(result, on_skip)
            else:
                yield result
    except SkipImage as skip:
        if skip.path is None:
            skip.path = path
        if on_skip is None:
            raise
        on_skip(skip)


def _frame_skipped(skip: SkipImage, on_skip: Callable[[SkipImage], None] | None) -> None:
    if on_skip is None:
        logger.info("skipped %s", skip)
    else:
        on_skip(skip)
