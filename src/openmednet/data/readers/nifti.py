"""NIfTI volumes (``.nii``, ``.nii.gz``; NIfTI-1 and -2) as 2D uint8 slices.

- **Slicing**: 2D slices along ``axis`` (0, 1 or 2 of the voxel array; 2 is axial for the usual
  RAS-ish storage), every ``stride``-th slice. ``meta.frame`` is the slice index along the axis;
  ``meta.extra`` records ``axis`` and ``volume``.
- **4D** (time or diffusion series): ``volumes="first"`` (default) reads only volume 0, because
  successive fMRI/DWI volumes of one subject are near-copies that would dominate a corpus;
  ``volumes="all"`` reads every volume. More than 4 dimensions (after dropping trailing
  singleton axes) is skipped as ``"unsupported_image"``.
- **Intensity**: per volume, the 0.5th and 99.5th percentiles of all voxels map to 0 and 255
  (clipped). Robust to the few extreme voxels (vessels, artefacts) that min-max would let
  compress the brain into a few gray levels; per volume so slices of one volume stay comparable.
- **Empty slices** (outside the head, zero padding) are yielded as ``SkipImage("empty_slice")``
  when, after scaling, fewer than ``min_foreground`` of the pixels are above ``foreground_level``
  or the slice is constant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from openmednet.data.readers.base import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_SIDE,
    PERCENTILES,
    ImageMeta,
    ImageReader,
    ReadResult,
    SkipImage,
    check_image_size,
    check_limits,
    check_not_empty,
    scale_to_uint8,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_VOXELS = 1024**3


class NiftiReader(ImageReader):
    """Read NIfTI volumes with nibabel (lazy import) as a stream of 2D slices.

    Args:
        axis: voxel axis to slice along (0, 1 or 2).
        stride: keep every ``stride``-th slice (``>= 1``).
        volumes: ``"first"`` or ``"all"`` volumes of a 4D file (see the module docstring).
        min_foreground: minimum fraction of pixels above ``foreground_level`` for a slice to count
            as non-empty.
        foreground_level: uint8 level (after scaling) above which a pixel is foreground.
        max_voxels: volumes with more voxels (per volume read) are skipped as
            ``"decompression_bomb"``, from the header before any voxel is read. A volume is held
            in memory as float32 while it is scaled, so this bounds the reader's memory (the
            default, 1024^3, allows ~4 GB: lower it for untrusted input, as the web service does).
        max_side, max_aspect: bounds on the slices' sides and aspect ratio, from the header
            (``openmednet.data.readers.base.check_image_size``): slicing a thin slab across its
            thickness gives strips.
    """

    name = "nifti"
    suffixes = (".nii", ".nii.gz")
    install_hint = "pip install nibabel"

    def __init__(
        self,
        axis: int = 2,
        stride: int = 1,
        volumes: Literal["first", "all"] = "first",
        min_foreground: float = 0.02,
        foreground_level: int = 10,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        max_side: int = DEFAULT_MAX_SIDE,
        max_aspect: float = DEFAULT_MAX_ASPECT,
    ):
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        if int(stride) < 1:
            raise ValueError(f"stride must be >= 1, got {stride!r}")
        if volumes not in ("first", "all"):
            raise ValueError(f"volumes must be 'first' or 'all', got {volumes!r}")
        if int(max_voxels) < 1:
            raise ValueError(f"max_voxels must be >= 1, got {max_voxels!r}")
        self.axis, self.stride, self.volumes = axis, int(stride), volumes
        self.min_foreground, self.foreground_level = min_foreground, foreground_level
        self.max_voxels = int(max_voxels)
        check_limits(max_side, max_aspect)
        self.max_side, self.max_aspect = int(max_side), float(max_aspect)

    def read(self, path: Path) -> Iterator[ReadResult]:
        """Yield ``(H, W)`` uint8 slices (and ``SkipImage("empty_slice")`` for empty ones).

        Raises:
            SkipImage: ``"empty_file"``, ``"not_an_image"``/``"corrupt"`` (nibabel cannot parse),
                ``"unsupported_image"`` (not 2D-4D), ``"decompression_bomb"`` or ``"extreme_aspect"``.
        """
        path = Path(path)
        check_not_empty(path)
        img = _load(path)
        shape = tuple(int(s) for s in img.shape)
        spatial = _squeeze_trailing(shape)
        if not 2 <= len(spatial) <= 4:
            raise SkipImage("unsupported_image", f"expected a 2D-4D volume, got shape {shape}", path)
        n_vols = spatial[3] if len(spatial) == 4 else 1
        vol_indices = range(n_vols) if self.volumes == "all" else range(1)
        per_volume = int(np.prod(spatial[:3]))
        if per_volume > self.max_voxels:
            raise SkipImage("decompression_bomb", f"volume {shape} exceeds {self.max_voxels} voxels", path)
        rows, cols = [n for i, n in enumerate(spatial[:3]) if i != self.axis][:2] if len(spatial) > 2 else spatial
        check_image_size(cols, rows, path, max_pixels=self.max_voxels, max_side=self.max_side,
                         max_aspect=self.max_aspect, hint="NiftiReader")
        for v in vol_indices:
            volume = _read_volume(img, path, spatial, v)
            yield from self._slices(path, volume, v, shape, str(img.get_data_dtype()))

    def _slices(self, path: Path, volume: np.ndarray, v: int, shape: tuple[int, ...], dtype: str) -> Iterator[ReadResult]:
        finite_mask = np.isfinite(volume)
        all_finite = bool(finite_mask.all())
        # NaN voxels (masked maps) are left out of the percentiles and shown as the low end.
        finite = volume.ravel() if all_finite else volume[finite_mask]
        lo, hi = np.percentile(finite, PERCENTILES) if finite.size else (0.0, 0.0)
        scaled = scale_to_uint8(volume if all_finite else np.where(finite_mask, volume, lo), lo, hi)
        axis = self.axis if volume.ndim == 3 else 2
        # Slice-first view: basic indexing is a view, where np.take along an axis copies slowly.
        stack = np.moveaxis(scaled, axis, 0) if scaled.ndim == 3 else scaled[None]
        for index in range(0, len(stack), self.stride):
            sl = stack[index]
            fg = float(np.mean(sl > self.foreground_level))
            if sl.min() == sl.max() or fg < self.min_foreground:
                yield SkipImage("empty_slice", f"foreground fraction {fg:.3f} < {self.min_foreground} (volume {v})", path, index)
                continue
            meta = ImageMeta(
                path=path,
                frame=index,
                modality="",  # NIfTI headers carry no modality; the SourceSpec supplies it
                photometric="MONOCHROME2",
                original_shape=shape,
                original_dtype=dtype,
                extra={"axis": axis, "volume": v, "scaling": "percentile", "window_low": float(lo), "window_high": float(hi)},
            )
            yield np.ascontiguousarray(sl), meta


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes: ``(X, Y, Z, 1)`` is 3D, ``(X, Y, 1)`` is 2D."""
    s = list(shape)
    while len(s) > 2 and s[-1] == 1:
        s.pop()
    return tuple(s)


def _load(path: Path):
    try:
        import nibabel as nib
        from nibabel.filebasedimages import ImageFileError
    except ImportError as e:  # pragma: no cover - nibabel is a core dependency
        raise ImportError(f"nibabel missing: {NiftiReader.install_hint}") from e
    try:
        return nib.load(path)
    except ImageFileError as e:
        raise SkipImage("not_an_image", f"nibabel does not recognise the file ({e})", path) from e
    except Exception as e:  # noqa: BLE001 - gzip/struct errors on damaged headers
        raise SkipImage("corrupt", f"NIfTI header cannot be read ({type(e).__name__}: {e})", path) from e


def _read_volume(img, path: Path, spatial: tuple[int, ...], v: int) -> np.ndarray:
    """Read one 3D (or 2D) volume as float32 with the header's scl_slope/inter applied."""
    try:
        if len(spatial) == 4:
            data = np.asarray(img.dataobj[..., v], dtype=np.float32)
        else:
            data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - truncated gzip streams raise EOFError/OSError/zlib.error
        raise SkipImage("corrupt", f"voxel data cannot be read ({type(e).__name__}: {e})", path) from e
    return data.reshape(spatial[:3] if len(spatial) >= 3 else spatial)
