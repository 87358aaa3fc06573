"""``phash.phashes`` gives exactly ``imagehash.phash``'s bits (hash_size 8 and 16) on real images.

The shipped fingerprints, built corpora and the dedupe thresholds were all made with
``imagehash.phash``; the fast path must not move a single bit of them.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import imagehash
import numpy as np
import PIL
import pytest
from PIL import Image

import openmednet
from openmednet.data import dedupe, phash

# A handful of real files of ../shared/data: gray (L) of several shapes, colour, gray content saved
# as RGB (brain_mri_yes_no), a tall image that Pillow 13 resizes vertical pass first (head CT,
# 89x128), and originals larger than the 128 px pools.
FILES = [
    "gray/pretrain/knee_oa/ClaheDataset224/test/0/9003175L.jpg",
    "gray/pretrain/head_ct_hemorrhage/head_ct/106.jpg",
    "gray/targets/busi/Dataset_BUSI_with_GT/benign/benign (1).jpg",
    "gray/targets/brain_mri_yes_no/no/10 no.jpg",
    "gray/targets/brain_mri_yes_no/no/11 no.jpg",
    "color/pretrain/pbc_blood_cells/PBC_dataset_normal_DIB/basophil/BA_102750.jpg",
    "color/pretrain/isic_archive/images/ISIC_0000000.jpg",
    "color/targets/bccd_wbc/BCCD_cropped/Basophil/BloodImage_00008_1.jpg",
    # 96x128 colour: a Lanczos zero inside a coefficient band (found a bug in the exact
    # recomputation's band once)
    "color/pretrain/chula_rbc12/Dataset/377.jpg",
    "color/pretrain/isic_archive/images/ISIC_0000049.jpg",
]
#: Pools of both families for the wider check: every shape they hold goes through the fast path.
POOLS = [
    "gray/pretrain/chest_xray_pneumonia", "gray/pretrain/head_ct_hemorrhage", "gray/pretrain/pocus_lung_us",
    "gray/targets/brain_mri_yes_no", "color/pretrain/chula_rbc12", "color/pretrain/ham10000",
    "color/pretrain/odir5k_fundus", "color/targets/bccd_wbc",
]


@pytest.fixture(autouse=True)
def _fast_path_for_every_shape(monkeypatch):
    """``phashes`` resizes a shape with Pillow until it has seen ``_PROBE_AFTER`` images of it;
    here every shape takes the fast path from its first image, so the tests check that path."""
    monkeypatch.setattr(phash, "_PROBE_AFTER", 1)


def _reference(image: np.ndarray) -> tuple[int, np.ndarray]:
    im = Image.fromarray(image)
    coarse = int(str(imagehash.phash(im)), 16)
    bits = imagehash.phash(im, hash_size=16).hash.reshape(-1)
    return coarse, np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8").astype(np.uint64)


def _images(shared_data) -> list[np.ndarray]:
    out = []
    for rel in FILES:
        with Image.open(shared_data / rel) as im:
            out.append(np.asarray(im))  # as stored: L or RGB
    modes = {a.ndim for a in out}
    assert modes == {2, 3}
    # 28x28 chest X-rays (upsampled to 32 and 64 px by the hash)
    with np.load(Path(openmednet.__file__).parent / "assets/demo/pneumoniamnist_demo.npz") as z:
        out += [np.asarray(a) for a in z["train_images"][:3]]
    return out


def _check(images: list[np.ndarray]) -> None:
    coarse, fine = phash.phashes(images)
    for img, c, f in zip(images, coarse, fine):
        ref_c, ref_f = _reference(img)
        assert int(c) == ref_c, img.shape
        np.testing.assert_array_equal(f, ref_f)


def _check_fast_path(images: list[np.ndarray]) -> set[str]:
    """The matrix-product thumbnails equal Pillow's pixel for pixel, and are used. Equal hashes
    alone prove neither: a fast path that misses Pillow falls back to Pillow for that shape (so
    the hashes stay right however broken it is), and a thumbnail off by one grey level rarely
    moves a hash bit. Images above ``MAX_MATMUL_PIXELS`` (Pillow by design) are left out.
    Returns the pass orders used."""
    orders = set()
    for img in images:
        gray = phash._to_gray(img)
        if gray.size > phash.MAX_MATMUL_PIXELS:
            continue
        for side in phash._SIDES:
            order = phash._order(*gray.shape, side)
            assert order != "pillow", (
                f"{gray.shape} -> {side}: no pass order reproduces the installed Pillow's Lanczos resize, "
                "so phashes falls back to Pillow for it (hashes still exact, the fast path lost)"
            )
            with phash._one_blas_thread():  # as phashes runs it (else a loaded machine thrashes)
                ours = phash._resize_stack(gray[None], (side,), order)[0][0]
            np.testing.assert_array_equal(ours, phash._pillow(gray, side), err_msg=f"{gray.shape} -> {side}, {order}")
            orders.add(order)
    return orders


def test_phashes_equal_imagehash_on_real_images(shared_data):
    images = _images(shared_data)
    rgb_gray = np.asarray(Image.open(shared_data / FILES[3]))
    assert rgb_gray.ndim == 3 and (rgb_gray.max(2) == rgb_gray.min(2)).all()  # gray saved as RGB
    _check(images)  # one batch of mixed shapes
    orders = _check_fast_path(images)
    if int(PIL.__version__.split(".")[0]) >= 13:  # the head CT (128 x 89) -> 64 px (python-pillow/Pillow#9549)
        assert orders == {"hv", "vh"}
    for img in images:  # and one image at a time
        _check([img])
    # one-image forms used across the package
    ref_c, ref_f = _reference(images[1])
    assert dedupe.phash64(images[1]) == ref_c
    np.testing.assert_array_equal(dedupe.phash256(images[1]), ref_f)


def test_phashes_equal_imagehash_on_many_pool_images(shared_data):
    """30 files of each of 8 pools in one batch (many shapes, hence many coefficient tables)."""
    images = []
    for pool in POOLS:
        files = sorted(p for p in (shared_data / pool).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for p in files[:: max(1, len(files) // 30)][:30]:
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im))
    assert len(images) >= 200
    _check(images)
    _check_fast_path(images)


def test_phashes_batch_of_one_shape_and_the_vertical_first_order(shared_data):
    """A source's images mostly share a shape: they go through one product per pass."""
    head = sorted((shared_data / "gray/pretrain/head_ct_hemorrhage/head_ct").glob("*.jpg"))[:40]
    images = [np.asarray(Image.open(p).convert("L")) for p in head]
    _check(images)
    _check_fast_path(images)


