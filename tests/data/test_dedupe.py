"""Duplicate detection: multi-index near search against brute force, hashes on real images."""

from __future__ import annotations

import imagehash
import numpy as np
import pytest
from PIL import Image

from openmednet.data import dedupe


def _planted_hashes(n: int, copies: int, max_flips: int, seed: int = 0) -> np.ndarray:
    """Random 64-bit hashes with ``copies`` near copies (0..max_flips bits flipped) and a triple."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(
        np.uint64
    )
    for _ in range(copies):
        i, j = rng.integers(n, size=2)
        v = int(h[i])
        for bit in rng.choice(64, size=rng.integers(0, max_flips + 1), replace=False):
            v ^= 1 << int(bit)
        h[j] = v
    h[5] = h[6] = h[7]  # identical hashes are pairs too
    return h


def _brute(a: np.ndarray, b: np.ndarray | None, t: int) -> np.ndarray:
    other = a if b is None else b
    d = np.bitwise_count(a[:, None] ^ other[None, :])
    mask = d <= t
    if b is None:
        mask = np.triu(mask, 1)
    return np.argwhere(mask)


@pytest.mark.parametrize("threshold", [0, 3, 4, 6, 8, 11])
def test_near_pairs_equals_brute_force(threshold):
    h = _planted_hashes(1500, 200, 12)
    got = dedupe.near_pairs(h, threshold)
    want = _brute(h, None, threshold)
    assert len(want) > 3  # the planted copies make the comparison meaningful
    np.testing.assert_array_equal(got, want)


def test_near_pairs_cross_join_equals_brute_force():
    h = _planted_hashes(800, 50, 8, seed=1)
    rng = np.random.default_rng(2)
    others = h[rng.choice(800, 120, replace=False)] ^ np.uint64(0b1011)  # 3 bits away
    got = dedupe.near_pairs(h, 6, others=others)
    np.testing.assert_array_equal(got, _brute(h, others, 6))
    assert len(dedupe.near_pairs(h, 2, others=others)) < len(got)


def test_near_pairs_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        dedupe.near_pairs(np.zeros(3, np.uint64), 64)


def test_equal_pairs_and_components():
    keys = np.array([7, 3, 7, 0, 0, 3, 7, 9], dtype=np.uint64)
    pairs = dedupe.equal_pairs(keys)
    comp = dedupe.components(len(keys), pairs)
    # 0 means "no key": items 3 and 4 stay alone
    np.testing.assert_array_equal(comp, [0, 1, 0, 3, 4, 1, 0, 7])


def test_sha1_pixels_depends_on_shape():
    a = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert dedupe.sha1_pixels(a) != dedupe.sha1_pixels(a.reshape(4, 16))
    assert dedupe.sha1_pixels(a) == dedupe.sha1_pixels(a.copy())


def test_phash64_matches_imagehash_on_a_real_image(shared_data):
    path = shared_data / "color/pretrain/isic_archive/images/ISIC_0000000.jpg"
    img = np.asarray(Image.open(path).convert("RGB"))
    assert dedupe.phash64(img) == int(str(imagehash.phash(Image.fromarray(img))), 16)


def test_phash_finds_isic_copies_and_separates_other_lesions(shared_data):
    """isic2017 (squashed to 256x256) and isic_archive (aspect kept, <=128 px) share ISIC ids."""
    archive = shared_data / "color/pretrain/isic_archive/images"
    isic17 = shared_data / "color/targets/isic2017_melanoma/ISIC-2017_Training_Data"
    names = [p.name for p in sorted(archive.glob("*.jpg")) if (isic17 / p.name).exists()][:20]
    assert len(names) == 20

    def ph(p):
        return dedupe.phash64(np.asarray(Image.open(p).convert("RGB")))

    a = np.array([ph(archive / n) for n in names], dtype=np.uint64)
    b = np.array([ph(isic17 / n) for n in names], dtype=np.uint64)
    d = dedupe.hamming(a[:, None], b[None, :])
    assert (np.diag(d) <= dedupe.DEFAULT_NEAR_THRESHOLD).all()
    off = d[~np.eye(len(names), dtype=bool)]
    assert off.min() > dedupe.DEFAULT_NEAR_THRESHOLD
    pairs = dedupe.near_pairs(a, others=b)
    np.testing.assert_array_equal(pairs, np.stack([np.arange(20), np.arange(20)], 1))
