"""Source enumeration on the real ../shared/data tree and on small layouts built in tmp_path."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from openmednet.data.readers import SkipImage
from openmednet.data.sources import SourceItem, SourceSpec, detect_format, iter_source, read_item


def _real_jpegs(shared_data: Path, n: int) -> list[Path]:
    return sorted((shared_data / "gray/targets/busi/Dataset_BUSI_with_GT/benign").glob("*.jpg"))[:n]


def test_brain_tumor_mri_labels_csv(shared_data: Path) -> None:
    spec = SourceSpec("brain_tumor_mri", shared_data / "gray/pretrain/brain_tumor_mri", modality="MR")
    items = list(iter_source(spec))
    assert detect_format(spec.root) == "labels_csv"
    assert len(items) == 7023
    assert set(Counter(i.label for i in items)) == {"glioma", "meningioma", "notumor", "pituitary"}
    assert set(i.split for i in items) == {"train", "val", "test"}
    (img, meta), = read_item(items[0])
    assert (meta.source, meta.label, meta.split, meta.modality) == ("brain_tumor_mri", items[0].label, "train", "MR")
    assert meta.path == items[0].path and img.dtype == np.uint8


def test_busi_and_knee_groups(shared_data: Path) -> None:
    busi = list(iter_source(SourceSpec("busi", shared_data / "gray/targets/busi")))
    assert len(busi) == 780
    assert Counter(i.label for i in busi) == {"benign": 437, "malignant": 210, "normal": 133}
    knee = list(iter_source(SourceSpec("knee", shared_data / "gray/pretrain/knee_oa")))
    assert len(knee) == 8260 and all(i.group for i in knee)  # group = subject id


def test_pneumoniamnist_npz_rows(shared_data: Path) -> None:
    spec = SourceSpec(
        "pneumoniamnist", shared_data / "gray/targets/pneumoniamnist", label_map={"0": "normal", "1": "pneumonia"}
    )
    items = list(iter_source(spec))
    assert detect_format(spec.root) == "npz" and len(items) == 5856
    assert Counter(i.split for i in items) == {"train": 4708, "val": 524, "test": 624}
    assert set(i.label for i in items) == {"normal", "pneumonia"}
    item = items[4708]  # first val row
    assert item.frame == ("val", 0)
    (img, meta), = read_item(item)
    with np.load(item.path) as z:
        np.testing.assert_array_equal(img, z["val_images"][0])
    assert meta.label == item.label and meta.split == "val" and meta.source == "pneumoniamnist"


def test_missing_file_in_labels_csv_is_a_counted_skip(tmp_path: Path, shared_data: Path) -> None:
    src = _real_jpegs(shared_data, 2)
    for p in src:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "labels.csv").write_text(
        "path,label,split,group\n"
        f"{src[0].name},benign,train,p1\n"
        "gone.jpg,benign,test,p2\n"
        f"{src[1].name},,,\n"
        "report.pdf,benign,,\n"
    )
    items = list(iter_source(SourceSpec("mini", tmp_path)))
    annotations = [(i.label, i.split, i.group) for i in items]
    assert annotations[:3] == [("benign", "train", "p1"), ("benign", "test", "p2"), (None, None, None)]
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4\n")
    skips: list[SkipImage] = []
    read = [meta for item in items for _, meta in read_item(item, on_skip=skips.append)]
    assert len(read) == 2 and [s.reason for s in skips] == ["missing_file", "unsupported_format"]
    assert [s.path for s in skips] == [tmp_path / "gone.jpg", tmp_path / "report.pdf"]
    with pytest.raises(SkipImage, match="missing_file"):
        list(read_item(items[1]))


def test_class_folders_flat_and_auto(tmp_path: Path, shared_data: Path) -> None:
    jpgs = _real_jpegs(shared_data, 3)
    classes = tmp_path / "classes"
    for label, p in zip(["b", "a", "a"], jpgs, strict=False):
        (classes / label / "sub").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, classes / label / "sub" / p.name)
    (classes / "a" / "notes.txt").write_text("not an image")
    items = list(iter_source(SourceSpec("cf", classes)))
    assert detect_format(classes) == "class_folders"
    assert [i.label for i in items] == ["a", "a", "b"]  # sorted folders, non-images ignored

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in jpgs:
        shutil.copy(p, flat / p.name)
    (flat / ".hidden.jpg").write_bytes(b"")
    items = list(iter_source(SourceSpec("fl", flat)))
    assert detect_format(flat) == "flat"
    assert len(items) == 3 and all(i.label is None for i in items)


def test_generic_csv_with_column_mapping(tmp_path: Path, shared_data: Path) -> None:
    jpg = _real_jpegs(shared_data, 1)[0]
    shutil.copy(jpg, tmp_path / "img1.jpg")
    (tmp_path / "meta.csv").write_text("image_id,dx,lesion_id\nimg1.jpg,nevus,L7\n")
    spec = SourceSpec(
        "ham_like",
        tmp_path,
        format="csv",
        csv_file=Path("meta.csv"),
        columns={"path": "image_id", "label": "dx", "group": "lesion_id"},
        label_map={"nevus": "nv"},
    )
    (item,) = iter_source(spec)
    assert (item.path, item.label, item.group, item.split) == (tmp_path / "img1.jpg", "nv", "L7", None)
    bad = SourceSpec("bad", tmp_path, format="csv", csv_file=Path("meta.csv"), columns={"path": "file"})
    with pytest.raises(ValueError, match=r"lacks columns \['file'\]"):
        list(iter_source(bad))


def test_dicom_and_nifti_sources(tmp_path: Path, shared_data: Path) -> None:
    fmt = shared_data / "formats"
    shutil.copy(fmt / "pydicom-3.0.2/CT_small.dcm", tmp_path / "ct.dcm")
    shutil.copy(fmt / "pydicom-data-1.0.0/emri_small.dcm", tmp_path / "IM0002")  # no suffix
    # NIfTI options on a DICOM source are ignored by the DICOM reader (sources may mix formats).
    pacs = SourceSpec("pacs", tmp_path, format="dicom", reader_options={"stride": 2})
    (item_mr, item_ct) = iter_source(pacs)  # sorted: "IM0002" < "ct.dcm"
    assert item_ct.group == "1CT1"  # PatientID for group-aware splits
    assert item_mr.path.name == "IM0002" and len(list(read_item(item_mr))) == 10
    one = SourceItem(path=item_mr.path, frame=3, source="pacs")
    ((_, meta),) = read_item(one)
    assert meta.frame == 3

    nifti = SourceSpec("vols", fmt / "nibabel-5.4.2/tests_data", format="nifti", reader_options={"axis": 0, "stride": 8})
    items = list(iter_source(nifti))
    assert [i.path.name for i in items] == ["anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii"]
    frames = [m.frame for _, m in read_item(items[0], on_skip=lambda s: None)]
    assert frames and set(frames) <= {0, 8, 16, 24, 32}


def test_bad_specs() -> None:
    with pytest.raises(KeyError, match="did you mean 'nifti'"):
        SourceSpec("x", Path("."), format="nifty")
    with pytest.raises(ValueError, match="needs columns"):
        SourceSpec("x", Path("."), format="csv")
    with pytest.raises(KeyError, match="unknown reader option 'axes'; did you mean 'axis'"):
        SourceSpec("x", Path("."), reader_options={"axes": 0})
    with pytest.raises(FileNotFoundError, match="source root not found"):
        list(iter_source(SourceSpec("x", Path("/nonexistent/openmednet"))))


def test_single_slice_item_reports_only_its_own_skips(tmp_path: Path) -> None:
    import nibabel as nib

    data = np.zeros((8, 8, 3), dtype=np.int16)
    data[2:6, 2:6, 1] = np.arange(16, dtype=np.int16).reshape(4, 4) + 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "v.nii")
    skips: list[SkipImage] = []
    good = list(read_item(SourceItem(tmp_path / "v.nii", frame=1), on_skip=skips.append))
    assert len(good) == 1 and skips == []  # slices 0 and 2 are empty but not this item's concern
    assert list(read_item(SourceItem(tmp_path / "v.nii", frame=2), on_skip=skips.append)) == []
    assert [(s.reason, s.frame) for s in skips] == [("empty_slice", 2)]


def test_npz_selector_survives_json(shared_data: Path) -> None:
    path = shared_data / "gray/targets/pneumoniamnist/pneumoniamnist.npz"
    ((img, meta),) = read_item(SourceItem(path, frame=["test", 3]))  # type: ignore[arg-type]
    assert (meta.split, meta.frame) == ("test", 3)
    with pytest.raises(ValueError, match="frame selector must be"):
        list(read_item(SourceItem(path, frame="test/3")))  # type: ignore[arg-type]
