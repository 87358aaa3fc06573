"""Corpus builder on real images: routing, exact duplicates, label conflicts, exclusion, decisions.

Builds use small subsets of ../shared/data (a CSV listing chosen rows of a folder's labels.csv),
32 px images and one process, so each test stays within a few seconds.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmednet.data.corpus import build_corpus, target_spec
from openmednet.data.curation import ImageTable, decide, normalise_split
from openmednet.data.images import resize_to_square
from openmednet.data.shards import SPLITS, CorpusArrays
from openmednet.data.sources import MANIFEST_COLUMNS, SourceSpec


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def subset_source(root: Path, tmp: Path, name: str, paths: list[str], **kw) -> SourceSpec:
    """A source holding only ``paths`` (relative to ``root``) of ``root/labels.csv``."""
    rows = {r["path"]: r for r in _rows(root)}
    out = tmp / f"{name}.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        w.writeheader()
        for p in paths:
            w.writerow({c: rows[p].get(c, "") for c in MANIFEST_COLUMNS})
    return SourceSpec(name=name, root=root, format="csv", csv_file=out, columns={c: c for c in MANIFEST_COLUMNS}, **kw)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cross_split_copies(root: Path, n_groups: int) -> list[list[str]]:
    """Groups of byte-identical brain_tumor_mri files spanning Testing and the training folders."""
    groups = defaultdict(list)
    for r in _rows(root):
        groups[_md5(root / r["path"])].append((r["path"], r["split"]))
    spanning = [sorted(p for p, _ in g) for g in groups.values() if {"train", "test"} <= {s for _, s in g}]
    return sorted(spanning)[:n_groups]


@pytest.fixture(scope="module")
def gray_sources(shared_data, tmp_path_factory):
    """Sources with exact copies across splits, a label conflict, RGB-saved gray files and colour
    files to skip; returns ``(sources, copies, files)``."""
    tmp = tmp_path_factory.mktemp("gray")
    btm = shared_data / "gray/pretrain/brain_tumor_mri"
    copies = _cross_split_copies(btm, 3)
    rows = [r["path"] for r in _rows(btm)]
    others = [p for p in rows if "Testing/" in p][:8] + [p for p in rows if "AugTraining/" in p][:8]
    btm_paths = sorted({p for g in copies for p in g} | set(others))

    busi = shared_data / "gray/targets/busi"
    conflict = ["Dataset_BUSI_with_GT/benign/benign (433).jpg", "Dataset_BUSI_with_GT/malignant/malignant (145).jpg"]
    busi_paths = conflict + ["Dataset_BUSI_with_GT/normal/normal (1).jpg", "Dataset_BUSI_with_GT/normal/normal (2).jpg"]

    yes_no = shared_data / "gray/targets/brain_mri_yes_no"
    rgb_gray = ["no/10 no.jpg", "no/11 no.jpg", "no/12 no.jpg"]  # RGB files with equal channels
    ham = shared_data / "color/pretrain/ham10000"
    ham_paths = [r["path"] for r in _rows(ham)][:3]

    sources = [
        subset_source(btm, tmp, "brain_tumor_mri", btm_paths, modality="MR"),
        subset_source(busi, tmp, "busi", busi_paths, modality="US"),
        subset_source(yes_no, tmp, "yes_no", rgb_gray, modality="MR"),
        subset_source(ham, tmp, "ham10000", ham_paths, modality="dermoscopy"),
    ]
    files = {
        s.name: [s.root / p for p in paths] for s, paths in zip(sources, [btm_paths, busi_paths, rgb_gray, ham_paths])
    }
    return sources, copies, files


@pytest.fixture(scope="module")
def gray_build(gray_sources, tmp_path_factory):
    sources, copies, files = gray_sources
    out = tmp_path_factory.mktemp("gray_build") / "corpus"
    manifest = build_corpus(sources, out, channels=1, image_size=32, workers=1, shard_size=16)
    return manifest, CorpusArrays(out), copies, files, out


def test_gray_build_routes_by_content(gray_build):
    manifest, arrays, _, files, _ = gray_build
    assert manifest.channels == 1 and arrays.image(0).shape == (1, 32, 32)
    for p in files["yes_no"]:  # the RGB files really are RGB on disk
        assert Image.open(p).mode == "RGB"
    records = list(arrays.iter_records())
    assert sum(r["source"] == "yes_no" for r in records) == 3
    assert manifest.stats["skipped"] == {"wrong_channels": 3}
    assert manifest.stats["skipped_by_source"] == {"ham10000": {"wrong_channels": 3}}


def test_gray_build_stores_pad_resized_pixels(gray_build):
    _, arrays, _, _, _ = gray_build
    for i, r in enumerate(arrays.iter_records()):
        if r["source"] in ("brain_tumor_mri", "yes_no") and i % 3 == 0:
            expected = resize_to_square(np.asarray(Image.open(r["path"]).convert("L")), 32, "pad")
            np.testing.assert_array_equal(arrays.image(i)[0], expected)


def test_gray_build_drops_exact_copies_keeping_train(gray_build):
    manifest, arrays, copies, files, _ = gray_build
    records = list(arrays.iter_records())
    kept = {
        Path(r["path"]).relative_to(files["brain_tumor_mri"][0].parents[2]).as_posix(): r
        for r in records
        if r["source"] == "brain_tumor_mri"
    }
    for group in copies:
        survivors = [p for p in group if p in kept]
        assert len(survivors) == 1, group
        assert kept[survivors[0]]["split"] == "train" and not survivors[0].startswith("Testing/")
    # every byte-identical file beyond the first copy is dropped (md5 computed independently)
    all_files = [p for name in ("brain_tumor_mri", "busi", "yes_no") for p in files[name]]
    expected_dups = len(all_files) - len({_md5(p) for p in all_files})
    assert manifest.stats["dropped"]["duplicate_exact"] == expected_dups


def test_gray_build_flags_the_busi_double_label(gray_build):
    manifest, arrays, _, _, _ = gray_build
    busi = [r for r in arrays.iter_records() if r["source"] == "busi"]
    conflicted = [r for r in busi if r.get("label_conflict")]
    assert len(conflicted) == 1 and conflicted[0]["label"] is None
    assert conflicted[0]["source_label"] in ("benign", "malignant")
    (entry,) = manifest.stats["label_conflicts"]
    assert entry["labels"] == ["busi/benign", "busi/malignant"]
    assert sorted(Path(p.split(":", 1)[1]).name for p in entry["images"]) == ["benign (433).jpg", "malignant (145).jpg"]
    idx = [i for i, r in enumerate(arrays.iter_records()) if r.get("label_conflict")]
    assert arrays.label[idx[0]] == -1


def test_gray_build_groups_and_report(gray_build):
    _, arrays, _, _, out = gray_build
    splits_of_group = defaultdict(set)
    for r, split in zip(arrays.iter_records(), arrays.split):
        assert SPLITS[split] == r["split"]
        if r.get("group"):
            splits_of_group[(r["source"], r["group"])].add(r["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    report = (out / "report.md").read_text()
    assert "wrong_channels" in report and "busi/benign, busi/malignant" in report
    assert (out / "report" / "per_source.png").stat().st_size > 1000
    assert not (out / ".build").exists()


def _file_bytes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _md5(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_workers_write_the_same_corpus_bytes_as_one(gray_build, gray_sources, tmp_path):
    """With 2 workers the report is counted and drawn in another process while the shards are
    written (``_build._write_and_draw``); every file must still equal the 1-worker build's: shards,
    manifest (counts, conflicts named), report text and plots."""
    one = gray_build[4]
    two = tmp_path / "corpus"
    build_corpus(gray_sources[0], two, channels=1, image_size=32, workers=2, shard_size=16)
    files = _file_bytes(two)
    assert {"manifest.json", "report.md", "report/per_source.png", "report/sizes.png"} <= set(files)
    assert files == _file_bytes(one)


def test_exclusion_drops_the_isic_ids_shared_with_the_target(shared_data, tmp_path):
    archive = shared_data / "color/pretrain/isic_archive"
    isic17 = shared_data / "color/targets/isic2017_melanoma"
    archive_paths = [r["path"] for r in _rows(archive)][:30]
    ids = [Path(p).name for p in archive_paths]
    t_rows = [r["path"] for r in _rows(isic17)]
    shared = [p for p in t_rows if Path(p).name in ids[::2]]  # every other archive image is in the target
    unrelated = [p for p in t_rows if "Training" in p and Path(p).name not in ids][:10]
    target = subset_source(isic17, tmp_path, "isic2017", shared + unrelated)
    source = subset_source(archive, tmp_path, "isic_archive", archive_paths)
    manifest = build_corpus([source], tmp_path / "c", channels=3, image_size=32, exclude=[target], workers=1)
    kept = {Path(r["path"]).name for r in CorpusArrays(tmp_path / "c").iter_records()}
    assert kept == set(ids) - {Path(p).name for p in shared}
    assert manifest.stats["exclusion"]["targets"] == {"isic2017": {"isic_archive": len(shared)}}
    assert manifest.stats["exclusion"]["target_images"] == {"isic2017": len(shared) + len(unrelated)}
    assert manifest.stats["exclusion"]["target_images_found"] == {"isic2017": len(shared)}


def test_target_spec_names_and_errors(shared_data, tmp_path):
    assert target_spec(shared_data / "gray/targets/busi").name == "busi"
    assert target_spec(shared_data / "gray/targets/pneumoniamnist/pneumoniamnist.npz").name == "pneumoniamnist"
    with pytest.raises(FileNotFoundError, match="exclusion target not found"):
        target_spec(tmp_path / "nope")


def _table(split, label, group, phash, sha1, fine=None):
    n = len(split)
    fine = np.zeros((n, 4), np.uint64) if fine is None else fine
    return ImageTable(
        source_names=["a", "b"],
        label_names=["a/x", "a/y"],
        source=np.zeros(n, np.int16),
        split=np.array(split, np.int8),
        label=np.array(label, np.int32),
        group=np.array(group, np.uint64),
        key=np.arange(1, n + 1, dtype=np.uint64) * np.uint64(7919),
        phash=np.array(phash, np.uint64),
        sha1=np.array(sha1, np.uint64),
        sha1_file=np.arange(1, n + 1, dtype=np.uint64) << np.uint64(40),
        phash256=fine,
    )


def test_decide_rules_on_a_hand_made_table():
    far = [0x0, 0xFFFF_0000_0000_0000, 0x0000_FFFF_0000_0000, 0x0000_0000_FFFF_0000, 0x00FF_00FF_00FF_00FF]
    t = _table(
        split=[2, 0, 0, 2, -1, 1, 0],  # test, train, train, test, none, val, train
        label=[0, 1, 0, 0, -1, 0, -1],
        group=[0, 0, 0, 0, 0, 0, 0],
        #      0 and 1 are exact copies (labels x/y); 3 is a near copy (1 bit) of 2; 4 near copy of 2
        phash=[far[1], far[1], far[2], far[2] ^ 1, far[2] ^ 3, far[3], far[4]],
        sha1=[11, 11, 12, 13, 14, 15, 16],
    )
    excluded = np.array([0, 0, 0, 0, 0, 0, 1], bool)
    d = decide(t, near_threshold=4, confirm_threshold=10, excluded=excluded)
    assert d.reason.tolist() == ["duplicate_exact", "", "", "near_duplicate_cross_split", "", "", "excluded_target"]
    assert d.keep.tolist() == [False, True, True, False, True, True, False]
    assert d.split[4] == 0  # no split of its own: follows the train image it nearly copies
    assert d.label[1] == -1 and d.label_conflict[1]  # the kept copy of a conflicting pair
    assert d.stats["exact"]["across_splits"] == 1


def test_decide_confirmation_rejects_coarse_only_matches():
    fine = np.zeros((2, 4), np.uint64)
    fine[1] = np.uint64(2**64 - 1)  # 256 bits apart at fine scale
    t = _table(split=[0, 2], label=[-1, -1], group=[0, 0], phash=[5, 5], sha1=[1, 2], fine=fine)
    assert decide(t, near_threshold=4, confirm_threshold=36).keep.tolist() == [True, True]
    fine[1] = 0
    t = _table(split=[0, 2], label=[-1, -1], group=[0, 0], phash=[5, 5], sha1=[1, 2], fine=fine)
    assert decide(t, near_threshold=4, confirm_threshold=36).keep.tolist() == [True, False]


def test_split_assignment_keeps_groups_together_and_is_seeded():
    n = 400
    group = np.repeat(np.arange(1, 101, dtype=np.uint64), 4)  # 100 patients of 4 images
    phash = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # far apart
    t = _table(split=[-1] * n, label=[-1] * n, group=group, phash=phash, sha1=np.arange(1, n + 1))
    a = decide(t, seed=0).split
    assert all(len(set(a[group == g].tolist())) == 1 for g in range(1, 101))
    assert 70 <= (a == 0).sum() and (a == 1).sum() > 0 and (a == 2).sum() > 0
    assert not np.array_equal(a, decide(t, seed=1).split)
    np.testing.assert_array_equal(a, decide(t, seed=0).split)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("TRAIN", "train"),
        ("validation", "val"),
        ("HAM10000_train", "train"),
        ("ISIC2018_task3_test", "test"),
        ("", None),
        ("other", None),
    ],
)
def test_normalise_split(raw, expected):
    assert normalise_split(raw) == expected
