"""Reader cost against the bare decoding library, measured in the same run on real files.

For each format, the reference is the library call a hand-written script would make (Pillow
``Image.open(...).convert(...)``, pydicom ``dcmread(...).pixel_array``, nibabel ``get_fdata``) and
the row is ``read_images`` on the same files, which adds the medical pipeline (modality LUT,
windowing, MONOCHROME1, percentile scaling, empty-slice checks, bad-input guards). The ratio is
``reader time / reference time`` (1.0 = no overhead; below 1 = faster than the plain call, as
with ``draft_size`` on large JPEGs). Times are the median of ``--iters`` passes over all files.

Usage::

    .venv/bin/python benchmarks/bench_readers.py            # about 30 s on one core
    .venv/bin/python benchmarks/bench_readers.py --iters 5
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import environment, markdown_table, time_fn

from openmednet.data.readers import read_images

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _pillow(paths: list[Path]) -> Callable[[], int]:
    from PIL import Image

    def run() -> int:
        n = 0
        for p in paths:
            with Image.open(p) as im:
                np.asarray(im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode))
            n += 1
        return n

    return run


def _pydicom(paths: list[Path]) -> Callable[[], int]:
    import pydicom

    def run() -> int:
        n = 0
        for p in paths:
            n += len(np.atleast_3d(pydicom.dcmread(p).pixel_array))
        return n

    return run


def _nibabel(paths: list[Path]) -> Callable[[], int]:
    import nibabel as nib

    def run() -> int:
        return sum(int(nib.load(p).get_fdata(dtype=np.float32).shape[2]) for p in paths)

    return run


def _reader(paths: list[Path], **options) -> Callable[[], int]:
    def run() -> int:
        return sum(1 for p in paths for _ in read_images(p, on_skip=lambda s: None, **options))

    return run


def _is_large_jpeg(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return im.format == "JPEG" and min(im.size) >= 512


def cases() -> list[tuple[str, list[Path], Callable, dict]]:
    """(name, files, reference factory, reader options) for each benchmarked format."""
    fmt = SHARED / "formats"
    # Untouched originals that are really JPEG (several are PNGs named .jpg) with both sides
    # >= 512 px: where draft decoding matters.
    large_jpeg = [p for p in sorted((SHARED / "gray/targets/brain_mri_yes_no").rglob("*.jp*g")) if _is_large_jpeg(p)]
    small_jpeg = sorted((SHARED / "gray/pretrain/brain_tumor_mri/Testing").rglob("*.jpg"))[:300]
    dicom = [fmt / "pydicom-data-1.0.0" / n for n in ("693_UNCI.dcm", "MR2_UNCI.dcm", "emri_small.dcm", "JPEG2000_UNC.dcm")]
    dicom_j2k = [fmt / "pydicom-data-1.0.0" / n for n in ("693_J2KR.dcm", "MR2_J2KI.dcm")]
    nifti = [
        fmt / "nilearn-0.14.1/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        fmt / "nibabel-5.4.2/tests_data/example4d.nii.gz",
    ]
    return [
        ("JPEG 128 px (brain_tumor_mri, 300 files)", small_jpeg, _pillow, {}),
        (f"JPEG originals >= 512 px (brain_mri_yes_no, {len(large_jpeg)} files)", large_jpeg, _pillow, {}),
        ("  same, draft_size=64", large_jpeg, _pillow, {"draft_size": 64}),
        ("DICOM uncompressed (4 files, 13 frames)", dicom, _pydicom, {}),
        ("DICOM JPEG 2000 (2 files)", dicom_j2k, _pydicom, {}),
        ("NIfTI (MNI T1 + 4D EPI, axial slices)", nifti, _nibabel, {}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not SHARED.is_dir():
        raise SystemExit(f"real data not found at {SHARED}")
    rows = []
    for name, paths, reference, options in cases():
        ref = time_fn(reference(paths), warmup=1, iters=args.iters).median
        images = _reader(paths, **options)()
        ours = time_fn(_reader(paths, **options), warmup=0, iters=args.iters).median
        rows.append([name, images, f"{ref * 1e3:.0f}", f"{ours * 1e3:.0f}", f"{images / ours:.0f}", f"{ours / ref:.2f}"])
    print(environment())
    print(markdown_table(["files", "images", "library ms", "reader ms", "reader img/s", "reader / library"], rows))


if __name__ == "__main__":
    main()
