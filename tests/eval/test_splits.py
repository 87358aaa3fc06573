"""Splits: group-aware stratification, given splits, few-shot counts, leakage and duplicate checks."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openmednet.data.dedupe import phash64, phash256
from openmednet.eval.splits import (
    check_group_leakage,
    find_label_conflicts,
    find_near_duplicates,
    make_splits,
    subsample_train,
)


def _toy(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.choice(["benign", "malignant", "normal"], n, p=[0.55, 0.3, 0.15])
    groups = rng.integers(0, n // 3, n).astype(str)  # ~3 images per patient
    return labels, groups


def test_drawn_splits_are_group_disjoint_and_stratified() -> None:
    labels, groups = _toy()
    splits = make_splits(labels, groups, seed=0)
    check_group_leakage(groups, splits)
    for name in ("train", "val", "test"):
        assert (splits == name).any()
    overall = Counter(labels)
    for name in ("test", "val"):
        part = Counter(labels[splits == name])
        for cls, count in overall.items():
            share = part[cls] / sum(part.values())
            assert abs(share - count / len(labels)) < 0.1, (name, cls)
    assert 0.1 < (splits == "test").mean() < 0.3


def test_split_depends_only_on_seed() -> None:
    labels, groups = _toy()
    assert (make_splits(labels, groups, seed=1) == make_splits(labels, groups, seed=1)).all()
    assert (make_splits(labels, groups, seed=1) != make_splits(labels, groups, seed=2)).any()


def test_given_splits_are_kept_and_val_drawn_from_train(shared_data: Path) -> None:
    rows = list(csv.DictReader((shared_data / "gray/targets/openi_abd_vs_cxr/labels.csv").read_text().splitlines()))
    labels = [r["label"] for r in rows]
    given = [r["split"] for r in rows]
    assert (make_splits(labels, None, given) == np.asarray(given)).all()
    # Drop the given val: it is drawn from train, test stays exactly the given test.
    no_val = ["train" if s == "val" else s for s in given]
    splits = make_splits(labels, None, no_val, seed=0)
    assert [i for i, s in enumerate(splits) if s == "test"] == [i for i, s in enumerate(given) if s == "test"]
    assert (splits == "val").sum() > 0
    assert all(no_val[i] == "train" for i in np.flatnonzero(splits == "val"))


def test_given_train_val_only_val_becomes_test() -> None:
    labels = ["a", "b"] * 20
    given = ["train"] * 30 + ["val"] * 10
    splits = make_splits(labels, None, given, seed=0)
    assert (splits[30:] == "test").all() and (splits[:30] != "test").all() and (splits == "val").any()


@pytest.mark.parametrize(
    "labels, given, match",
    [
        (["a", "a", "a", "b"], None, r"\['b'\] \(classes, or mask strata of a segmentation set\) have 1 image each"),
        (["a", "b", "a", "b"], ["train", "", "test", "test"], "no split while others do"),
        (["a", "b", "a", "b"], ["train", "dev", "test", "test"], "unknown split names"),
    ],
)
def test_bad_split_input(labels: list[str], given: list[str] | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_splits(labels, None, given)


def test_group_leakage_is_refused() -> None:
    with pytest.raises(ValueError, match="'p1' in \\['test', 'train'\\]"):
        check_group_leakage(["p1", "p1", "p2", ""], ["train", "test", "test", "train"])
    check_group_leakage(["p1", "p1", "", ""], ["train", "train", "test", "train"])  # empty = own group


def test_few_shot_counts_are_exact_and_nested() -> None:
    labels, groups = _toy()
    splits = make_splits(labels, groups, seed=0)
    train = np.flatnonzero(splits == "train")
    ten = subsample_train(labels, train, per_class=10, seed=5)
    assert Counter(labels[ten]) == {"benign": 10, "malignant": 10, "normal": 10}
    assert set(ten) <= set(train)
    five = subsample_train(labels, train, per_class=5, seed=5)
    assert set(five) < set(ten)
    half = subsample_train(labels, train, fraction=0.5, seed=5)
    for cls, n in Counter(labels[train]).items():
        assert Counter(labels[half])[cls] == max(1, round(0.5 * n))
    assert set(subsample_train(labels, train, fraction=0.1, seed=5)) <= set(half)
    assert (subsample_train(labels, train, per_class=10, seed=5) == ten).all()
    with pytest.raises(ValueError, match="fewer than per_class=1000"):
        subsample_train(labels, train, per_class=1000)
    with pytest.raises(ValueError, match="exactly one"):
        subsample_train(labels, train)
    # Regression (hostile-user probe): a fraction rounding to 0 per class silently used 1 each, e.g.
    # 17% of the images for label_fraction 0.01; the share actually used is now said.
    with pytest.warns(UserWarning, match=r"rounds to 0 images for class \['benign', 'malignant', 'normal'\]"):
        tiny = subsample_train(labels, train, fraction=0.001, seed=5)
    assert Counter(labels[tiny]) == {"benign": 1, "malignant": 1, "normal": 1}


def _jpeg_roundtrip(arr: np.ndarray, quality: int, size: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).resize((size, size)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


def test_near_duplicates_on_real_images(shared_data: Path) -> None:
    root = shared_data / "gray/targets/openi_abd_vs_cxr"
    rows = list(csv.DictReader((root / "labels.csv").read_text().splitlines()))[:6]
    images = [np.asarray(Image.open(root / r["path"]).convert("L")) for r in rows]
    hashes = [phash64(a) for a in images]
    copy = phash64(_jpeg_roundtrip(images[3], quality=40, size=64))
    pairs = find_near_duplicates([copy], hashes)
    assert [(i, j) for i, j, _ in pairs] == [(0, 3)]
    copy_fine = phash256(_jpeg_roundtrip(images[3], quality=40, size=64))[None]
    fine = np.stack([phash256(a) for a in images])
    assert find_near_duplicates([copy], hashes, query_fine=copy_fine, reference_fine=fine) == pairs
    # A 64-bit candidate that the 256-bit hash does not confirm is not a copy.
    assert find_near_duplicates([copy], hashes, 63, query_fine=copy_fine, reference_fine=fine) == pairs
    assert find_near_duplicates(hashes, hashes, 0) == [(i, i, 0) for i in range(6)]


def test_busi_double_label_is_found(shared_data: Path) -> None:
    root = shared_data / "gray/targets/busi/Dataset_BUSI_with_GT"
    files = ["benign/benign (433).jpg", "malignant/malignant (145).jpg", "benign/benign (1).jpg"]
    images = [np.asarray(Image.open(root / f).convert("L")) for f in files]
    hashes = [phash64(a) for a in images]
    assert find_label_conflicts(hashes, ["benign", "malignant", "benign"]) == [[0, 1]]
    fine = np.stack([phash256(a) for a in images])
    assert find_label_conflicts(hashes, ["benign", "malignant", "benign"], fine=fine) == [[0, 1]]
    assert find_label_conflicts(hashes, ["benign", "benign", "benign"]) == []
