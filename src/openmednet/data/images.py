"""Pure numpy/Pillow utilities on 8-bit images: gray routing, channel conversion, square resize,
the shorter-side cap of decoded targets.

Arrays are ``(H, W)`` gray or ``(H, W, 3)`` RGB, ``uint8``; every function returns ``uint8``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image


def _check_image(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {a.dtype}; scale it to 8 bits first (readers do)")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"expected shape (H, W) or (H, W, 3), got {a.shape}")
    return a


def is_gray_content(img: np.ndarray, tol: int = 0) -> bool:
    """Whether an image is gray by content: 2D, or RGB whose channels agree within ``tol``.

    Many gray modalities (X-ray, ultrasound, MRI exports) are saved as RGB JPEGs with three equal
    channels; JPEG chroma noise may make them differ by a level or two, which ``tol`` absorbs.

    Args:
        img: ``(H, W)`` or ``(H, W, 3)`` uint8.
        tol: largest allowed ``|R - G|``, ``|G - B|``, ``|R - B|`` at any pixel (0 = exactly equal).

    Returns:
        ``True`` for gray content.
    """
    a = _check_image(img)
    if a.ndim == 2:
        return True
    # Channel planes, not np.max/np.min over axis 2: numpy's reductions along a length-3 last axis
    # cost about 0.9 ms per call on a 128 px image (profile of the corpus decode stage, colour
    # pools, docs/benchmarks.md "Corpus hashing"); the elementwise form is the same spread.
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # uint8, no overflow
    return bool(spread.max(initial=0) <= tol)


def to_channels(img: np.ndarray, channels: Literal[1, 3]) -> tuple[np.ndarray, bool]:
    """Convert to 1 (``(H, W)``) or 3 (``(H, W, 3)``) channels.

    Gray -> RGB repeats the plane. RGB -> gray uses ITU-R BT.601 luma,
    ``Y = 0.299 R + 0.587 G + 0.114 B`` (Pillow's ``convert("L")``, fixed-point rounded); an RGB
    image with equal channels gives back exactly that channel.

    Args:
        img: ``(H, W)`` or ``(H, W, 3)`` uint8.
        channels: 1 or 3.

    Returns:
        ``(array, converted)``: ``converted`` is ``True`` when the channel count changed.

    Raises:
        ValueError: ``channels`` not 1 or 3, or a malformed image.
    """
    a = _check_image(img)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    have = 1 if a.ndim == 2 else 3
    if have == channels:
        return a, False
    if channels == 3:
        return np.repeat(a[:, :, None], 3, axis=2), True
    return np.asarray(Image.fromarray(a).convert("L")), True


def resize_to_square(
    img: np.ndarray,
    size: int,
    mode: Literal["pad", "crop", "stretch"] = "pad",
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """Resize to ``size x size``, keeping the aspect ratio (``pad``, ``crop``) or not (``stretch``).

    - ``"pad"``: scale so the *longer* side is ``size``, then centre on a black (0) square. When
      the free space is odd, the extra row/column of padding goes to the bottom/right
      (top = ``(size - h) // 2``). Keeps the whole image (no anatomy lost); black matches the
      background of most medical images.
    - ``"crop"``: scale so the *shorter* side is ``size``, then take the centred ``size x size``
      window (top = ``(h - size) // 2``). Loses the borders of elongated images.
    - ``"stretch"``: scale each side to ``size`` (the aspect ratio changes). Keeps the whole field
      of view at full scale, so a pixel maps back to the original by the inverse resize alone:
      what segmentation needs, whose masks must cover every pixel of the image.

    The scaled side is ``round(side * scale)`` (at least 1). When no scaling is needed the pixels
    are copied unchanged (exact). Scaling uses Pillow's antialiased filters (``resample``).

    Args:
        img: ``(H, W)`` or ``(H, W, 3)`` uint8.
        size: output side in pixels (``>= 1``).
        mode: ``"pad"``, ``"crop"`` or ``"stretch"``.
        resample: Pillow resampling filter.

    Returns:
        ``(size, size)`` or ``(size, size, 3)`` uint8.
    """
    a = _check_image(img)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if mode not in ("pad", "crop", "stretch"):
        raise ValueError(f"mode must be 'pad', 'crop' or 'stretch', got {mode!r}")
    h, w = a.shape[:2]
    scale = size / (max(h, w) if mode == "pad" else min(h, w))
    nh, nw = (size, size) if mode == "stretch" else (max(1, round(h * scale)), max(1, round(w * scale)))
    if (nh, nw) != (h, w):
        a = np.asarray(Image.fromarray(a).resize((nw, nh), resample=resample))
    if mode == "crop":
        top, left = (nh - size) // 2, (nw - size) // 2
        return np.ascontiguousarray(a[top : top + size, left : left + size])
    out = np.zeros((size, size) + a.shape[2:], dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = a
    return out


def shrink(img: np.ndarray, max_side: int | None,
           resample: Image.Resampling = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize so the shorter side is at most ``max_side`` (aspect kept), to bound memory.

    The cap of decoded targets (``eval.targets``, ``eval.unlabelled``, ``data.segmentation``): the
    evaluation transform resizes the shorter side and centre-crops, so nothing it uses is lost.
    Each scaled side is ``round(side * scale)`` (at least 1); an image already within the cap (or
    ``max_side=None``) is returned as it is, not copied.

    Args:
        img: ``(H, W)`` or ``(H, W, 3)`` uint8 (a mask ``(H, W)`` with ``resample=NEAREST``).
        max_side: the cap, ``None`` for none.
        resample: Pillow resampling filter (``NEAREST`` keeps mask values exact).
    """
    if max_side is None or min(img.shape[:2]) <= max_side:
        return img
    h, w = img.shape[:2]
    scale = max_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, resample))
