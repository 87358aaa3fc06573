"""MedMNIST-style ``.npz`` archives: ``{split}_images`` with ``{split}_labels``, one image per row.

Layout (MedMNIST v2, Yang et al. 2023): ``train_images (N, H, W)`` or ``(N, H, W, 3)`` uint8 and
``train_labels (N, 1)`` (or ``(N, K)`` multi-label), likewise ``val_`` and ``test_``. Any other
``<name>_images`` key is read too, with ``<name>`` as the split. Labels become strings: the
integer for one column (``"1"``), comma-joined for multi-label rows (``"0,1,0"``).

``meta.frame`` is the row inside the split array and ``meta.split`` the split, so
``(split, row)`` addresses one image (``SourceItem.frame``). Arrays are loaded once per file and
kept in a small cache, because a corpus build reads the rows one by one.
"""

from __future__ import annotations

import functools
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
#: Row size limit (the Pillow reader's default); MedMNIST rows are 28-224 px.
_MAX_PIXELS = 8192 * 8192


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
    """Load all arrays of the archive (cached per path and modification time)."""
    del mtime  # part of the cache key only: a rewritten file is re-read
    try:
        # Open the file ourselves: np.load leaks the handle when the zip is damaged.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SkipImage("corrupt", f"cannot read the .npz archive ({type(e).__name__}: {e})", path) from e
    bad = {k: v.shape for k, v in arrays.items() if k.endswith(_IMAGES_SUFFIX) and v.ndim not in (3, 4)}
    if not any(k.endswith(_IMAGES_SUFFIX) for k in arrays) or bad:
        raise SkipImage(
            "unsupported_image",
            f"expected MedMNIST keys '<split>_images' of shape (N, H, W[, 3]); got {({k: v.shape for k, v in arrays.items()})}",
            path,
        )
    for key, value in arrays.items():  # the readers' one geometry bound, on every split's rows
        if key.endswith(_IMAGES_SUFFIX):
            check_image_size(value.shape[2], value.shape[1], path, max_pixels=_MAX_PIXELS)
    return arrays
