"""DicomReader on pydicom's real test files: rescale, window, MONOCHROME1, multi-frame, compressed
twins, colour, and bad input (corrupt, truncated, non-DICOM, unsupported syntax, bomb)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from openmednet.data.readers import DicomReader, SkipImage, get_reader, read_images
from openmednet.data.readers.dicom import _decoder_hint, apply_window


@pytest.fixture(scope="module")
def fmt(shared_data: Path) -> Path:
    return shared_data / "formats"


def _frames(path: Path) -> list[tuple[np.ndarray, object]]:
    return list(read_images(path))


def _skip_reason(path: Path) -> str:
    with pytest.raises(SkipImage) as info:
        list(read_images(path, DicomReader()))
    return info.value.reason


def test_apply_window_linear_formula() -> None:
    # Center 40, width 400 (soft-tissue CT): -160 -> 0, 239 -> 255, per PS3.3 C.11.2.1.2.1.
    v = np.array([-1000.0, -160.0, 39.5, 239.0, 3000.0])
    np.testing.assert_array_equal(apply_window(v, 40, 400), [0, 0, 128, 255, 255])


def test_mr_small_window_from_file(fmt: Path) -> None:
    path = fmt / "pydicom-3.0.2/MR_small.dcm"
    (img, meta), = _frames(path)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)  # no rescale in this file
    # Window centre 600, width 1600: [600 - 0.5 - 799.5, 600 - 0.5 + 799.5] = [-200, 1399] -> [0, 255].
    expected = np.clip(np.rint((raw + 200) * 255 / 1599), 0, 255)
    np.testing.assert_array_equal(img, expected)
    assert meta.modality == "MR" and meta.extra["voi"] == "window"
    assert (meta.extra["window_center"], meta.extra["window_width"]) == (600.0, 1600.0)


def test_ct_small_rescale_to_hounsfield_and_percentiles(fmt: Path) -> None:
    path = fmt / "pydicom-3.0.2/CT_small.dcm"
    (img, meta), = _frames(path)
    assert meta.extra["rescale_slope"] == 1.0 and meta.extra["rescale_intercept"] == -1024.0
    hu = pydicom.dcmread(path).pixel_array.astype(np.float64) - 1024  # stored 128..2191 -> HU
    assert hu.min() == -896 and hu.max() == 1167
    # No window in the file: the 0.5 / 99.5 HU percentiles become 0 / 255.
    lo, hi = np.percentile(hu, [0.5, 99.5])
    assert meta.extra["voi"] == "percentile"
    assert (meta.extra["window_low"], meta.extra["window_high"]) == (lo, hi)
    assert img[hu <= lo].max() == 0 and img[hu >= hi].min() == 255
    # Monotone in HU: brighter tissue never maps darker.
    order = np.argsort(hu, axis=None, kind="stable")
    assert np.all(np.diff(img.ravel()[order].astype(int)) >= 0)


@pytest.mark.parametrize(
    "twin",
    [
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_mr_small_encodings_decode_identically(fmt: Path, twin: str) -> None:
    (ref, _), = _frames(fmt / "pydicom-3.0.2/MR_small.dcm")
    (img, meta), = _frames(fmt / "pydicom-3.0.2" / twin)
    np.testing.assert_array_equal(img, ref)


@pytest.mark.parametrize("twin", ["emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm"])
def test_multiframe_twins_yield_ten_identical_frames(fmt: Path, twin: str) -> None:
    ref = _frames(fmt / "pydicom-data-1.0.0/emri_small.dcm")
    got = _frames(fmt / "pydicom-data-1.0.0" / twin)
    assert len(ref) == len(got) == 10
    assert [m.frame for _, m in got] == list(range(10))
    for (a, _), (b, _) in zip(ref, got, strict=False):
        np.testing.assert_array_equal(a, b)
    # Frames differ from each other (it is a real stack, not one frame repeated).
    assert not np.array_equal(ref[0][0], ref[5][0])


def test_ct_j2k_equals_its_uncompressed_twin(fmt: Path) -> None:
    # 693_UNCI is the decoded pixels of 693_J2KI stored uncompressed (693_J2KR is a different
    # rendering of the slice, so it is not a twin).
    (a, ma), = _frames(fmt / "pydicom-data-1.0.0/693_UNCI.dcm")
    (b, mb), = _frames(fmt / "pydicom-3.0.2/693_J2KI.dcm")
    np.testing.assert_array_equal(a, b)
    assert ma.extra["window_center"] == 40.0 and mb.extra["transfer_syntax"] == "1.2.840.10008.1.2.4.91"
    assert 0 < a.mean() < 255


def test_monochrome1_radiograph_is_inverted(fmt: Path) -> None:
    path = fmt / "pydicom-data-1.0.0/RG1_UNCI.dcm"
    (img, meta), = _frames(path)
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert meta.extra["photometric_stored"] == "MONOCHROME1" and meta.extra["inverted"]
    assert meta.photometric == "MONOCHROME2" and meta.modality == "CR"
    np.testing.assert_array_equal(img, 255 - apply_window(raw, 15000, 30000))


def test_dicom_without_suffix_is_sniffed(tmp_path: Path, fmt: Path) -> None:
    shutil.copy(fmt / "pydicom-3.0.2/MR_small.dcm", tmp_path / "IM0001")
    assert get_reader(tmp_path / "IM0001").name == "dicom"


def _rgb_dicom(tmp_path: Path, fmt: Path, rgb: np.ndarray, photometric: str) -> Path:
    from pydicom.pixels import convert_color_space

    ds = pydicom.dcmread(fmt / "pydicom-3.0.2/MR_small.dcm")
    for tag in ("WindowCenter", "WindowWidth"):
        delattr(ds, tag)
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", photometric)
    ds.set_pixel_data(stored, photometric, 8)
    ds.Modality = "XC"
    ds.save_as(tmp_path / f"{photometric}.dcm")
    return tmp_path / f"{photometric}.dcm"


@pytest.mark.parametrize("photometric,atol", [("RGB", 0), ("YBR_FULL", 2)])
def test_colour_dicom_gives_rgb(tmp_path: Path, fmt: Path, shared_data: Path, photometric: str, atol: int) -> None:
    cell = next(sorted((shared_data / "color/pretrain/pbc_blood_cells").rglob("*.jpg")).__iter__())
    rgb = np.asarray(Image.open(cell).convert("RGB"))[:32, :48]
    (img, meta), = _frames(_rgb_dicom(tmp_path, fmt, np.ascontiguousarray(rgb), photometric))
    assert img.shape == (32, 48, 3) and meta.photometric == "RGB"
    np.testing.assert_allclose(img.astype(int), rgb.astype(int), atol=atol)


# --- bad input ----------------------------------------------------------------------------------


def test_damaged_jpeg_stream_is_corrupt(fmt: Path) -> None:
    # pydicom's JPEG-lossy.dcm has a misplaced marker segment: every decoder refuses it.
    assert _skip_reason(fmt / "pydicom-3.0.2/JPEG-lossy.dcm") == "corrupt"


def test_truncated_dicom_is_corrupt(tmp_path: Path, fmt: Path) -> None:
    data = (fmt / "pydicom-3.0.2/CT_small.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    assert _skip_reason(tmp_path / "cut.dcm") == "corrupt"


def test_zero_byte_and_text_files(tmp_path: Path) -> None:
    (tmp_path / "z.dcm").write_bytes(b"")
    (tmp_path / "t.dcm").write_text("not a dicom file at all\n" * 20)
    assert _skip_reason(tmp_path / "z.dcm") == "empty_file"
    assert _skip_reason(tmp_path / "t.dcm") == "not_an_image"


def test_unsupported_transfer_syntax_names_the_fix(tmp_path: Path, fmt: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(fmt / "pydicom-3.0.2/MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "video.dcm")
    with pytest.raises(SkipImage) as info:
        list(read_images(tmp_path / "video.dcm"))
    assert info.value.reason == "unsupported_transfer_syntax"
    assert "MPEG2" in info.value.message and "transcode" in info.value.message


def test_decoder_hints_name_pip_packages() -> None:
    assert "pylibjpeg-libjpeg" in _decoder_hint("1.2.840.10008.1.2.4.80")  # JPEG-LS lossless
    assert "pylibjpeg-openjpeg" in _decoder_hint("1.2.840.10008.1.2.4.91")  # JPEG 2000
    assert "pylibjpeg-rle" in _decoder_hint("1.2.840.10008.1.2.5")  # RLE


def test_header_bomb_is_skipped_before_decoding(tmp_path: Path, fmt: Path) -> None:
    ds = pydicom.dcmread(fmt / "pydicom-3.0.2/MR_small.dcm")
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 100
    ds.save_as(tmp_path / "bomb.dcm")
    assert _skip_reason(tmp_path / "bomb.dcm") == "decompression_bomb"


def test_dicom_without_pixels(tmp_path: Path, fmt: Path) -> None:
    ds = pydicom.dcmread(fmt / "pydicom-3.0.2/CT_small.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "sr.dcm")
    assert _skip_reason(tmp_path / "sr.dcm") == "unsupported_image"


def test_enhanced_multiframe_window_from_functional_groups(fmt: Path) -> None:
    # Enhanced CT keeps rescale (-1024) and window (49/102) in SharedFunctionalGroupsSequence.
    path = fmt / "pydicom-data-1.0.0/eCT_Supplemental.dcm"
    frames = _frames(path)
    assert len(frames) == 2
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    for (img, meta), stored in zip(frames, raw, strict=False):
        assert (meta.extra["window_center"], meta.extra["window_width"]) == (49.0, 102.0)
        np.testing.assert_array_equal(img, apply_window(stored - 1024, 49, 102))


def test_voi_lut_sequence_is_applied(tmp_path: Path, fmt: Path) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(fmt / "pydicom-3.0.2/MR_small.dcm")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # 4096 entries, first input value 0, 16-bit output
    item.add_new("LUTData", "US", [(4095 - i) * 16 for i in range(4096)])  # an inverting LUT
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(tmp_path / "lut.dcm")
    (img, meta), = _frames(tmp_path / "lut.dcm")
    raw = np.clip(pydicom.dcmread(tmp_path / "lut.dcm").pixel_array.astype(np.float64), 0, 4095)
    assert meta.extra["voi"] == "lut"  # the LUT wins over the file's window
    np.testing.assert_array_equal(img, np.rint((4095 - raw) * 16 * 255 / 65535))


def test_palette_colour_dicom(tmp_path: Path, fmt: Path) -> None:
    ds = pydicom.dcmread(fmt / "pydicom-3.0.2/MR_small.dcm")
    indices = (ds.pixel_array.astype(np.int32) >> 4).clip(0, 255).astype(np.uint8)  # real anatomy as indices
    for tag in ("WindowCenter", "WindowWidth"):
        delattr(ds, tag)
    ds.set_pixel_data(indices, "PALETTE COLOR", 8)
    ramp = np.arange(256, dtype=np.uint16)
    # 16-bit palette: red = index, green = 255 - index, blue = 128 (after scaling to 8 bits).
    for colour, entries in (("Red", ramp * 257), ("Green", (255 - ramp) * 257), ("Blue", np.full(256, 128 * 257))):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", entries.astype("<u2").tobytes())
    ds.save_as(tmp_path / "palette.dcm")
    (img, meta), = _frames(tmp_path / "palette.dcm")
    assert meta.photometric == "RGB" and meta.extra["color"] == "palette"
    np.testing.assert_array_equal(img[..., 0], indices)
    np.testing.assert_array_equal(img[..., 1], 255 - indices)
    np.testing.assert_array_equal(img[..., 2], 128)