def test_rare_shapes_use_pillow_until_seen_often(shared_data, monkeypatch):
    """A shape seen fewer than ``_PROBE_AFTER`` times is resized by Pillow (no probe, no tables)."""
    monkeypatch.setattr(phash, "_PROBE_AFTER", 10**9)
    monkeypatch.setattr(phash, "_order", lambda *a: pytest.fail("probed a rare shape"))
    _check(_images(shared_data))


def test_phashes_fall_back_to_pillow_for_large_images(shared_data, monkeypatch):
    images = _images(shared_data)[:4]
    phash._order.cache_clear()
    monkeypatch.setattr(phash, "MAX_MATMUL_PIXELS", 0)
    try:
        assert {phash._order(*phash._to_gray(a).shape, 32) for a in images} == {"pillow"}
        _check(images)
    finally:
        phash._order.cache_clear()


def test_phashes_memory_stays_bounded_for_many_images(monkeypatch):
    """Many images at once (a whole target set) are converted, resized and transformed in
    chunks: memory does not grow with their number beyond the thumbnails (``(n, 32, 32)`` and
    ``(n, 64, 64)`` uint8). Converting all to ``L`` first and one float64 DCT over all of them
    took about 43 MB for these 300 images (140 KB each; 1.4 GB for a 10,000-image set)."""
    images = [np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8) for i in range(300)]
    phash.phashes(images[:8])  # coefficient tables and probe, cached
    monkeypatch.setattr(phash, "_BATCH_PIXELS", 96 * 96 * 16)
    monkeypatch.setattr(phash, "_DCT_CHUNK", 16)
    tracemalloc.start()
    try:
        phash.phashes(images)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    thumbnails = 300 * (32 * 32 + 64 * 64)
    assert peak < thumbnails + 4_000_000, f"peak {peak / 1e6:.1f} MB"


def test_phashes_of_nothing():
    coarse, fine = phash.phashes([])
    assert coarse.shape == (0,) and fine.shape == (0, 4)


@pytest.mark.parametrize("shape", [(8, 300), (300, 8), (40, 33)])
def test_phashes_exact_on_extreme_aspect_ratios(shape):
    """Not real images: seeded noise of thin shapes, where the pass order and the float32 error
    bound are hardest (rows of 300 pixels, 9x down-sampling on one axis, up-sampling on the other)."""
    img = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    _check([img])


