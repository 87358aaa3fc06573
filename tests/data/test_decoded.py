"""``DecodedItems``: the subset/``y`` a classification ``TargetSet`` and a ``SegmentationSet`` share,
and the shared shorter-side cap ``data.images.shrink``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from openmednet.data.decoded import majority_channels
from openmednet.data.images import shrink
from openmednet.data.segmentation import SegmentationSet
from openmednet.eval.targets import TargetSet


def _target() -> TargetSet:
    n = 4
    return TargetSet(
        images=[np.full((2, 2), i, np.uint8) for i in range(n)], labels=np.asarray(["b", "a", "b", "a"], dtype=object),
        groups=["p0", None, "p1", "p1"], given_splits=[None] * n, ids=[f"i{i}" for i in range(n)],
        label_names=("a", "b"), channels=1, hashes=np.arange(n, dtype=np.uint64),
        fine_hashes=np.arange(4 * n, dtype=np.uint64).reshape(n, 4), root=Path("t"), skipped={"truncated": 1},
    )


def test_target_subset_by_indices_and_mask_alike():
    t = _target()
    by_index, by_mask = t.subset([2, 0]), t.subset(np.asarray([True, False, False, False]))
    assert type(by_index) is TargetSet and len(by_index) == 2 and len(by_mask) == 1
    assert by_index.ids == ["i2", "i0"] and by_index.groups == ["p1", "p0"]
    assert by_index.labels.tolist() == ["b", "b"] and by_index.y.tolist() == [1, 1]
    assert by_index.label_names == ("a", "b")  # classes are kept, even those not in the subset
    assert by_index.hashes.tolist() == [2, 0] and by_index.fine_hashes[:, 0].tolist() == [8, 0]
    assert isinstance(by_index.images, list) and isinstance(by_index.labels, np.ndarray)
    assert by_index.skipped == t.skipped and by_index.skipped is not t.skipped
    assert by_mask.ids == ["i0"] and t.subset([]).ids == []


def test_segmentation_subset_keeps_strata_and_masks():
    masks = [np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8), np.pad(np.ones((1, 1), np.uint8), 1)[:4, :4]]
    s = SegmentationSet(
        images=[m * 50 for m in masks], masks=masks, class_names=("background", "lesion"), groups=[None] * 3,
        given_splits=[None] * 3, ids=["a", "b", "c"], channels=1, hashes=np.arange(3, dtype=np.uint64),
        fine_hashes=np.zeros((3, 4), np.uint64), root=Path("s"),
    )
    sub = s.subset([2, 1])
    assert type(sub) is SegmentationSet and sub.ids == ["c", "b"] and sub.masks[1] is masks[1]
    assert s.labels.tolist() == ["empty", "lesion:large", "lesion:small"]
    assert sub.labels.tolist() == ["lesion:small", "lesion:large"]  # each item's stratum, not recomputed
    assert sub.label_names == ("lesion:large", "lesion:small") and sub.y.tolist() == [1, 0]


def test_majority_channels_counts_the_minority():
    gray, colour = np.zeros((2, 2), np.uint8), np.dstack([np.zeros((2, 2), np.uint8), np.full((2, 2), 9, np.uint8),
                                                         np.zeros((2, 2), np.uint8)])
    assert majority_channels([gray, gray, colour]) == (1, 1)
    assert majority_channels([gray, colour]) == (1, 1)  # a tie is gray
    assert majority_channels([colour, colour, gray]) == (3, 1)


def test_shrink_caps_the_shorter_side_and_keeps_mask_values():
    img = np.arange(300 * 200, dtype=np.uint32).reshape(300, 200).astype(np.uint8)
    assert shrink(img, None) is img and shrink(img, 200) is img
    out = shrink(img, 100)
    assert out.shape == (150, 100)
    assert np.array_equal(out, np.asarray(Image.fromarray(img).resize((100, 150), Image.Resampling.BILINEAR)))
    mask = (np.arange(300)[:, None] % 3 + np.zeros((1, 200), int)).astype(np.uint8)
    assert set(np.unique(shrink(mask, 100, Image.Resampling.NEAREST)).tolist()) <= {0, 1, 2}
