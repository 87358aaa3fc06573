"""PILReader: conversion rules on exact pixel values, and every kind of bad file as a counted skip."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmednet.data.readers import (
    NoReaderError,
    PILReader,
    SkipImage,
    get_reader,
    read_images,
)


def _read_one(path: Path, **options) -> tuple[np.ndarray, object]:
    results = list(read_images(path, **options))
    assert len(results) == 1
    return results[0]


def _skip_reason(path: Path, reader: PILReader | None = None) -> str:
    with pytest.raises(SkipImage) as info:
        list(read_images(path, reader or PILReader()))
    return info.value.reason


def test_gray_png_is_read_exactly(tmp_path: Path) -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(pixels).save(tmp_path / "g.png")
    img, meta = _read_one(tmp_path / "g.png")
    np.testing.assert_array_equal(img, pixels)
    assert meta.photometric == "MONOCHROME2" and meta.original_shape == (3, 4)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_is_min_max_scaled(tmp_path: Path, suffix: str) -> None:
    # 12-bit detector values in a 16-bit container: min-max keeps the full contrast.
    raw = np.array([[100, 1100], [2100, 4195]], dtype=np.uint16)
    Image.fromarray(raw).save(tmp_path / f"x16{suffix}")
    img, meta = _read_one(tmp_path / f"x16{suffix}")
    # round((v - 100) * 255 / 4095): 0, 62.27 -> 62, 124.54 -> 125, 255
    np.testing.assert_array_equal(img, np.array([[0, 62], [125, 255]], dtype=np.uint8))
    assert meta.original_dtype == "I;16"
    assert meta.extra["min"] == 100 and meta.extra["max"] == 4195


def test_constant_16bit_image_is_black(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 777, dtype=np.uint16)).save(tmp_path / "c.png")
    img, _ = _read_one(tmp_path / "c.png")
    assert img.dtype == np.uint8 and not img.any()


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    img, meta = _read_one(tmp_path / "cmyk.jpg")
    assert img.shape == (16, 16, 3) and meta.original_dtype == "CMYK"
    # Pure red after JPEG: within a few levels of (255, 0, 0).
    np.testing.assert_allclose(img.reshape(-1, 3).mean(0), [255, 0, 0], atol=3)


def test_palette_png_gray_palette_gives_gray(tmp_path: Path) -> None:
    pixels = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    im = Image.fromarray(pixels, mode="L").convert("P")
    im.putpalette([0, 0, 0, 50, 50, 50, 100, 100, 100, 250, 250, 250])
    im.save(tmp_path / "pal.png")
    img, _ = _read_one(tmp_path / "pal.png")
    np.testing.assert_array_equal(img, [[0, 50], [100, 250]])


def test_palette_png_colour_palette_gives_rgb(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[0, 1]], dtype=np.uint8)).convert("P")
    im.putpalette([255, 0, 0, 0, 0, 255])
    im.save(tmp_path / "palc.png")
    img, _ = _read_one(tmp_path / "palc.png")
    np.testing.assert_array_equal(img, [[[255, 0, 0], [0, 0, 255]]])


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    img, meta = _read_one(tmp_path / "a.png")
    # c * a / 255 rounded: opaque unchanged, transparent black, half: 200*128/255 = 100.4 -> 100.
    np.testing.assert_array_equal(img, [[[200, 100, 50], [0, 0, 0], [100, 50, 25]]])
    assert meta.extra["alpha"] == "composited_on_black"


def test_gray_alpha_stays_gray(tmp_path: Path) -> None:
    la = np.array([[[255, 255], [255, 0]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    img, _ = _read_one(tmp_path / "la.png")
    np.testing.assert_array_equal(img, [[255, 0]])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((2, 4), dtype=np.uint8)
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(tmp_path / "o.png", exif=exif)
    img, _ = _read_one(tmp_path / "o.png")
    assert img.shape == (4, 2)
    np.testing.assert_array_equal(img, np.rot90(pixels, k=-1))


def test_multipage_tiff_yields_every_page(tmp_path: Path) -> None:
    pages = [Image.fromarray(np.full((3, 3), v, dtype=np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    out = list(read_images(tmp_path / "m.tif"))
    assert [int(img[0, 0]) for img, _ in out] == [10, 20, 30]
    assert [m.frame for _, m in out] == [0, 1, 2]


def test_real_busi_jpeg(shared_data: Path) -> None:
    path = shared_data / "gray/targets/busi/Dataset_BUSI_with_GT/benign/benign (1).jpg"
    img, meta = _read_one(path)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB") if im.mode != "L" else im)
    np.testing.assert_array_equal(img, expected)
    assert get_reader(path).name == "pil"


@pytest.mark.parametrize("name,mode", [("no 98.jpg", "P"), ("no 96.jpg", "RGBA")])
def test_real_palette_and_rgba_files(shared_data: Path, name: str, mode: str) -> None:
    # Real upstream files named .jpg that are palette / RGBA images (brain_mri_yes_no).
    path = shared_data / "gray/targets/brain_mri_yes_no/no" / name
    img, meta = _read_one(path)
    with Image.open(path) as im:
        assert im.mode == mode
        size = im.size
    assert meta.original_dtype == mode and img.dtype == np.uint8 and img.shape[:2] == (size[1], size[0])


# --- bad input ----------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "z.png").write_bytes(b"")
    assert _skip_reason(tmp_path / "z.png") == "empty_file"


def test_text_named_png(tmp_path: Path) -> None:
    (tmp_path / "t.png").write_text("patient list\nid,name\n1,anon\n")
    assert _skip_reason(tmp_path / "t.png") == "not_an_image"


def test_truncated_jpeg(tmp_path: Path, shared_data: Path) -> None:
    real = (shared_data / "gray/targets/busi/Dataset_BUSI_with_GT/benign/benign (1).jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(real[: len(real) // 2])
    assert _skip_reason(tmp_path / "cut.jpg") == "corrupt"


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim ``width x height`` (CRC fixed)."""
    import io

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize("side", [20_000, 100_000])  # above our limit; above Pillow's hard limit too
def test_decompression_bomb_header(tmp_path: Path, side: int) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_claiming(side, side))
    assert _skip_reason(tmp_path / "bomb.png") == "decompression_bomb"


