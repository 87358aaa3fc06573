"""The reader contract: every file format becomes ``(array, ImageMeta)`` pairs.

Modelled on MONAI's ``ImageReader``: a reader says which files it can read (``verify_suffix``)
and yields 2D images. One file may hold several images (multi-frame DICOM, NIfTI volumes), so
``read`` is a generator.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class SkipImage(Exception):
    """Raised by a reader for a file (or frame) that cannot or should not be used.

    ``reason`` is a short stable key counted in build reports (e.g. ``"corrupt"``,
    ``"unsupported_transfer_syntax"``, ``"empty_slice"``, ``"decompression_bomb"``); the message
    says what was found and what to do.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class ImageMeta:
    """What a reader knows about one 2D image.

    Attributes:
        path: the file it came from.
        frame: index inside the file (slice, frame, array row), 0 for single images.
        modality: e.g. ``"CT"``, ``"MR"``, ``"CR"``, ``"XR"``, ``"US"``; ``""`` when unknown.
        photometric: ``"MONOCHROME2"`` for gray (after any MONOCHROME1 inversion), ``"RGB"``.
        original_shape: shape before any conversion.
        original_dtype: dtype as stored (``"uint16"``...).
        extra: format-specific facts (window used, rescale slope, affine axis...).
    """

    path: Path
    frame: int = 0
    modality: str = ""
    photometric: str = ""
    original_shape: tuple[int, ...] = ()
    original_dtype: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class ImageReader(abc.ABC):
    """Base class of format readers.

    ``read`` yields ``(array, meta)`` where ``array`` is ``(H, W)`` for gray or ``(H, W, 3)`` for
    colour, ``uint8`` in [0, 255] (intensity mapping to 8 bits is the reader's job: DICOM
    windowing, NIfTI percentile scaling, 16-bit PNG scaling).
    """

    name: str = ""
    suffixes: tuple[str, ...] = ()

    def verify_suffix(self, path: Path) -> bool:
        """Whether this reader handles ``path`` judging by its name."""
        name = path.name.lower()
        return any(name.endswith(s) for s in self.suffixes)

    @abc.abstractmethod
    def read(self, path: Path) -> Iterator[tuple[np.ndarray, ImageMeta]]:
        """Yield the 2D images of ``path``; raise ``SkipImage`` for unusable content."""
