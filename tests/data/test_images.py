"""images.py on small arrays with exact expected pixels, plus routing of a real gray-as-RGB file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmednet.data.images import is_gray_content, resize_to_square, to_channels
from openmednet.data.readers import read_images


def test_is_gray_content_with_tolerance() -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[..., :] = [[10], [200]]
    assert is_gray_content(rgb) and is_gray_content(rgb[..., 0])
    rgb[0, 0] = [10, 12, 11]  # JPEG chroma noise: 2 levels
    assert not is_gray_content(rgb) and is_gray_content(rgb, tol=2)
    rgb[1, 1] = [255, 0, 0]
    assert not is_gray_content(rgb, tol=2)


def test_real_gray_jpeg_saved_as_rgb_routes_to_gray(shared_data: Path) -> None:
    # "no 9.png" is a brain MR slice saved as a 1920x1080 RGB PNG with equal channels.
    mri = shared_data / "gray/targets/brain_mri_yes_no/no/no 9.png"
    cell = sorted((shared_data / "color/pretrain/pbc_blood_cells").rglob("*.jpg"))[0]
    (mri_img, mri_meta), = read_images(mri)
    (cell_img, _), = read_images(cell)
    assert mri_meta.photometric == "RGB" and is_gray_content(mri_img)
    assert cell_img.ndim == 3 and not is_gray_content(cell_img, tol=8)


def test_to_channels_bt601_luma() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], dtype=np.uint8)
    gray, converted = to_channels(rgb, 1)
    # 0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 0.114 * 255 = 29.1; equal channels stay exact.
    np.testing.assert_array_equal(gray, [[76, 150, 29, 90]])
    assert converted and gray.dtype == np.uint8


def test_to_channels_gray_to_rgb_and_no_op() -> None:
    gray = np.array([[0, 7], [128, 255]], dtype=np.uint8)
    rgb, converted = to_channels(gray, 3)
    assert converted and rgb.shape == (2, 2, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)
    same, converted = to_channels(gray, 1)
    assert not converted and same is gray
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        to_channels(gray, 2)  # type: ignore[arg-type]


def test_pad_centres_without_resampling() -> None:
    img = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.uint8)  # (2, 4): already 4 wide
    out = resize_to_square(img, 4, mode="pad")
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[1:3] = img  # top = (4 - 2) // 2 = 1
    np.testing.assert_array_equal(out, expected)


def test_pad_odd_margin_goes_bottom_right() -> None:
    img = np.full((1, 4), 9, dtype=np.uint8)
    out = resize_to_square(img, 4, mode="pad")
    np.testing.assert_array_equal(out[:, 0], [0, 9, 0, 0])  # top = (4 - 1) // 2 = 1


def test_crop_takes_centre_window() -> None:
    img = np.arange(24, dtype=np.uint8).reshape(4, 6)
    out = resize_to_square(img, 4, mode="crop")
    np.testing.assert_array_equal(out, img[:, 1:5])  # left = (6 - 4) // 2 = 1


def test_downscale_pad_keeps_aspect() -> None:
    img = np.full((8, 4, 3), 77, dtype=np.uint8)  # tall RGB -> scaled to (4, 2), padded left/right
    out = resize_to_square(img, 4, mode="pad")
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, 1:3], 77)
    np.testing.assert_array_equal(out[:, [0, 3]], 0)


def test_upscale_crop_constant_stays_constant() -> None:
    out = resize_to_square(np.full((2, 3), 200, dtype=np.uint8), 6, mode="crop")  # -> (6, 9) -> centre 6x6
    np.testing.assert_array_equal(out, np.full((6, 6), 200))


def test_stretch_is_one_pillow_resize_of_both_sides() -> None:
    """Segmentation's mode: the whole image, aspect ratio not kept (2 x 3 -> 6 x 6), no padding."""
    img = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    expected = np.asarray(Image.fromarray(img).resize((6, 6), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_to_square(img, 6, mode="stretch"), expected)
    np.testing.assert_array_equal(resize_to_square(img[:, :2], 2, mode="stretch"), img[:, :2])  # no scaling: exact


def test_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="expected a uint8 image, got dtype float32"):
        resize_to_square(np.zeros((2, 2), dtype=np.float32), 4)
    with pytest.raises(ValueError, match="mode must be 'pad', 'crop' or 'stretch'"):
        resize_to_square(np.zeros((2, 2), dtype=np.uint8), 4, mode="fill")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected shape \(H, W\) or \(H, W, 3\)"):
        is_gray_content(np.zeros((2, 2, 4), dtype=np.uint8))
