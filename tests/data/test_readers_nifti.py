"""NiftiReader: axis/stride slicing, 4D volumes, percentile scaling, empty slices, bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from openmednet.data.readers import NiftiReader, SkipImage, read_images


def _save(tmp_path: Path, data: np.ndarray, name: str = "v.nii.gz") -> Path:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine=np.eye(4)), path)
    return path


def _read(path: Path, **options) -> tuple[list[tuple[np.ndarray, object]], list[SkipImage]]:
    skips: list[SkipImage] = []
    images = list(read_images(path, on_skip=skips.append, **options))
    return images, skips


def test_percentile_scaling_per_volume(tmp_path: Path) -> None:
    data = np.arange(1000, dtype=np.int16).reshape(10, 10, 10)
    images, skips = _read(_save(tmp_path, data), min_foreground=0.0)
    lo, hi = np.percentile(np.arange(1000), [0.5, 99.5])  # 4.995, 994.005
    expected = np.clip(np.rint((data - lo) * 255 / (hi - lo)), 0, 255).astype(np.uint8)
    assert not skips and len(images) == 10
    for img, meta in images:
        np.testing.assert_array_equal(img, expected[:, :, meta.frame])
    assert images[0][1].extra["window_low"] == pytest.approx(4.995)


def test_axis_and_stride_address_the_same_voxels(shared_data: Path) -> None:
    path = shared_data / "formats/nibabel-5.4.2/tests_data/anatomical.nii"  # (33, 41, 25), >i2
    axial, _ = _read(path, axis=2, min_foreground=0.0)
    sagittal, _ = _read(path, axis=0, stride=4, min_foreground=0.0)
    assert [m.frame for _, m in sagittal] == list(range(0, 33, 4))
    assert sagittal[0][0].shape == (41, 25) and axial[0][0].shape == (33, 41)
    # Voxel (i, j, k) is pixel [j, k] of sagittal slice i and pixel [i, j] of axial slice k.
    by_k = np.stack([img for img, _ in axial], axis=2)
    for img, meta in sagittal:
        np.testing.assert_array_equal(img, by_k[meta.frame])


def test_4d_first_or_all_volumes(shared_data: Path) -> None:
    path = shared_data / "formats/nibabel-5.4.2/tests_data/example4d.nii.gz"  # (128, 96, 24, 2)
    first, _ = _read(path, min_foreground=0.0)
    every, _ = _read(path, volumes="all", min_foreground=0.0)
    assert len(first) == 24 and len(every) == 48
    assert [m.extra["volume"] for _, m in every] == [0] * 24 + [1] * 24
    assert first[0][1].original_shape == (128, 96, 24, 2)
    for (a, _), (b, _) in zip(first, every[:24], strict=False):
        np.testing.assert_array_equal(a, b)


def test_4d_made_with_nibabel(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(8, 6, 5, 3)).astype(np.float32)
    data[..., 2] += 5000  # a later volume with a different range must not affect volume 0
    images, _ = _read(_save(tmp_path, data), volumes="first", min_foreground=0.0)
    lo, hi = np.percentile(data[..., 0], [0.5, 99.5])
    expected = np.clip(np.rint((data[..., 0] - lo) * 255 / (hi - lo)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.stack([i for i, _ in images], axis=2), expected)


def test_nifti2_is_read(shared_data: Path) -> None:
    images, _ = _read(shared_data / "formats/nibabel-5.4.2/tests_data/example_nifti2.nii.gz", min_foreground=0.0)
    assert len(images) == 12 and images[0][0].shape == (32, 20) and images[0][0].dtype == np.uint8


def test_empty_slices_are_counted(shared_data: Path) -> None:
    # Brain-extracted Colin27: slices above the head are zero. Stride 6 keeps the test fast.
    path = shared_data / "formats/debian-mricron-data-1.2.20211006/ch2bet.nii.gz"
    images, skips = _read(path, stride=6)
    assert len(images) + len(skips) == len(range(0, 181, 6))
    assert skips and {s.reason for s in skips} == {"empty_slice"}
    assert 0 in {s.frame for s in skips}  # the bottom slice is below the skull-stripped brain
    assert all(s.path == path for s in skips)


def test_constant_slices_in_synthetic_volume(tmp_path: Path) -> None:
    data = np.zeros((16, 16, 4), dtype=np.int16)
    data[4:12, 4:12, 1] = 500
    data[2:14, 2:14, 2] = np.arange(144, dtype=np.int16).reshape(12, 12)
    images, skips = _read(_save(tmp_path, data))
    assert [m.frame for _, m in images] == [1, 2]
    assert [(s.reason, s.frame) for s in skips] == [("empty_slice", 0), ("empty_slice", 3)]


# --- bad input ----------------------------------------------------------------------------------


def test_5d_volume_is_unsupported(tmp_path: Path) -> None:
    path = _save(tmp_path, np.ones((4, 4, 3, 2, 2), dtype=np.int16))
    with pytest.raises(SkipImage) as info:
        list(read_images(path))
    assert info.value.reason == "unsupported_image"


def test_truncated_gzip_is_corrupt(tmp_path: Path, shared_data: Path) -> None:
    data = (shared_data / "formats/nibabel-5.4.2/tests_data/example4d.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 3])
    with pytest.raises(SkipImage) as info:
        list(read_images(tmp_path / "cut.nii.gz"))
    assert info.value.reason == "corrupt"


@pytest.mark.parametrize("content,reason", [(b"", "empty_file"), (b"hello, not a volume\n" * 30, "not_an_image")])
def test_empty_and_text_files(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "x.nii").write_bytes(content)
    skips: list[SkipImage] = []
    assert list(read_images(tmp_path / "x.nii", on_skip=skips.append)) == []
    assert [s.reason for s in skips] == [reason]


def test_gzip_of_garbage_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "g.nii.gz").write_bytes(gzip.compress(b"\x00" * 500))
    with pytest.raises(SkipImage) as info:
        list(read_images(tmp_path / "g.nii.gz"))
    assert info.value.reason == "not_an_image"


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="axis must be 0, 1 or 2"):
        NiftiReader(axis=3)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        NiftiReader(stride=0)
    with pytest.raises(ValueError, match="volumes must be"):
        NiftiReader(volumes="last")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_voxels must be >= 1"):
        NiftiReader(max_voxels=0)


def test_voxel_limit_is_checked_on_the_header(tmp_path: Path) -> None:
    path = _save(tmp_path, np.arange(1000, dtype=np.int16).reshape(10, 10, 10))
    assert len(_read(path, max_voxels=1000, min_foreground=0.0)[0]) == 10
    with pytest.raises(SkipImage, match="exceeds 999 voxels") as info:
        list(read_images(path, max_voxels=999))
    assert info.value.reason == "decompression_bomb"


def test_nan_voxels_do_not_poison_scaling(tmp_path: Path) -> None:
    data = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    data[0, 0, :] = np.nan  # masked statistical maps store NaN outside the mask
    images, _ = _read(_save(tmp_path, data), min_foreground=0.0)
    finite = data[np.isfinite(data)]
    lo, hi = np.percentile(finite, [0.5, 99.5])
    expected = np.clip(np.rint((np.nan_to_num(data, nan=lo) - lo) * 255 / (hi - lo)), 0, 255)
    np.testing.assert_array_equal(np.stack([i for i, _ in images], axis=2), expected)
    assert images[0][0][0, 0] == 0
