"""NpzReader on the real PneumoniaMNIST archive and on MedMNIST-layout files written to tmp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from openmednet.data.readers import SkipImage, read_images
from openmednet.data.readers.npz import list_splits, load_split, read_row


@pytest.fixture(scope="module")
def pneumonia(shared_data: Path) -> Path:
    return shared_data / "gray/targets/pneumoniamnist/pneumoniamnist.npz"


def test_pneumoniamnist_splits_and_rows(pneumonia: Path) -> None:
    assert list_splits(pneumonia) == ["train", "val", "test"]
    counts = {split: len(load_split(pneumonia, split)[0]) for split in list_splits(pneumonia)}
    assert counts == {"train": 4708, "val": 524, "test": 624}  # the official MedMNIST v2 split


def test_read_row_matches_numpy(pneumonia: Path) -> None:
    with np.load(pneumonia) as z:
        expected_img, expected_label = z["test_images"][17], int(z["test_labels"][17, 0])
    img, meta = read_row(pneumonia, "test", 17)
    np.testing.assert_array_equal(img, expected_img)
    assert (meta.split, meta.label, meta.frame) == ("test", str(expected_label), 17)
    assert img.shape == (28, 28) and meta.photometric == "MONOCHROME2"


def test_read_images_yields_every_row(pneumonia: Path) -> None:
    n = 0
    labels = set()
    for _img, meta in read_images(pneumonia):
        n += 1
        labels.add(meta.label)
    assert n == 5856 and labels == {"0", "1"}


def test_multilabel_rgb_and_float_layout(tmp_path: Path) -> None:
    rgb = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    floats = np.array([[[0.0, 0.5], [1.0, 2.0]]])
    np.savez(
        tmp_path / "m.npz",
        train_images=rgb,
        train_labels=np.array([[0, 1, 1], [1, 0, 0]]),
        extra_images=floats,
    )
    rows = list(read_images(tmp_path / "m.npz"))
    assert [(m.split, m.label) for _, m in rows] == [("train", "0,1,1"), ("train", "1,0,0"), ("extra", None)]
    np.testing.assert_array_equal(rows[1][0], rgb[1])
    assert rows[1][1].photometric == "RGB"
    np.testing.assert_array_equal(rows[2][0], [[0, 64], [128, 255]])  # float rows: min-max to uint8


def test_unknown_split_and_row(pneumonia: Path) -> None:
    with pytest.raises(KeyError, match=r"split 'training' not in .*\['train', 'val', 'test'\]"):
        read_row(pneumonia, "training", 0)
    with pytest.raises(IndexError, match="row 624 outside split 'test'"):
        read_row(pneumonia, "test", 624)


def test_corrupt_and_wrong_layout(tmp_path: Path, pneumonia: Path) -> None:
    (tmp_path / "cut.npz").write_bytes(pneumonia.read_bytes()[:5000])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    reasons = []
    for name in ("cut.npz", "other.npz"):
        with pytest.raises(SkipImage) as info:
            list(read_images(tmp_path / name))
        reasons.append(info.value.reason)
    assert reasons == ["corrupt", "unsupported_image"]
