"""DICOM files as 8-bit images, with the display pipeline of the standard (PS3.3 C.11, PS3.4 N).

For each frame of a gray image:

1. **Modality LUT** (``pydicom.pixels.apply_modality_lut``): stored values -> physical units
   (Rescale Slope/Intercept, e.g. CT Hounsfield units, or a Modality LUT Sequence).
2. **VOI** (values of interest) -> 0-255, first that applies:
   a. a VOI LUT Sequence in the file (``pydicom.pixels.apply_voi_lut``), scaled from the LUT's
      output range;
   b. the file's first Window Center/Width, with the DICOM linear (or SIGMOID) function;
   c. otherwise the robust range of the frame: its 0.5th-99.5th percentiles (a few hot pixels
      or burnt-in labels must not compress the anatomy into a handful of gray levels).
3. **MONOCHROME1** (0 = white, common in CR/DX) is inverted (``255 - v``) so every gray image is
   MONOCHROME2 (0 = black); ``meta.extra["inverted"]`` records it.

Colour images (RGB, YBR_*, PALETTE COLOR) become RGB ``(H, W, 3)`` (pydicom converts YBR to RGB,
palettes go through ``apply_color_lut``); samples deeper than 8 bits are scaled by ``BitsStored``.
Multi-frame files yield every frame (``meta.frame``).

Compressed transfer syntaxes are decoded by pydicom's plugins (``pylibjpeg`` with
``pylibjpeg-libjpeg``/``-openjpeg``/``-rle``, or ``python-gdcm``). A syntax with no installed
decoder is skipped with reason ``"unsupported_transfer_syntax"`` and a message naming the pip
package that would decode it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


#: Default limit on rows x columns x frames (a 4k x 4k x 16 cine is 268M); larger files are skipped.
DEFAULT_MAX_PIXELS = 4096 * 4096 * 16

# Transfer-syntax UID prefixes -> pip packages with a decoder (pydicom's plugin list, in order of
# preference). Used only to phrase the skip message.
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.5": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline/extended/lossless (4.50-4.70)
    "1.2.840.10008.1.2.4.7": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.8": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS (4.80, 4.81)
    "1.2.840.10008.1.2.4.9": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 (4.90-4.93)
    "1.2.840.10008.1.2.4.20": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K (4.201-4.203)
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless
}


def _decoder_hint(uid: str) -> str:
    for prefix, packages in _DECODER_PACKAGES.items():
        if uid.startswith(prefix):
            return f"pip install {packages} (or python-gdcm)"
    return "no Python decoder is known for it; transcode the file (e.g. gdcmconv --raw, dcmdjpeg)"


class DicomReader(ImageReader):
    """Read DICOM files with pydicom (lazy import).

    Args:
        max_pixels: files whose header claims more than rows x columns x frames pixels are skipped
            with reason ``"decompression_bomb"`` before any decoding.
        percentiles: ``(low, high)`` percentiles used when the file carries no window.
        max_side, max_aspect: bounds on a frame's rows and columns, from the header
            (``openmednet.data.readers.base.check_image_size``).
    """

    name = "dicom"
    suffixes = (".dcm", ".dicom", ".dic")
    install_hint = "pip install pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, percentiles: tuple[float, float] = PERCENTILES,
                 max_side: int = DEFAULT_MAX_SIDE, max_aspect: float = DEFAULT_MAX_ASPECT):
        if not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        check_limits(max_side, max_aspect)
        self.max_side, self.max_aspect = int(max_side), float(max_aspect)
        self.max_pixels = max_pixels
        self.percentiles = percentiles

    def can_read(self, path: Path) -> bool:
        """By suffix, or by the ``DICM`` magic at byte 128 (files from PACS exports have no suffix)."""
        if self.verify_suffix(path):
            return True
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError:
            return False
        return len(head) == 132 and head[128:] == b"DICM"

    def read(self, path: Path) -> Iterator[ReadResult]:
        """Yield ``(array, meta)`` for every frame: ``(H, W)`` gray or ``(H, W, 3)`` RGB, uint8.

        Raises:
            SkipImage: ``"empty_file"``, ``"not_an_image"`` (not DICOM), ``"unsupported_image"``
                (no pixel data), ``"decompression_bomb"``, ``"unsupported_transfer_syntax"`` or
                ``"corrupt"``.
        """
        path = Path(path)
        check_not_empty(path)
        ds = _load_dataset(path)
        frames = self._decode(path, ds)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        base = {
            "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
            "photometric_stored": photometric,
            "bits_stored": int(ds.get("BitsStored", 8)),
            "n_frames": len(frames),
        }
        for index, frame in enumerate(frames):
            arr, extra = self._to_uint8(frame_view(ds, index), frame, photometric)
            meta = ImageMeta(
                path=path,
                frame=index,
                modality=str(ds.get("Modality", "")),
                photometric="RGB" if arr.ndim == 3 else "MONOCHROME2",
                original_shape=tuple(frame.shape),
                original_dtype=str(frame.dtype),
                extra={**base, **extra},
            )
            yield arr, meta

    def _decode(self, path: Path, ds: Any) -> np.ndarray:
        """Check size and transfer syntax, then decode to ``(frames, rows, cols[, samples])``."""
        from pydicom.pixels import get_decoder

        rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        if rows * cols * n_frames > self.max_pixels:
            raise SkipImage(
                "decompression_bomb",
                f"header claims {rows}x{cols}x{n_frames} pixels, limit is {self.max_pixels}; "
                "pass DicomReader(max_pixels=...) if genuine",
                path,
            )
        if rows and cols:  # no Rows/Columns: left to the decoder, which reports the file as corrupt
            check_image_size(cols, rows, path, max_pixels=self.max_pixels, max_side=self.max_side,
                             max_aspect=self.max_aspect, hint="DicomReader")
        uid = ds.file_meta.get("TransferSyntaxUID")
        if uid is None:
            raise SkipImage("corrupt", "no TransferSyntaxUID in the file meta; the file was not written as DICOM Part 10", path)
        try:
            decoder = get_decoder(uid)
            available = decoder.is_available
        except NotImplementedError:
            available = False
        if not available:
            name = getattr(uid, "name", uid)
            message = f"no decoder installed for {name} ({uid}): {_decoder_hint(str(uid))}"
            raise SkipImage("unsupported_transfer_syntax", message, path)
        try:
            arr = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - plugin decoders raise anything on damaged streams
            raise SkipImage("corrupt", f"pixel data cannot be decoded ({type(e).__name__}: {e})", path) from e
        samples = int(ds.get("SamplesPerPixel", 1))
        # pixel_array drops the frame axis for single-frame files; put it back.
        single = arr.ndim == 2 or (arr.ndim == 3 and samples > 1 and n_frames == 1)
        return arr[None] if single else arr

    def _to_uint8(self, ds: Any, frame: np.ndarray, photometric: str) -> tuple[np.ndarray, dict[str, Any]]:
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            rgb = apply_color_lut(frame, ds)
            # The LUT descriptor's third value is the bit depth of the entries (8 or 16).
            bits = int(ds.get("RedPaletteColorLookupTableDescriptor", [0, 0, 16])[2])
            return scale_to_uint8(rgb, 0, 2**bits - 1), {"color": "palette"}
        if frame.ndim == 3:
            # RGB or YBR (pydicom has converted YBR to RGB). Scale by the declared bit depth.
            bits = int(ds.get("BitsStored", 8))
            return scale_to_uint8(frame, 0, 2**bits - 1), {"color": photometric}
        return self._gray_to_uint8(ds, frame, photometric)

    def _gray_to_uint8(self, ds: Any, frame: np.ndarray, photometric: str) -> tuple[np.ndarray, dict[str, Any]]:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        values = apply_modality_lut(frame, ds).astype(np.float64)
        extra: dict[str, Any] = {
            "rescale_slope": float(ds.get("RescaleSlope", 1) or 1),
            "rescale_intercept": float(ds.get("RescaleIntercept", 0) or 0),
        }
        if "VOILUTSequence" in ds:
            lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            # A LUT is indexed by integer input values (pydicom mis-indexes float arrays).
            indices = np.rint(values).astype(np.int64)
            out = scale_to_uint8(apply_voi_lut(indices, ds, index=0, prefer_lut=True), 0, 2**lut_bits - 1)
            extra["voi"] = "lut"
        elif _first(ds.get("WindowWidth")) is not None and _first(ds.get("WindowWidth")) > 0:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
            function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
            out = apply_window(values, center, width, function)
            extra.update(voi="window", window_center=center, window_width=width, voi_function=function)
        else:
            lo, hi = np.percentile(values, self.percentiles)
            out = scale_to_uint8(values, lo, hi)
            extra.update(voi="percentile", window_low=float(lo), window_high=float(hi))
        inverted = photometric == "MONOCHROME1"
        if inverted:
            out = 255 - out
        extra["inverted"] = inverted
        return out, extra


#: Attributes copied into a frame view; functional groups may override the pixel-value ones.
_VIEW_KEYWORDS = (
    "PixelRepresentation", "BitsStored", "BitsAllocated", "PhotometricInterpretation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "RedPaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableDescriptor", "BluePaletteColorLookupTableData",
)  # fmt: skip
_FRAME_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def frame_view(ds: Any, index: int) -> Any:
    """The dataset as seen by frame ``index``: enhanced multi-frame files (Enhanced CT/MR...) keep
    rescale and window in functional groups (PS3.3 C.7.6.16) where pydicom's LUT functions do not
    look; this lifts them to the top level (per-frame values override shared ones).

    Returns ``ds`` itself for classic files without functional groups.
    """
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame:
        return ds
    from pydicom.dataset import Dataset

    view = Dataset()
    for keyword in _VIEW_KEYWORDS:
        if keyword in ds:
            view[keyword] = ds[keyword]
    for groups, i in ((shared, 0), (per_frame, index)):
        if not groups or len(groups) <= i:
            continue
        for sequence in _FRAME_GROUPS:
            items = groups[i].get(sequence)
            if items:
                for element in items[0]:
                    view[element.tag] = element
    return view


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map modality values to uint8 with a DICOM window (PS3.3 C.11.2.1.2).

    Args:
        values: modality values (after rescale), any shape.
        center, width: Window Center and Window Width (``width >= 1``).
        function: ``"LINEAR"`` (default), ``"LINEAR_EXACT"`` or ``"SIGMOID"``.

    Returns:
        uint8 array: LINEAR maps ``center - 0.5 - (width - 1) / 2`` to 0 and
        ``center - 0.5 + (width - 1) / 2`` to 255, clipping outside; LINEAR_EXACT maps
        ``center -+ width / 2``; SIGMOID is ``255 / (1 + exp(-4 (v - center) / width))``.
    """
    v = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        return np.clip(np.rint(255.0 / (1.0 + np.exp(-4.0 * (v - center) / width))), 0, 255).astype(np.uint8)
    if function == "LINEAR_EXACT":
        return scale_to_uint8(v, center - width / 2, center + width / 2)
    return scale_to_uint8(v, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)


def _first(value: Any) -> float | None:
    """First value of a possibly multi-valued DICOM number (several windows may be stored)."""
    if value is None:
        return None
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _load_dataset(path: Path) -> Any:
    """Parse the file with pydicom; non-DICOM and damaged headers become ``SkipImage``."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as e:  # pragma: no cover - pydicom is a core dependency
        raise ImportError(f"pydicom missing: {DicomReader.install_hint}") from e
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise SkipImage("not_an_image", f"not a DICOM file ({e})", path) from e
    except Exception as e:  # noqa: BLE001 - pydicom raises many types on damaged headers
        raise SkipImage("corrupt", f"DICOM header cannot be parsed ({type(e).__name__}: {e})", path) from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SkipImage("unsupported_image", "DICOM file has no pixel data (structured report, RT plan...?)", path)
    return ds