def test_bomb_limit_is_configurable(tmp_path: Path) -> None:
    Image.new("L", (10, 10)).save(tmp_path / "s.png")
    assert _skip_reason(tmp_path / "s.png", PILReader(max_pixels=99)) == "decompression_bomb"
    assert len(list(read_images(tmp_path / "s.png", PILReader(max_pixels=100)))) == 1


def test_on_skip_collects_instead_of_raising(tmp_path: Path) -> None:
    (tmp_path / "z.png").write_bytes(b"")
    skips: list[SkipImage] = []
    assert list(read_images(tmp_path / "z.png", on_skip=skips.append)) == []
    assert [(s.reason, s.path) for s in skips] == [("empty_file", tmp_path / "z.png")]


def test_unknown_suffix_error_lists_readers(tmp_path: Path) -> None:
    (tmp_path / "x.xyz").write_bytes(b"abc")
    with pytest.raises(NoReaderError, match=r"no reader for 'x.xyz'.*dicom.*nifti.*npz.*pil.*pip install"):
        get_reader(tmp_path / "x.xyz")
    assert issubclass(NoReaderError, ValueError)  # callers catching ValueError keep working
    with pytest.raises(KeyError, match="did you mean 'pil'"):
        get_reader(tmp_path / "x.xyz", reader="pill")


def test_jpeg_draft_decodes_at_reduced_scale(shared_data: Path) -> None:
    path = shared_data / "gray/targets/brain_mri_yes_no/yes/Y108.jpg"
    full, _ = _read_one(path)
    small, meta = _read_one(path, draft_size=100)
    h, w = full.shape[:2]
    k = meta.extra["draft_reduction"]
    assert (h, w) == (1200, 1059) and k == 8  # 1059 / 8 -> 133 >= 100, while / 16 is not offered
    assert small.shape[:2] == (-(-h // k), -(-w // k))  # libjpeg rounds the sides up: (150, 133)
    # Same picture: resized to the same 56 x 64 grid, draft and full decode agree within a few levels.
    grid = (56, 64)
    a, b = (np.asarray(Image.fromarray(x).convert("L").resize(grid, Image.Resampling.BILINEAR), dtype=int) for x in (full, small))
    assert np.abs(a - b).mean() < 3


def test_float_tiff_with_nan_background(tmp_path: Path) -> None:
    raw = np.array([[np.nan, 0.0], [0.5, 2.0]], dtype=np.float32)
    Image.fromarray(raw, mode="F").save(tmp_path / "f.tif")
    img, meta = _read_one(tmp_path / "f.tif")
    np.testing.assert_array_equal(img, [[0, 0], [64, 255]])  # 0.5 * 255 / 2 = 63.75 -> 64
    assert meta.original_dtype == "F" and (meta.extra["min"], meta.extra["max"]) == (0.0, 2.0)


# --- limits for untrusted input -----------------------------------------------------------------


def _gif(path: Path, frames: int, side: int = 8) -> Path:
    """An animated GIF whose frames differ (so Pillow keeps them all)."""
    images = [Image.fromarray(np.full((side, side), 10 * (i + 1), dtype=np.uint8)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=10)
    return path


def test_frame_limit_refuses_many_frames_before_decoding(tmp_path: Path, monkeypatch) -> None:
    gif = _gif(tmp_path / "many.gif", frames=5)
    assert len(list(read_images(gif, PILReader(max_frames=5)))) == 5  # at the limit: every frame
    decoded: list[int] = []
    original = PILReader._convert_page
    monkeypatch.setattr(PILReader, "_convert_page", lambda self, *a: decoded.append(a[2]) or original(self, *a))
    with pytest.raises(SkipImage, match="5 frames, limit is 2") as info:
        list(read_images(gif, PILReader(max_frames=2)))
    assert info.value.reason == "decompression_bomb"
    assert decoded == []  # refused from the frame count, not after decoding


def test_frame_limit_is_off_by_default_and_checked(tmp_path: Path) -> None:
    assert len(list(read_images(_gif(tmp_path / "a.gif", frames=4)))) == 4
    with pytest.raises(ValueError, match="max_frames must be None or >= 1"):
        PILReader(max_frames=0)
    assert get_reader(tmp_path / "a.gif", max_frames=3).max_frames == 3  # a reader option like the others


def test_pixel_limit_applies_to_every_tiff_page(tmp_path: Path) -> None:
    # Page 0 is tiny, page 1 is over the limit: checking only the first header would decode page 1.
    small = Image.fromarray(np.full((4, 4), 50, dtype=np.uint8))
    large = Image.fromarray(np.full((40, 40), 90, dtype=np.uint8))
    small.save(tmp_path / "mixed.tif", save_all=True, append_images=[large])
    assert [img.shape for img, _ in read_images(tmp_path / "mixed.tif")] == [(4, 4), (40, 40)]
    with pytest.raises(SkipImage, match="40x40 = 1600 pixels, limit is 100") as info:
        list(read_images(tmp_path / "mixed.tif", PILReader(max_pixels=100)))
    assert info.value.reason == "decompression_bomb" and info.value.frame == 1
