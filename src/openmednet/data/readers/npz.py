"""MedMNIST-style ``.npz`` archives: ``{split}_images`` with ``{split}_labels``, one image per row.

Layout (MedMNIST v2, Yang et al. 2023): ``train_images (N, H, W)`` or ``(N, H, W, 3)`` uint8 and
``train_labels (N, 1)`` (or ``(N, K)`` multi-label), likewise ``val_`` and ``test_``. Any other
``<name>_images`` key is read too, with ``<name>`` as the split. Labels become strings: the
integer for one column (``"1"``), comma-joined for multi-label rows (``"0,1,0"``).

``meta.frame`` is the row inside the split array and ``meta.split`` the split, so
``(split, row)`` addresses one image (``SourceItem.frame``). Arrays are loaded once per file and
kept in a small cache, because a corpus build reads the rows one by one.

An ``.npz`` is a zip of ``.npy`` files, usually deflated (``np.savez_compressed``), so a small
file can declare gigabytes. Before anything is inflated, each needed member's ``.npy`` header
(shape, dtype: its first bytes) is checked: the image rows against the readers' geometry bound,
the labels against the image rows, and every member's declared size against its compressed size
(``_MAX_INFLATION``). Only the ``<split>_images`` / ``<split>_labels`` members are ever read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from openmednet.data.readers.base import (
    ImageMeta,
    ImageReader,
    ReadResult,
    SkipImage,
    check_image_size,
    check_not_empty,
    scale_to_uint8,
)

_IMAGES_SUFFIX = "_images"
_LABELS_SUFFIX = "_labels"
#: Row size limit (the Pillow reader's default); MedMNIST rows are 28-224 px.
_MAX_PIXELS = 8192 * 8192
#: Largest accepted ratio of a member's declared (inflated) size to its size in the zip, for members
#: declaring more than ``_INFLATION_FREE`` bytes. MedMNIST images deflate about 1.1:1; a block of
#: zeros 1028:1 (deflate's limit). It bounds what a file can make us allocate to 200 times its size.
_MAX_INFLATION = 200
_INFLATION_FREE = 16 * 2**20
#: Label values per row accepted (ChestMNIST has 14).
_MAX_LABELS_PER_ROW = 4096


class NpzReader(ImageReader):
    """Read every image of a MedMNIST-style ``.npz`` with its split and label."""

    name = "npz"
    suffixes = (".npz",)
    install_hint = "pip install numpy"

    def read(self, path: Path) -> Iterator[ReadResult]:
        """Yield ``(H, W)`` or ``(H, W, 3)`` uint8 rows of every split, in key order.

        Raises:
            SkipImage: ``"empty_file"``, ``"corrupt"`` (not a readable zip/npy) or
                ``"unsupported_image"`` (no ``*_images`` array of 3 or 4 dimensions),
                ``"decompression_bomb"``/``"extreme_aspect"`` (rows outside the readers' geometry bound).
        """
        path = Path(path)
        for split in list_splits(path):
            for row in range(len(load_split(path, split)[0])):
                yield read_row(path, split, row)


def list_splits(path: Path) -> list[str]:
    """Split names of ``path`` (``["train", "val", "test"]`` for MedMNIST), in file order."""
    arrays = _load_arrays(Path(path), _mtime(path))
    return [k[: -len(_IMAGES_SUFFIX)] for k in arrays if k.endswith(_IMAGES_SUFFIX)]


def load_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images, labels)`` of one split; labels ``None`` when the file has no ``{split}_labels``.

    Raises:
        KeyError: ``split`` is not in the file (the message lists the splits that are).
    """
    arrays = _load_arrays(Path(path), _mtime(path))
    key = f"{split}{_IMAGES_SUFFIX}"
    if key not in arrays:
        raise KeyError(f"split '{split}' not in {path}; available: {list_splits(path)}")
    return arrays[key], arrays.get(f"{split}_labels")


def read_row(path: Path, split: str, row: int) -> tuple[np.ndarray, ImageMeta]:
    """One image of ``path``: row ``row`` of ``{split}_images``, with its label and split.

    Raises:
        KeyError: unknown split. IndexError: ``row`` outside the split.
    """
    path = Path(path)
    images, labels = load_split(path, split)
    if not 0 <= row < len(images):
        raise IndexError(f"row {row} outside split '{split}' of {path} ({len(images)} rows)")
    raw = images[row]
    img = raw if raw.dtype == np.uint8 else scale_to_uint8(raw)
    meta = ImageMeta(
        path=path,
        frame=row,
        photometric="RGB" if img.ndim == 3 else "MONOCHROME2",
        original_shape=tuple(raw.shape),
        original_dtype=str(raw.dtype),
        label=None if labels is None else label_str(labels[row]),
        split=split,
        extra={"npz_key": f"{split}{_IMAGES_SUFFIX}"},
    )
    return img, meta


def label_str(value: np.ndarray) -> str:
    """A label row as text: ``"1"`` for one column, ``"0,1,0"`` for multi-label rows."""
    flat = np.atleast_1d(np.asarray(value)).ravel()
    return ",".join(str(int(v)) if float(v).is_integer() else str(float(v)) for v in flat)


def _mtime(path: Path) -> float:
    check_not_empty(Path(path))
    return Path(path).stat().st_mtime


@functools.lru_cache(maxsize=2)
def _load_arrays(path: Path, mtime: float) -> dict[str, np.ndarray]:
    """The ``<split>_images`` and ``<split>_labels`` arrays, checked from their headers first (cached
    per path and modification time)."""
    del mtime  # part of the cache key only: a rewritten file is re-read
    try:
        # Open the file ourselves, so that it is closed even when the zip is damaged.
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            members = _read_headers(zf, archive_size=os.fstat(f.fileno()).st_size)
            return {key: _read_member(zf, members[key]) for key in _check_headers(members, path)}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SkipImage("corrupt", f"cannot read the .npz archive ({type(e).__name__}: {e})", path) from e


@dataclasses.dataclass(frozen=True)
class _Member:
    """An ``.npy`` member of the zip as its header and the zip's directory describe it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    compress_size: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_headers(zf: zipfile.ZipFile, archive_size: int) -> dict[str, _Member]:
    """``key -> _Member`` of every ``<key>.npy`` in the zip, reading only each header (a few hundred
    bytes inflated); the last member of a repeated name wins, as in ``np.load``. A stored size
    larger than the archive is a lie of its directory and counts as the archive's size."""
    members = {}
    for info in {i.filename: i for i in zf.infolist()}.values():
        if not info.filename.endswith(".npy"):
            continue
        with zf.open(info) as stream:
            version = np.lib.format.read_magic(stream)
            # Versions 2.0 and 3.0 share the header layout (3.0 only allows utf-8 field names).
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read(stream)
        members[info.filename[: -len(".npy")]] = _Member(
            info.filename, tuple(shape), dtype, min(info.compress_size, archive_size)
        )
    return members


def _read_member(zf: zipfile.ZipFile, member: _Member) -> np.ndarray:
    """Inflate one checked member (``np.load``'s own reading, without pickles)."""
    with zf.open(member.name) as stream:
        return np.lib.format.read_array(stream, allow_pickle=False)


def _check_headers(members: dict[str, _Member], path: Path) -> list[str]:
    """The keys to load (images and their labels), after checking every one from its header.

    Raises:
        SkipImage: ``"unsupported_image"`` (no ``*_images`` of 3 or 4 dimensions, labels not one
            row per image), ``"decompression_bomb"`` / ``"extreme_aspect"`` (rows outside the
            readers' geometry bound, or a member inflating more than ``_MAX_INFLATION`` times).
    """
    images = {k: m for k, m in members.items() if k.endswith(_IMAGES_SUFFIX)}
    if not images or any(len(m.shape) not in (3, 4) for m in images.values()):
        raise SkipImage(
            "unsupported_image",
            f"expected MedMNIST keys '<split>_images' of shape (N, H, W[, 3]); got "
            f"{({k: m.shape for k, m in members.items()})}",
            path,
        )
    keys = []
    for key, image in images.items():  # the readers' one geometry bound, on every split's rows
        check_image_size(image.shape[2], image.shape[1], path, max_pixels=_MAX_PIXELS)
        keys.append(key)
        labels = members.get(key[: -len(_IMAGES_SUFFIX)] + _LABELS_SUFFIX)
        if labels is not None:
            per_row = math.prod(labels.shape[1:])
            if not labels.shape or labels.shape[0] != image.shape[0] or per_row > _MAX_LABELS_PER_ROW:
                raise SkipImage(
                    "unsupported_image",
                    f"'{labels.name}' has shape {labels.shape}: {labels.shape[0] if labels.shape else 0} label rows "
                    f"for {image.shape[0]} images in '{image.name}' (expected (N,) or (N, K), K <= "
                    f"{_MAX_LABELS_PER_ROW}): the labels do not line up with the images",
                    path,
                )
            keys.append(labels.name[: -len(".npy")])
    for key in keys:
        _check_inflation(members[key], path)
    return keys


def _check_inflation(member: _Member, path: Path) -> None:
    """Refuse a member that inflates more than ``_MAX_INFLATION`` times its stored size."""
    if member.nbytes > _INFLATION_FREE and member.nbytes > _MAX_INFLATION * member.compress_size:
        raise SkipImage(
            "decompression_bomb",
            f"'{member.name}' declares {member.shape} = {member.nbytes} bytes from {member.compress_size} "
            f"compressed ({member.nbytes // max(member.compress_size, 1)}:1, limit {_MAX_INFLATION}:1); if "
            f"genuine, save it uncompressed (np.savez)",
            path,
        )
