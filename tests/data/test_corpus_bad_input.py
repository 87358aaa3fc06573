"""Bad input never aborts a build: every skip is counted with its reason in the report.

The files are made from real images of ../shared/data: truncated copies, a zero-byte file, text
named .png, a PNG whose header claims 10^10 pixels, a DICOM re-labelled with a transfer syntax
nobody decodes (MPEG-2), 16-bit / CMYK / palette / RGBA variants, and a real 4D NIfTI.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmednet.data.corpus import build_corpus
from openmednet.data.images import resize_to_square
from openmednet.data.shards import CorpusArrays
from openmednet.data.sources import SourceSpec


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR chunk (bytes 8-33) with another size and a valid CRC."""
    body = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + png[33:]


def _unsupported_dicom(src: Path, out: Path) -> None:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ds = pydicom.dcmread(src)
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG-2: no Python decoder
    ds.save_as(out, enforce_file_format=True)


@pytest.fixture(scope="module")
def bad_build(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    src = tmp / "files"
    src.mkdir()
    covid = sorted((shared_data / "gray/pretrain/covid_cxr_figure1/images").glob("*.jpg"))
    gray = [np.asarray(Image.open(p).convert("L")) for p in covid[:6]]
    Image.fromarray(gray[0]).save(src / "a_good.png")
    (src / "b_zero.png").write_bytes(b"")
    jpg = covid[6].read_bytes()
    (src / "c_truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    png = (src / "a_good.png").read_bytes()
    (src / "d_truncated.png").write_bytes(png[: len(png) // 2])
    (src / "e_text.png").write_text("this is not an image\n")
    (src / "f_bomb.png").write_bytes(_patch_png_size(png, 100_000, 100_000))
    _unsupported_dicom(shared_data / "formats/pydicom-3.0.2/MR_small.dcm", src / "g_mpeg2.dcm")
    sixteen = gray[1].astype(np.uint16) * 200 + 1000  # 16-bit values 1000..52000
    Image.fromarray(sixteen).save(src / "h_16bit.png")
    Image.fromarray(gray[2]).convert("CMYK").save(src / "i_cmyk.tif")
    Image.fromarray(gray[3]).convert("P").save(src / "j_palette.png")
    rgba = Image.fromarray(gray[4]).convert("RGBA")
    rgba.putalpha(255)
    rgba.save(src / "k_rgba.png")
    ham = min((shared_data / "color/pretrain/ham10000/images").glob("*.jpg"))
    Image.open(ham).convert("CMYK").save(src / "l_colour_cmyk.jpg")

    nifti = shared_data / "formats/nibabel-5.4.2/tests_data/example4d.nii.gz"
    sources = [SourceSpec("files", src, format="flat"), SourceSpec("nifti4d", nifti, format="nifti", modality="MR")]
    manifest = build_corpus(sources, tmp / "corpus", channels=1, image_size=32, workers=1)
    return manifest, CorpusArrays(tmp / "corpus"), gray, sixteen, tmp / "corpus"


def test_every_bad_file_is_counted_by_reason(bad_build):
    manifest, _, _, _, _ = bad_build
    files = manifest.stats["skipped_by_source"]["files"]
    assert files == {
        "empty_file": 1,
        "corrupt": 2,
        "not_an_image": 1,
        "decompression_bomb": 1,
        "unsupported_transfer_syntax": 1,
        "wrong_channels": 1,
    }
    examples = manifest.stats["skip_examples"]
    assert any("f_bomb.png" in e for e in examples["decompression_bomb"])
    assert any("g_mpeg2.dcm" in e for e in examples["unsupported_transfer_syntax"])


def test_odd_but_valid_files_are_kept_with_correct_pixels(bad_build):
    _, arrays, gray, sixteen, _ = bad_build
    by_name = {Path(r["path"]).name: i for i, r in enumerate(arrays.iter_records()) if r["source"] == "files"}
    assert sorted(by_name) == ["a_good.png", "h_16bit.png", "i_cmyk.tif", "j_palette.png", "k_rgba.png"]
    np.testing.assert_array_equal(arrays.image(by_name["a_good.png"])[0], resize_to_square(gray[0], 32))
    lo, hi = int(sixteen.min()), int(sixteen.max())
    scaled = np.round((sixteen.astype(np.float64) - lo) * 255 / (hi - lo)).astype(np.uint8)
    np.testing.assert_array_equal(arrays.image(by_name["h_16bit.png"])[0], resize_to_square(scaled, 32))
    np.testing.assert_array_equal(arrays.image(by_name["k_rgba.png"])[0], resize_to_square(gray[4], 32))


def test_4d_nifti_gives_slices_of_the_first_volume(bad_build):
    import nibabel as nib

    manifest, arrays, _, _, _ = bad_build
    path = Path(manifest.sources[1]["root"])
    shape = nib.load(path).shape
    assert len(shape) == 4
    n_kept = sum(r["source"] == "nifti4d" for r in arrays.iter_records())
    n_skipped = sum(manifest.stats["skipped_by_source"].get("nifti4d", {}).values())
    dropped = sum(manifest.stats["dropped_by_source"].get("nifti4d", {}).values())
    assert n_kept > 0
    assert n_kept + n_skipped + dropped == shape[2]  # every slice of volume 0 is accounted for


def test_report_lists_the_skips(bad_build):
    _, _, _, _, out = bad_build
    report = (out / "report.md").read_text()
    for reason in ("empty_file", "corrupt", "not_an_image", "decompression_bomb", "unsupported_transfer_syntax"):
        assert f"`{reason}`" in report


def test_a_crashing_decoder_process_skips_only_its_file(shared_data, tmp_path, monkeypatch):
    """A decoder that kills its worker process (segfault, out of memory) costs one file, not the build."""
    import os

    from openmednet.data.corpus import _decode

    src = tmp_path / "files"
    src.mkdir()
    for i, p in enumerate(sorted((shared_data / "gray/pretrain/covid_cxr_figure1/images").glob("*.jpg"))[:5]):
        (src / (f"crash_me_{i}.jpg" if i == 2 else f"ok_{i}.jpg")).write_bytes(p.read_bytes())
    original = _decode.process_chunk

    def crashing(items, *args):
        if any("crash_me" in d["path"] for d in items):
            os._exit(1)  # what a segfaulting C decoder does to its process
        return original(items, *args)

    # the pool pickles the function by name: make the stand-in importable under the original name
    crashing.__module__, crashing.__qualname__ = original.__module__, original.__qualname__
    monkeypatch.setattr(_decode, "process_chunk", crashing)
    manifest = build_corpus(
        [SourceSpec("files", src, format="flat")], tmp_path / "c", channels=1, image_size=32, workers=2, chunk_items=2
    )
    assert manifest.stats["skipped"] == {"read_error": 1}
    assert any("crash_me_2.jpg" in e for e in manifest.stats["skip_examples"]["read_error"])
    kept = sorted(Path(r["path"]).name for r in CorpusArrays(tmp_path / "c").iter_records())
    assert kept == ["ok_0.jpg", "ok_1.jpg", "ok_3.jpg", "ok_4.jpg"]


def test_a_hashing_failure_is_raised_not_recorded_as_the_current_files_read_error(shared_data, tmp_path, monkeypatch):
    """Hashing runs on a batch that holds earlier files' images, after the current file's own
    error handler: a failure there is a bug to surface, not this file's ``read_error`` (which left
    it with an image record and a skip at once)."""
    from openmednet.data.corpus import _decode
    from openmednet.data.corpus._plan import _item_to_json
    from openmednet.data.sources import iter_source

    spec = SourceSpec("files", shared_data / "gray/pretrain/covid_cxr_figure1/images", format="flat")
    items = [_item_to_json(item) for _, item in zip(range(3), iter_source(spec), strict=False)]
    calls = []
    real = _decode.dedupe.phashes

    def second_call_fails(arrays):
        calls.append(len(arrays))
        if len(calls) == 2:
            raise RuntimeError("hash batch failed")
        return real(arrays)

    monkeypatch.setattr(_decode, "_HASH_BATCH_PIXELS", 1)  # flush after every file
    monkeypatch.setattr(_decode.dedupe, "phashes", second_call_fails)
    opts = _decode.DecodeOptions(1, 1, 32, "pad", 2)
    with pytest.raises(RuntimeError, match="hash batch failed"):
        _decode.process_chunk(items, {"files": {}}, {"files": None}, opts)


def test_a_source_without_a_readable_image_is_named_and_an_empty_corpus_refused(shared_data, tmp_path):
    """Regression (hostile-user probe): a source of unreadable files vanished from the build without a
    word, and a build of such sources only wrote a corpus of 0 images, which pre-training failed on."""
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("not an image\n")
    (junk / "b.png").write_bytes(b"")
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted((shared_data / "gray/pretrain/covid_cxr_figure1/images").glob("*.jpg"))[:3]:
        (good / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match=r"no image of the sources \['junk'\] could be decoded"):
        build_corpus([SourceSpec("junk", junk, format="flat")], tmp_path / "none", channels=1, image_size=32, workers=1)
    assert not (tmp_path / "none" / "manifest.json").exists()
    with pytest.warns(UserWarning, match=r"sources \['junk'\] gave no decodable image"):
        manifest = build_corpus([SourceSpec("junk", junk, format="flat"), SourceSpec("good", good, format="flat")],
                                tmp_path / "mixed", channels=1, image_size=32, workers=1)
    assert sum(s.count for s in manifest.shards) == 3
