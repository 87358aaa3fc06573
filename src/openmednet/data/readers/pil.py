"""PNG, JPEG, TIFF, BMP (and other Pillow formats) as 8-bit gray or RGB arrays.

Conversion rules (what arrives in the file -> what the reader yields):

- ``L`` / ``1``: gray ``(H, W)``.
- ``RGB``: ``(H, W, 3)`` as stored. Gray content saved as RGB stays RGB here; routing by content
  is the caller's job (``openmednet.data.images.is_gray_content``).
- ``P`` (palette): gray ``(H, W)`` when every palette entry is gray, else RGB; a transparent
  palette is treated like RGBA.
- ``RGBA`` / ``LA`` / ``PA``: **composited on black** (``round(c * alpha / 255)``). Medical images
  use black as background, so transparent pixels become background rather than showing whatever
  colour the encoder left under a zero alpha.
- ``CMYK`` (print JPEGs/TIFFs), ``YCbCr``, ``LAB``, ``HSV``: converted to RGB by Pillow.
- 16-bit and 32-bit (``I;16``, ``I``, ``F``): **min-max** scaled to 0-255
  (``round((v - min) * 255 / (max - min))``, all zeros for a constant image). Medical 16-bit PNGs
  usually hold 10-14 significant bits, so dividing by 257 would give near-black images; min-max
  keeps the full contrast of each image. The min and max are recorded in ``meta.extra``.
- EXIF orientation is applied (phone photographs of wounds and skin lesions carry it);
  ``meta.extra["exif_orientation"]`` records one that turned the image (2-8).
- Multi-page TIFFs yield every page (``meta.frame`` is the page index).
- ``draft_size`` (off by default): JPEGs are decoded directly at 1/2, 1/4 or 1/8 scale by
  libjpeg's DCT scaling (``Image.draft``), the smallest scale that keeps both sides at least
  ``draft_size``. For a corpus resized to ``draft_size`` anyway this skips most decoding work
  (``benchmarks/bench_readers.py``); pixels differ slightly from a full decode then resize.

Bad input never escapes as a Pillow exception: zero bytes -> ``"empty_file"``, bytes that are
not an image -> ``"not_an_image"``, truncated or damaged data -> ``"corrupt"``, a header
claiming more than ``max_pixels`` pixels or a side over ``max_side`` (on any page), or more than
``max_frames`` pages -> ``"decompression_bomb"``; a page longer than ``max_aspect`` times its width
(a 100000 x 1 strip) -> ``"extreme_aspect"``. All checked on the headers, before the pixels of
that page are decoded (``openmednet.data.readers.base.check_image_size``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, ImageSequence, UnidentifiedImageError

from openmednet.data.readers.base import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_SIDE,
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

#: Default pixel limit: 8192 x 8192. Larger than any 2D radiograph or mammogram (about 4k x 5k);
#: whole-slide pathology images need a tiling reader anyway.
DEFAULT_MAX_PIXELS = 8192 * 8192

_RGB_LIKE = {"CMYK", "YCbCr", "LAB", "HSV", "RGBX"}


class PILReader(ImageReader):
    """Read 2D raster images with Pillow.

    Args:
        max_pixels: images whose header claims more pixels (width x height) are skipped with
            reason ``"decompression_bomb"``. Independent of the process-wide
            ``PIL.Image.MAX_IMAGE_PIXELS``, which this reader never changes.
        draft_size: if set, decode JPEGs at a reduced DCT scale that keeps both sides
            ``>= draft_size`` (see the module docstring); ``meta.extra["draft_reduction"]`` records the
            factor (1, 2, 4 or 8).
        max_frames: files whose header counts more pages/frames (multi-page TIFF, animated
            GIF/WebP/PNG) are skipped with reason ``"decompression_bomb"`` before any page is
            decoded; ``None`` = no limit. ``max_pixels`` bounds one page only, so a small GIF or
            TIFF of thousands of large frames needs this limit where the input is untrusted.
        max_side: pages with a longer side are skipped as ``"decompression_bomb"``.
        max_aspect: pages whose longer side exceeds ``max_aspect`` times the shorter are skipped
            as ``"extreme_aspect"``.
    """

    name = "pil"
    suffixes = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".pgm", ".ppm")
    install_hint = "pip install pillow"

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None,
                 max_frames: int | None = None, max_side: int = DEFAULT_MAX_SIDE,
                 max_aspect: float = DEFAULT_MAX_ASPECT):
        if max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        if draft_size is not None and draft_size < 1:
            raise ValueError(f"draft_size must be None or >= 1, got {draft_size}")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be None or >= 1, got {max_frames}")
        check_limits(max_side, max_aspect)
        self.max_pixels = max_pixels
        self.max_side, self.max_aspect = int(max_side), float(max_aspect)
        self.draft_size = draft_size
        self.max_frames = max_frames

    def read(self, path: Path) -> Iterator[ReadResult]:
        """Yield ``(array, meta)`` for each page of ``path``: ``(H, W)`` or ``(H, W, 3)`` uint8.

        Raises:
            SkipImage: ``"empty_file"``, ``"missing_file"``, ``"not_an_image"``, ``"corrupt"``
                or ``"decompression_bomb"`` (see the module docstring).
        """
        path = Path(path)
        check_not_empty(path)
        with self._open(path) as im:
            # Pillow counts frames from the headers (GIF blocks, the TIFF IFD chain) without decoding.
            n_frames = getattr(im, "n_frames", 1)
            if self.max_frames is not None and n_frames > self.max_frames:
                raise SkipImage(
                    "decompression_bomb",
                    f"file holds {n_frames} frames, limit is {self.max_frames}; "
                    "pass PILReader(max_frames=...) if the file is genuine",
                    path,
                )
            for index, page in enumerate(ImageSequence.Iterator(im)):
                if index:  # TIFF pages have their own sizes; page 0 was checked by _open
                    self._check_pixels(path, page, index)
                yield self._convert_page(path, page, index, n_frames)

    def _check_pixels(self, path: Path, im: Image.Image, index: int | None = None) -> None:
        """Apply the geometry bound to the (current page's) header size (``check_image_size``)."""
        width, height = im.size
        check_image_size(width, height, path, index, max_pixels=self.max_pixels, max_side=self.max_side,
                         max_aspect=self.max_aspect, hint="PILReader")

    def _open(self, path: Path) -> Image.Image:
        """Open lazily (header only) and apply the pixel limit before decoding anything."""
        try:
            with warnings.catch_warnings():
                # Our own limit below decides; Pillow's warning would only be noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
        except Image.DecompressionBombError as e:
            raise SkipImage("decompression_bomb", f"{e}; raise max_pixels if the image is genuine", path) from e
        except UnidentifiedImageError as e:
            raise SkipImage("not_an_image", "Pillow does not recognise these bytes as an image", path) from e
        except (OSError, SyntaxError, ValueError) as e:
            raise SkipImage("corrupt", f"cannot parse the header ({e})", path) from e
        try:
            self._check_pixels(path, im)
        except SkipImage:
            im.close()
            raise
        return im

    def _convert_page(self, path: Path, page: Image.Image, index: int, n_frames: int) -> tuple[np.ndarray, ImageMeta]:
        mode = page.mode
        size = page.size
        extra: dict = {}
        if self.draft_size and page.format == "JPEG" and index == 0:
            # Must precede load(): libjpeg then decodes at the reduced scale directly.
            page.draft(mode if mode in ("L", "RGB") else None, (self.draft_size, self.draft_size))
            # libjpeg reduces by 1, 2, 4 or 8 and rounds the sides up.
            extra["draft_reduction"] = round(size[0] / page.size[0])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                page.load()
            if index == 0:
                # Recorded for pairs read alongside (a segmentation mask has no EXIF of its own).
                orientation = page.getexif().get(ExifTags.Base.Orientation, 1)
                if orientation in range(2, 9):
                    extra["exif_orientation"] = int(orientation)
                page = ImageOps.exif_transpose(page)
            arr, facts = _to_uint8_array(page)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # Pillow reports truncation as OSError("image file is truncated ...").
            raise SkipImage("corrupt", f"pixel data cannot be decoded ({e}); re-export the file", path, index) from e
        extra.update(facts, n_frames=n_frames)
        meta = ImageMeta(
            path=path,
            frame=index,
            photometric="RGB" if arr.ndim == 3 else "MONOCHROME2",
            original_shape=(size[1], size[0]),
            original_dtype=mode,
            extra=extra,
        )
        return arr, meta


def _to_uint8_array(im: Image.Image) -> tuple[np.ndarray, dict]:
    """Apply the module's conversion rules; return the array and facts for ``meta.extra``."""
    mode = im.mode
    if mode == "1":
        return np.asarray(im.convert("L")), {}
    if mode == "P":
        return _palette_to_array(im)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _composite_on_black(im), {"alpha": "composited_on_black"}
    if mode in _RGB_LIKE:
        return np.asarray(im.convert("RGB")), {"converted_from": mode}
    if mode in ("L", "RGB"):
        return np.asarray(im), {}
    # 16/32-bit integer and float modes: I;16, I;16B, I;16L, I, F.
    raw = np.asarray(im)
    if raw.ndim != 2:
        raise ValueError(f"unsupported Pillow mode {mode!r} with shape {raw.shape}")
    finite = np.isfinite(raw)
    if not finite.any():
        raise ValueError(f"no finite pixel values in a {mode} image")
    # Float TIFFs may mark background with NaN: leave it out of the range, show it as black.
    lo, hi = float(raw[finite].min()), float(raw[finite].max())
    return scale_to_uint8(np.where(finite, raw, lo), lo, hi), {"scaling": "min_max", "min": lo, "max": hi}


def _palette_to_array(im: Image.Image) -> tuple[np.ndarray, dict]:
    """Palette -> gray when every entry is gray (and opaque), else RGB; transparency -> RGBA rule."""
    if "transparency" in im.info:
        return _composite_on_black(im.convert("RGBA")), {"alpha": "composited_on_black", "converted_from": "P"}
    palette = np.asarray(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    used = palette[np.unique(np.asarray(im))] if len(palette) else palette
    if len(used) and np.all(used[:, 0] == used[:, 1]) and np.all(used[:, 1] == used[:, 2]):
        return np.asarray(im.convert("L")), {"converted_from": "P"}
    return np.asarray(im.convert("RGB")), {"converted_from": "P"}


def _composite_on_black(im: Image.Image) -> np.ndarray:
    """``round(colour * alpha / 255)`` per channel; gray+alpha stays gray ``(H, W)``."""
    gray = im.mode in ("LA", "La")
    rgba = np.asarray(im.convert("LA" if gray else "RGBA"), dtype=np.uint16)
    colour, alpha = rgba[..., :-1], rgba[..., -1:]
    # Integer rounding of c * a / 255 (exact, no float error).
    out = ((colour * alpha + 127) // 255).astype(np.uint8)
    return out[..., 0] if gray else out
