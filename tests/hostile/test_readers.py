"""Issue 14, hostile input to the readers: strips that pass a pixel limit, broken links, bad names.

The readers are the one place where predict, serve and the corpus builder meet a file, so the
geometry bound (area, each side, aspect ratio) is checked there, on the header, before decoding.
Every file here is real and written to ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmednet import create_model
from openmednet.data.readers import DicomReader, NiftiReader, PILReader, SkipImage, read_images
from openmednet.data.readers.base import DEFAULT_MAX_ASPECT, DEFAULT_MAX_SIDE


def _skips(path: Path, reader=None) -> tuple[list, list[SkipImage]]:
    skips: list[SkipImage] = []
    images = [a for a, _ in read_images(path, reader, on_skip=skips.append)]
    return images, skips


@pytest.mark.parametrize("width", [100_000, 200_000])
def test_tiny_png_strip_is_refused_from_its_header(tmp_path: Path, width: int) -> None:
    """Probe: a 177-byte 100000x1 PNG took 5.4 s in serve, a 276-byte 200000x1 one 12 s and 3 GB."""
    path = tmp_path / "strip.png"
    Image.new("L", (width, 1)).save(path)
    assert path.stat().st_size < 400
    start = time.perf_counter()
    images, (skip,) = _skips(path)
    assert time.perf_counter() - start < 0.5
    assert images == []
    assert skip.reason == "decompression_bomb" and f"a side of {width} pixels" in skip.message


def test_strip_within_the_side_limit_is_refused_by_its_aspect(tmp_path: Path) -> None:
    Image.new("L", (10_000, 1)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 2_000)).save(tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        images, (skip,) = _skips(tmp_path / name)
        assert images == [] and skip.reason == "extreme_aspect", skip


def test_elongated_but_plausible_images_still_read(tmp_path: Path) -> None:
    """The bound keeps every real shape: the most elongated image of ../shared/data is 128 x 41."""
    side = int(DEFAULT_MAX_ASPECT) * 32
    Image.new("L", (side, 32), 7).save(tmp_path / "wide.png")
    Image.new("L", (32, side), 7).save(tmp_path / "tall.png")
    for name in ("wide.png", "tall.png"):
        images, skips = _skips(tmp_path / name)
        assert skips == [] and len(images) == 1


def test_limits_are_reader_options(tmp_path: Path) -> None:
    Image.new("L", (10_000, 1)).save(tmp_path / "a.png")
    images, skips = _skips(tmp_path / "a.png", PILReader(max_aspect=10_000))
    assert skips == [] and images[0].shape == (1, 10_000)
    with pytest.raises(ValueError, match="max_aspect"):
        PILReader(max_aspect=0.5)
    with pytest.raises(ValueError, match="max_side"):
        DicomReader(max_side=0)


def test_every_tiff_page_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "pages.tif"
    Image.new("L", (64, 64), 9).save(path, save_all=True, append_images=[Image.new("L", (5_000, 2))])
    images, skips = _skips(path)
    assert len(images) == 1
    assert [(s.reason, s.frame) for s in skips] == [("extreme_aspect", 1)]


def test_dicom_strip_is_refused_before_decoding(shared_data: Path, tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(shared_data / "formats/pydicom-3.0.2/MR_small.dcm")
    ds.Rows, ds.Columns = 1, DEFAULT_MAX_SIDE + 1  # pixel data left as is: only the header is read
    ds.save_as(tmp_path / "strip.dcm")
    images, (skip,) = _skips(tmp_path / "strip.dcm")
    assert images == [] and skip.reason == "decompression_bomb"
    ds.Columns = 64 * 17
    ds.save_as(tmp_path / "aspect.dcm")
    assert _skips(tmp_path / "aspect.dcm")[1][0].reason == "extreme_aspect"


def test_nifti_slices_across_a_thin_slab_are_refused(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random((64, 64, 2)).astype(np.float32), np.eye(4)), tmp_path / "slab.nii")
    images, (skip,) = _skips(tmp_path / "slab.nii", NiftiReader(axis=0))
    assert images == [] and skip.reason == "extreme_aspect"
    assert len(_skips(tmp_path / "slab.nii", NiftiReader(axis=2))[0]) == 2  # the axial slices are fine


def test_npz_rows_are_bounded(tmp_path: Path) -> None:
    np.savez(tmp_path / "strips.npz", train_images=np.zeros((2, 1, 5_000), np.uint8), train_labels=np.zeros((2, 1)))
    images, (skip,) = _skips(tmp_path / "strips.npz")
    assert images == [] and skip.reason == "extreme_aspect"


def _write_zero_npz(path: Path, shape: tuple[int, ...]) -> None:
    """A MedMNIST-layout .npz whose ``train_images`` are ``shape`` zeros, deflated while streamed
    (a zip bomb: 17-18 MB declared, 1028 times less on disk; never held in memory here)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("train_images.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
            left, chunk = int(np.prod(shape)), bytes(1 << 20)
            while left:
                member.write(chunk[: min(left, len(chunk))])
                left -= min(left, len(chunk))
        with zf.open("train_labels.npy", "w") as member:
            np.lib.format.write_array(member, np.zeros((shape[0], 1), np.uint8))


# Regression (review finding): the npz reader decompressed every array before checking the row
# geometry, so a small archive inflated to its declared size before being refused.
@pytest.mark.parametrize(
    ("shape", "reason", "says"),
    [
        ((1, 16_385, 1_025), "decompression_bomb", "a side of 16385 pixels"),  # a row over the geometry bound
        ((1_100, 128, 128), "decompression_bomb", "limit 200:1"),  # fine rows, 18 MB declared from 18 kB
    ],
)
def test_npz_bomb_is_refused_from_its_headers_without_inflating(tmp_path: Path, shape, reason, says) -> None:
    import tracemalloc

    path = tmp_path / "bomb.npz"
    _write_zero_npz(path, shape)
    assert path.stat().st_size * 500 < np.prod(shape)  # over 500:1
    tracemalloc.start()
    try:
        images, (skip,) = _skips(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert images == [] and skip.reason == reason and says in skip.message
    assert peak < 4_000_000  # numpy reports its buffers to tracemalloc: the array was never allocated


def test_npz_labels_must_match_the_image_rows(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.zeros((2, 1)))
    images, (skip,) = _skips(tmp_path / "m.npz")
    assert images == [] and skip.reason == "unsupported_image" and "2 label rows for 3 images" in skip.message


def test_predict_passes_over_a_strip_quickly(tmp_path: Path) -> None:
    """predict DIR uses the same readers: the strip becomes one warned skip, the good image a row."""
    from openmednet.serve.predictor import Predictor

    Image.new("L", (200_000, 1)).save(tmp_path / "strip.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 60), dtype=np.uint8)).save(tmp_path / "ok.png")
    predictor = Predictor(create_model("mednet_test", num_classes=2).eval())
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="strip.png"):
        predictions = list(predictor.predict_path(tmp_path))
    assert time.perf_counter() - start < 5
    assert [Path(p.source).name for p in predictions] == ["ok.png"]


def test_serve_upload_of_a_strip_is_refused_from_its_header(tmp_path: Path) -> None:
    """serve reads uploads through the same readers (``predict_bytes``): refused before any resize."""
    from openmednet.serve.predictor import Predictor

    Image.new("L", (100_000, 1)).save(tmp_path / "strip.png")
    predictor = Predictor(create_model("mednet_test", num_classes=2).eval())
    start = time.perf_counter()
    with pytest.raises(SkipImage) as info:
        predictor.predict_bytes((tmp_path / "strip.png").read_bytes(), "strip.png", max_pixels=4096 * 4096)
    assert time.perf_counter() - start < 1
    assert info.value.reason == "decompression_bomb"


def test_symlink_loop_and_dangling_link_are_reported(tmp_path: Path) -> None:
    """Probe (item 9): a symlink loop was missing from the skip report."""
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    for name, words in (("loop.png", "loop"), ("dangling.png", "missing file")):
        images, (skip,) = _skips(tmp_path / name, "pil")
        assert images == [] and skip.reason == "broken_link" and words in skip.message


def test_file_name_that_is_not_utf8_is_one_skip_naming_its_bytes(tmp_path: Path) -> None:
    """Every later UTF-8 write (records, report, predictions CSV) would refuse the name: skip it here."""
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.png"))
    Image.new("L", (16, 16), 3).save(path)
    images, (skip,) = _skips(path)
    assert images == [] and skip.reason == "bad_file_name" and "caf\\xe9.png" in skip.message
    str(skip).encode("utf-8")  # the message itself is printable


@pytest.mark.parametrize("layout,real", [("dicom", "pydicom-3.0.2/693_J2KI.dcm"), ("nifti", "debian-mricron-data-1.2.20211006/ch2bet.nii.gz")])
def test_broken_links_in_dicom_and_nifti_folders_are_listed_not_dropped(shared_data: Path, tmp_path: Path, layout: str, real: str) -> None:
    """Review finding: the DICOM and NIfTI enumerators dropped broken links silently (images did not)."""
    from openmednet.data.sources import SourceSpec, iter_source

    src = shared_data / "formats" / real
    shutil.copyfile(src, tmp_path / src.name)  # a readable file (a link out of the folder is refused)
    os.symlink(tmp_path / "gone" / src.name, tmp_path / f"dangling_{src.name}")
    items = list(iter_source(SourceSpec(name="x", root=tmp_path, format=layout)))
    assert sorted(Path(i.path).name for i in items) == sorted([src.name, f"dangling_{src.name}"])
    broken = next(i for i in items if Path(i.path).name.startswith("dangling"))
    images, (skip,) = _skips(Path(broken.path), layout)
    assert images == [] and skip.reason == "broken_link"