# Hashes of real files as the shipped corpora's fingerprints hold them (computed with the code of
# commit 0684c59, before the banded products): every path, and any later change (of this module,
# Pillow or imagehash), must reproduce them bit for bit.
PINNED = [
    ("gray/pretrain/knee_oa/ClaheDataset224/test/0/9003175L.jpg", "c0d9bc3172b3cba2",
     "c500db75be9e3197726cb372dbd0e3d073d88728cf72618a86581e612993d78a"),
    ("gray/pretrain/head_ct_hemorrhage/head_ct/106.jpg", "d3d1541e0aab4fc5",
     "d3cad14250411aff0affabd50fd4c5547f02156a7f40dbaa680f94a5342f1ea5"),
    ("gray/targets/busi/Dataset_BUSI_with_GT/benign/benign (1).jpg", "d4e80bc73485eea3",
     "d44be8000bb1c7f7349f8517e6faa368c4e1d887ad928d58266c226ef96d7e81"),
    ("gray/targets/brain_mri_yes_no/no/10 no.jpg", "c3433eb87a87701b",
     "c13343303eeab0d37a14877c70ca1bce8f3fd0e3790c1f3848fb79843d3460f3"),
    ("color/pretrain/pbc_blood_cells/PBC_dataset_normal_DIB/basophil/BA_102750.jpg", "e7c9c8b126369e83",
     "e78ccd59c832b98126ca36919e748b4799c3e9382628fe678c9591660c9dff39"),
    ("color/pretrain/chula_rbc12/Dataset/377.jpg", "85eda42299d8ade6",
     "8142edcca46b22059937d8cfad9ce6bd25a71076ac7e356a4e214db0a79239f6"),
    ("gray/pretrain/brain_tumor_mri/AugTraining/glioma/Tr-glTr_0002.jpg", "873c7b2924e63a93",
     "87e93c987b47696a249ee6993a69938667381a49ccdeccb11865b1da61943cdb"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("probe_after", "min_banded"), [(1, 0), (1, 10**12), (10**9, 0)], ids=["banded", "dense", "pillow"]
)
def test_phashes_reproduce_pinned_values_of_real_images(shared_data, monkeypatch, probe_after, min_banded):
    """Each path: the products in bands (``_bands``, a large batch), one dense product, Pillow."""
    monkeypatch.setattr(phash, "_PROBE_AFTER", probe_after)
    monkeypatch.setattr(phash, "_MIN_BANDED", min_banded)
    images = []
    for rel, _, _ in PINNED:
        with Image.open(shared_data / rel) as im:
            images.append(np.asarray(im))  # as stored: L (128 px, 128x89, 256 px) or RGB
    coarse, fine = phash.phashes(images)
    got = [(rel, f"{int(c):016x}", "".join(f"{int(v):016x}" for v in f)) for (rel, _, _), c, f in zip(PINNED, coarse, fine)]
    assert got == PINNED


def _distinct_shapes(folder: Path, keep, count: int) -> list[np.ndarray]:
    """The first ``count`` images of ``folder`` (L) whose shape passes ``keep``, of distinct shapes."""
    out, shapes = [], set()
    for p in sorted(folder.rglob("*.jpg")):
        with Image.open(p) as im:
            a = np.asarray(im.convert("L"))
        if keep(a.shape) and a.shape not in shapes:
            shapes.add(a.shape)
            out.append(a)
            if len(out) == count:
                break
    assert len(out) == count, folder
    return out


def test_shapes_of_one_width_share_the_first_pass(shared_data):
    """``_resize_stacks``: chest X-rays 128 px wide of 6 heights (``"hv"``: one width pass for
    all) and head CTs 128 px high and 88-95 px wide (to 64 px resized vertical pass first by
    Pillow 13: one height pass for all), each block with two images of a shape, give Pillow's
    thumbnails pixel for pixel, and ``phashes`` of them all ``imagehash``'s bits."""
    chest = _distinct_shapes(shared_data / "gray/pretrain/chest_xray_pneumonia", lambda s: s[1] == 128, 6)
    head = _distinct_shapes(shared_data / "gray/pretrain/head_ct_hemorrhage", lambda s: s[0] == 128 and s[1] < 96, 5)
    used = set()
    for images in (chest, head):
        for side in phash._SIDES:
            shared: dict[tuple[str, int], list[np.ndarray]] = {}  # by order and first pass's length
            for a in images:
                order = phash._order(*a.shape, side)
                shared.setdefault((order, a.shape[1] if order == "hv" else a.shape[0]), []).append(a)
            for (order, _), group in shared.items():
                blocks = [[a, a[:, ::-1].copy()] for a in group]  # two images of each shape
                with phash._one_blas_thread():
                    results = phash._resize_stacks(blocks, (side,), order)
                for block, (thumbs,) in zip(blocks, results):
                    for a, t in zip(block, thumbs):
                        np.testing.assert_array_equal(t, phash._pillow(a, side), err_msg=f"{a.shape} -> {side}, {order}")
                used.add((order, len(group) > 1))
    assert ("hv", True) in used
    if int(PIL.__version__.split(".")[0]) >= 13:  # python-pillow/Pillow#9549
        assert ("vh", True) in used
    _check(chest + head + [a[::-1].copy() for a in chest])


def test_blocks_are_packed_in_order_up_to_the_batch_pixels(monkeypatch):
    monkeypatch.setattr(phash, "_BATCH_PIXELS", 100)
    blocks = [([0], 60), ([1, 2], 40), ([3], 30), ([4], 250), ([5], 10)]
    assert phash._packed(blocks) == [[[0], [1, 2]], [[3]], [[4]], [[5]]]
